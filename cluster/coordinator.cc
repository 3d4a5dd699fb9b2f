#include "cluster/coordinator.h"

#include <algorithm>
#include <sstream>
#include <unordered_set>

#include "common/check.h"
#include "common/log.h"

namespace kun::cluster {

bool is_legal_transition(GroupState from, GroupState to) {
  return (from == GroupState::kInitial && to == GroupState::kDropped) ||
         (from == GroupState::kDropped && to == GroupState::kRestoring) ||
         (from == GroupState::kRestoring && to == GroupState::kInitial);
}

const char* event_kind_name(EventKind k) {
  switch (k) {
    case EventKind::kDropRequested: return "drop_requested";
    case EventKind::kDropDone: return "drop_done";
    case EventKind::kRestoreRequested: return "restore_requested";
    case EventKind::kRestoreStarted: return "restore_started";
    case EventKind::kRestoreDone: return "restore_done";
    case EventKind::kShrinkRequested: return "shrink_requested";
    case EventKind::kShrinkDone: return "shrink_done";
  }
  return "unknown";
}

std::string Event::to_string() const {
  std::ostringstream os;
  os << "t=" << time_us << "us group " << group << " " << event_kind_name(kind) << " " << group_state_name(from)
     << "->" << group_state_name(to) << " members {";
  for (std::size_t i = 0; i < members.size(); ++i) os << (i ? "," : "") << members[i];
  os << "}";
  if (latency_us >= 0) os << " latency " << latency_us << "us";
  if (forced) os << " (forced)";
  if (!detail.empty()) os << ": " << detail;
  return os.str();
}

Coordinator::Coordinator(CoordinatorConfig config, ClusterShape shape)
    : config_(config),
      shape_(std::move(shape)),
      monitor_(config_.monitor),
      planner_(config_.planner),
      migration_(config_.migration, shape_),
      events_(config_.event_history) {}

GroupInfo& Coordinator::live_group(std::int64_t id) {
  auto it = groups_.find(id);
  KUN_CHECK(it != groups_.end()) << "unknown or dissolved group " << id;
  return it->second;
}

const GroupInfo* Coordinator::group(std::int64_t id) const {
  auto it = groups_.find(id);
  return it == groups_.end() ? nullptr : &it->second;
}

std::int64_t Coordinator::group_of(std::int64_t instance) const {
  auto it = group_of_.find(instance);
  return it == group_of_.end() ? -1 : it->second;
}

bool Coordinator::any_in_transition() const {
  return std::any_of(groups_.begin(), groups_.end(), [](const auto& kv) { return kv.second.in_transition(); });
}

void Coordinator::transition(GroupInfo& g, GroupState to) {
  KUN_CHECK(is_legal_transition(g.state, to))
      << "group " << g.id << ": illegal transition " << group_state_name(g.state) << " -> " << group_state_name(to);
  g.state = to;
}

void Coordinator::record(std::int64_t now_us, const GroupInfo& g, EventKind kind, GroupState from, GroupState to,
                         std::int64_t latency_us, bool forced, std::string detail) {
  Event e;
  e.time_us = now_us;
  e.group = g.id;
  e.kind = kind;
  e.from = from;
  e.to = to;
  e.members = g.members;
  e.latency_us = latency_us;
  e.forced = forced;
  e.detail = std::move(detail);
  KUN_LOG(kInfo) << "cluster: " << e.to_string();
  events_.push_back(std::move(e));
}

DropAction Coordinator::create_group(std::vector<std::int64_t> members, std::int64_t now_us, std::string reason,
                                     bool forced) {
  GroupInfo g;
  g.id = next_group_id_++;
  g.members = std::move(members);
  g.drop_pending = true;
  g.drop_requested_us = now_us;
  for (std::int64_t m : g.members) {
    const bool inserted = group_of_.emplace(m, g.id).second;
    KUN_CHECK(inserted) << "instance " << m << " is already in group " << group_of(m);
    monitor_.reset_instance(m);
  }
  record(now_us, g, EventKind::kDropRequested, GroupState::kInitial, GroupState::kInitial, -1, forced, reason);
  DropAction a{g.members, g.id, std::move(reason)};
  groups_.emplace(g.id, std::move(g));
  return a;
}

RestoreAction Coordinator::request_restore(GroupInfo& g, std::int64_t now_us, std::string reason, bool forced) {
  KUN_CHECK(g.state == GroupState::kDropped && !g.in_transition())
      << "group " << g.id << " cannot restore from " << group_state_name(g.state)
      << (g.in_transition() ? " (in transition)" : "");
  g.restore_pending = true;
  g.restore_requested_us = now_us;
  record(now_us, g, EventKind::kRestoreRequested, g.state, g.state, -1, forced, reason);
  return RestoreAction{g.id, std::move(reason)};
}

void Coordinator::on_drop_done(std::int64_t group_id, std::int64_t now_us) {
  GroupInfo& g = live_group(group_id);
  KUN_CHECK(g.drop_pending) << "group " << group_id << ": drop done without a pending drop";
  const GroupState from = g.state;
  transition(g, GroupState::kDropped);
  g.drop_pending = false;
  g.dropped_us = now_us;
  monitor_.reset_group(group_id);
  replan_due_ = true;
  record(now_us, g, EventKind::kDropDone, from, g.state, now_us - g.drop_requested_us, false, "");
}

void Coordinator::on_restore_started(std::int64_t group_id, std::int64_t now_us) {
  GroupInfo& g = live_group(group_id);
  KUN_CHECK(g.restore_pending) << "group " << group_id << ": restore started without a restore request";
  const GroupState from = g.state;
  transition(g, GroupState::kRestoring);
  record(now_us, g, EventKind::kRestoreStarted, from, g.state, now_us - g.restore_requested_us, false, "");
}

void Coordinator::on_restore_done(std::int64_t group_id, std::int64_t now_us) {
  GroupInfo& g = live_group(group_id);
  KUN_CHECK(g.restore_pending) << "group " << group_id << ": restore done without a restore request";
  const GroupState from = g.state;
  transition(g, GroupState::kInitial);
  g.restore_pending = false;
  std::ostringstream detail;
  detail << "dropped for " << now_us - g.dropped_us << "us";
  record(now_us, g, EventKind::kRestoreDone, from, g.state, now_us - g.restore_requested_us, false, detail.str());
  for (std::int64_t m : g.members) {
    group_of_.erase(m);
    monitor_.reset_instance(m);
  }
  monitor_.reset_group(group_id);
  groups_.erase(group_id);
  replan_due_ = true;
}

ShrinkAction Coordinator::request_shrink(GroupInfo& g, const PlannedShrink& plan, std::int64_t now_us, std::string reason) {
  KUN_CHECK(g.state == GroupState::kDropped && !g.in_transition())
      << "group " << g.id << " cannot shrink from " << group_state_name(g.state)
      << (g.in_transition() ? " (in transition)" : "");
  g.shrink_pending = true;
  g.restore_requested_us = now_us;
  g.shrink_into = {next_group_id_, next_group_id_ + 1};
  next_group_id_ += 2;
  record(now_us, g, EventKind::kShrinkRequested, g.state, g.state, -1, false, reason);
  return ShrinkAction{g.id, plan.halves, g.shrink_into, std::move(reason)};
}

void Coordinator::on_shrink_done(std::int64_t group_id, std::int64_t now_us) {
  GroupInfo& g = live_group(group_id);
  KUN_CHECK(g.shrink_pending) << "group " << group_id << ": shrink done without a shrink request";
  const auto degree = static_cast<std::int64_t>(g.members.size());
  std::vector<std::vector<std::int64_t>> halves(2);
  for (std::int64_t s = 0; s < degree; ++s) halves[static_cast<std::size_t>(s % 2)].push_back(g.members[static_cast<std::size_t>(s)]);
  const std::vector<std::int64_t> ids = g.shrink_into;
  std::ostringstream detail;
  detail << "into groups " << ids[0] << " and " << ids[1] << " of degree " << degree / 2;
  record(now_us, g, EventKind::kShrinkDone, g.state, g.state, now_us - g.restore_requested_us, false, detail.str());
  for (std::int64_t m : g.members) group_of_.erase(m);
  monitor_.reset_group(group_id);
  groups_.erase(group_id);
  for (std::size_t h = 0; h < 2; ++h) {
    add_dropped_group(ids[h], halves[h], now_us);
  }
  replan_due_ = true;
}

void Coordinator::add_dropped_group(std::int64_t id, const std::vector<std::int64_t>& members, std::int64_t now_us) {
  GroupInfo g;
  g.id = id;
  g.members = members;
  g.state = GroupState::kDropped;
  g.drop_requested_us = now_us;
  g.dropped_us = now_us;
  for (std::int64_t m : g.members) {
    const bool inserted = group_of_.emplace(m, g.id).second;
    KUN_CHECK(inserted) << "instance " << m << " is already in group " << group_of(m);
  }
  monitor_.reset_group(g.id);
  groups_.emplace(g.id, std::move(g));
}

void Coordinator::dissolve_absorbed(std::int64_t group_id, std::int64_t now_us) {
  GroupInfo& g = live_group(group_id);
  KUN_CHECK(g.state == GroupState::kDropped && !g.in_transition())
      << "group " << group_id << " cannot grow from " << group_state_name(g.state);
  record(now_us, g, EventKind::kDropRequested, g.state, g.state, -1, false, "absorbed by a growing group");
  for (std::int64_t m : g.members) {
    group_of_.erase(m);
    monitor_.reset_instance(m);
  }
  monitor_.reset_group(group_id);
  groups_.erase(group_id);
}

StatusOr<DropAction> Coordinator::force_drop(const std::vector<std::int64_t>& instances, std::int64_t now_us) {
  const auto g = static_cast<std::int64_t>(instances.size());
  if (std::find(shape_.allowed_degrees.begin(), shape_.allowed_degrees.end(), g) == shape_.allowed_degrees.end()) {
    return invalid_argument("force_drop: degree " + std::to_string(g) + " is not an allowed degree");
  }
  if (g > shape_.num_layers) return invalid_argument("force_drop: more members than layers");
  std::unordered_set<std::int64_t> seen;
  for (std::int64_t m : instances) {
    if (m < 0 || (shape_.num_instances > 0 && m >= shape_.num_instances)) {
      return invalid_argument("force_drop: no instance " + std::to_string(m));
    }
    if (!seen.insert(m).second) return invalid_argument("force_drop: instance " + std::to_string(m) + " twice");
    if (group_of(m) >= 0) {
      return failed_precondition("force_drop: instance " + std::to_string(m) + " is in group " +
                                 std::to_string(group_of(m)));
    }
  }
  return create_group(instances, now_us, "forced", /*forced=*/true);
}

StatusOr<RestoreAction> Coordinator::force_restore(std::int64_t group_id, std::int64_t now_us) {
  auto it = groups_.find(group_id);
  if (it == groups_.end()) return not_found("force_restore: no group " + std::to_string(group_id));
  GroupInfo& g = it->second;
  if (g.state != GroupState::kDropped || g.in_transition()) {
    return failed_precondition("force_restore: group " + std::to_string(group_id) + " is " +
                               group_state_name(g.state) + (g.in_transition() ? " (in transition)" : ""));
  }
  return request_restore(g, now_us, "forced", /*forced=*/true);
}

StatusOr<DropAction> Coordinator::force_grow(std::int64_t group_id, const std::vector<std::int64_t>& partners,
                                              std::int64_t now_us) {
  auto it = groups_.find(group_id);
  if (it == groups_.end()) return not_found("force_grow: no group " + std::to_string(group_id));
  const GroupInfo& grower = it->second;
  if (grower.state != GroupState::kDropped || grower.in_transition()) {
    return failed_precondition("force_grow: group " + std::to_string(group_id) + " is " + group_state_name(grower.state) +
                               (grower.in_transition() ? " (in transition)" : ""));
  }
  const auto g = static_cast<std::int64_t>(grower.members.size());
  if (static_cast<std::int64_t>(partners.size()) != g) {
    return invalid_argument("force_grow: a group of " + std::to_string(g) + " grows with " + std::to_string(g) +
                            " partners, not " + std::to_string(partners.size()));
  }
  if (!planner_.degree_allowed(2 * g, shape_)) {
    return invalid_argument("force_grow: degree " + std::to_string(2 * g) + " is not an allowed degree");
  }
  std::int64_t merged = -1;
  std::unordered_set<std::int64_t> seen;
  for (std::int64_t m : partners) {
    if (m < 0 || (shape_.num_instances > 0 && m >= shape_.num_instances)) {
      return invalid_argument("force_grow: no instance " + std::to_string(m));
    }
    if (!seen.insert(m).second) return invalid_argument("force_grow: instance " + std::to_string(m) + " twice");
  }
  const std::int64_t first = group_of(partners.front());
  if (first >= 0) {
    // A merge: the partners are another dropped group of the same degree, in its stage order.
    const GroupInfo& other = groups_.at(first);
    if (first == group_id || other.members != partners || other.state != GroupState::kDropped || other.in_transition()) {
      return failed_precondition("force_grow: partners must be independent instances or every member of another dropped "
                                 "group in its stage order");
    }
    merged = first;
  } else {
    for (std::int64_t m : partners) {
      if (group_of(m) >= 0) {
        return failed_precondition("force_grow: instance " + std::to_string(m) + " is in group " + std::to_string(group_of(m)));
      }
    }
  }
  std::vector<std::int64_t> order;
  for (std::int64_t j = 0; j < g; ++j) {
    order.push_back(grower.members[static_cast<std::size_t>(j)]);
    order.push_back(partners[static_cast<std::size_t>(j)]);
  }
  std::vector<std::int64_t> absorbs{group_id};
  if (merged >= 0) absorbs.push_back(merged);
  for (std::int64_t old : absorbs) dissolve_absorbed(old, now_us);
  DropAction a = create_group(order, now_us, "forced growth", /*forced=*/true);
  a.absorbs = absorbs;
  return a;
}

StatusOr<ShrinkAction> Coordinator::force_shrink(std::int64_t group_id, std::int64_t now_us) {
  auto it = groups_.find(group_id);
  if (it == groups_.end()) return not_found("force_shrink: no group " + std::to_string(group_id));
  GroupInfo& g = it->second;
  if (g.state != GroupState::kDropped || g.in_transition()) {
    return failed_precondition("force_shrink: group " + std::to_string(group_id) + " is " + group_state_name(g.state) +
                               (g.in_transition() ? " (in transition)" : ""));
  }
  const auto degree = static_cast<std::int64_t>(g.members.size());
  if (degree < 4 || degree % 2 != 0) {
    return failed_precondition("force_shrink: group " + std::to_string(group_id) + " has degree " + std::to_string(degree) +
                               "; a shrink needs an even degree >= 4");
  }
  PlannedShrink plan;
  plan.group = group_id;
  plan.halves.assign(2, {});
  for (std::int64_t s = 0; s < degree; ++s) plan.halves[static_cast<std::size_t>(s % 2)].push_back(g.members[static_cast<std::size_t>(s)]);
  return request_shrink(g, plan, now_us, "forced");
}

void Coordinator::abandon_growth(std::int64_t group_id, const std::vector<AbsorbedGroup>& absorbed, std::int64_t now_us) {
  GroupInfo& g = live_group(group_id);
  KUN_CHECK(g.drop_pending && g.state == GroupState::kInitial) << "group " << group_id << ": growth abandoned after its drop";
  record(now_us, g, EventKind::kRestoreDone, g.state, g.state, -1, false, "growth failed; the groups it absorbed stay");
  for (std::int64_t m : g.members) group_of_.erase(m);
  monitor_.reset_group(group_id);
  groups_.erase(group_id);
  for (const AbsorbedGroup& a : absorbed) {
    KUN_CHECK(groups_.count(a.id) == 0) << "group " << a.id << " is live";
    add_dropped_group(a.id, a.members, now_us);
  }
  replan_due_ = true;
}

void Coordinator::abandon_shrink(std::int64_t group_id, std::int64_t now_us) {
  GroupInfo& g = live_group(group_id);
  KUN_CHECK(g.shrink_pending) << "group " << group_id << ": shrink abandoned without a shrink request";
  g.shrink_pending = false;
  g.shrink_into.clear();
  monitor_.reset_group(group_id);
  record(now_us, g, EventKind::kShrinkDone, g.state, g.state, -1, false, "shrink failed; the group stays whole");
  replan_due_ = true;
}

Actions Coordinator::tick(std::int64_t now_us, const std::vector<InstanceSnapshot>& snapshots) {
  switch (config_.policy) {
    case Policy::kKunServe: return tick_kunserve(now_us, snapshots);
    case Policy::kMigrate: {
      Actions a;
      a.migrations = migration_.plan(now_us, snapshots);
      for (const MigrateAction& m : a.migrations) {
        KUN_LOG(kDebug) << "cluster: migrate request " << m.request << " " << m.from << "->" << m.to << ": "
                        << m.reason;
      }
      return a;
    }
    case Policy::kRecompute:
    case Policy::kSwap: return {};
  }
  return {};
}

Actions Coordinator::tick_kunserve(std::int64_t now_us, const std::vector<InstanceSnapshot>& snapshots) {
  Actions actions;
  std::unordered_map<std::int64_t, const InstanceSnapshot*> by_id;
  for (const InstanceSnapshot& s : snapshots) {
    const bool inserted = by_id.emplace(s.instance, &s).second;
    KUN_CHECK(inserted) << "instance " << s.instance << " appears twice in one tick";
  }

  // 1. Sample: independent instances one by one, dropped groups as a whole.
  std::vector<InstanceSnapshot> independent;
  bool sampled = false;  // votes only change on new samples; plan at most once per sample
  for (const InstanceSnapshot& s : snapshots) {
    if (group_of(s.instance) >= 0) continue;
    sampled = monitor_.observe_instance(s.instance, sample_of(s, now_us)) || sampled;
    independent.push_back(s);
  }
  for (auto& [id, g] : groups_) {
    if (g.state != GroupState::kDropped || g.in_transition()) continue;
    std::vector<const InstanceSnapshot*> members;
    for (std::int64_t m : g.members) {
      auto it = by_id.find(m);
      if (it != by_id.end()) members.push_back(it->second);
    }
    if (members.size() != g.members.size()) continue;  // incomplete view: skip this round
    // The members dropped L (g - 1) layers between them; their pages now hold KV blocks.
    const auto g_members = static_cast<std::int64_t>(g.members.size());
    const std::int64_t lent = shape_.layer_block_bytes > 0
                                  ? shape_.num_layers * (g_members - 1) * shape_.layer_param_bytes / shape_.layer_block_bytes
                                  : 0;
    monitor_.observe_group(id, sample_of_group(members, now_us, lent));
    if (config_.planner.shrink_groups && g_members >= 4 && g_members % 2 == 0 && shape_.layer_block_bytes > 0) {
      // Against the capacity of its two halves: they lend L (g - 2) layers, one L less.
      monitor_.observe_group_shrink(id, sample_of_group(members, now_us, shape_.num_layers * shape_.layer_param_bytes /
                                                                             shape_.layer_block_bytes));
    }
    sampled = monitor_.observe_group_load(id, sample_of_group(members, now_us, 0)) || sampled;
  }

  // 2. Restores, per group.
  if (config_.enable_restore) {
    for (auto& [id, g] : groups_) {
      if (g.state != GroupState::kDropped || g.in_transition()) continue;
      const auto degree = static_cast<std::int64_t>(g.members.size());
      if (config_.planner.shrink_groups && degree >= 4 && degree % 2 == 0 && monitor_.group_vote(id) != Vote::kRestore) {
        // Partial restore: while the group's demand fits its halves but not yet its members
        // alone, a group of 4 or more halves (8 -> 4 -> 2 -> 1 as demand falls); once it fits
        // the members alone it restores whole, as a group of 2 does.
        if (monitor_.group_shrink_vote(id) != Vote::kRestore) continue;
        GroupView v;
        v.id = id;
        for (std::int64_t m : g.members) {
          auto it = by_id.find(m);
          if (it != by_id.end()) v.members.push_back(it->second);
        }
        if (v.members.size() != g.members.size()) continue;
        const PlannedShrink ps = planner_.plan_shrink(v, shape_);
        if (!ps.covers) continue;
        const DemandMonitor::Window* w = monitor_.group_shrink_window(id);
        std::ostringstream why;
        why << "group demand against its halves' capacity " << w->samples.back().demand << " <= "
            << config_.monitor.restore_demand_threshold << ", nothing queued, falling for " << w->restore_streak
            << " samples; " << ps.reason;
        actions.shrinks.push_back(request_shrink(g, ps, now_us, why.str()));
        continue;
      }
      if (monitor_.group_vote(id) != Vote::kRestore) continue;
      const DemandMonitor::Window* w = monitor_.group_window(id);
      std::ostringstream why;
      why << "group demand against its split capacity " << w->samples.back().demand << " <= "
          << config_.monitor.restore_demand_threshold
          << ", nothing queued, falling (slope " << least_squares_slope(w->samples) << "/sample over "
          << w->samples.size() << " samples) for " << w->restore_streak << " samples";
      actions.restores.push_back(request_restore(g, now_us, why.str(), false));
    }
  }

  // 3. Drops, only while nothing is in transition, and only when a vote may have changed (a
  // group that just finished a transition frees instances, so a new plan is also due then).
  if (any_in_transition()) return actions;
  if (!sampled && !replan_due_) return actions;
  replan_due_ = false;
  std::vector<std::int64_t> overloaded;
  for (const InstanceSnapshot& s : independent) {
    if (monitor_.instance_vote(s.instance) == Vote::kDrop) overloaded.push_back(s.instance);
  }
  // Demand trend: growth over the newest trend_samples samples, projected over the horizon.
  const PlannerConfig& pc = config_.planner;
  const bool trend = pc.trend_horizon_samples > 0.0;
  const auto projected_growth = [&](const DemandMonitor::Window* w, std::int64_t capacity_tokens) -> std::int64_t {
    if (!trend || w == nullptr) return 0;
    const double per_sample = recent_growth_per_sample(w->samples, pc.trend_samples);
    return static_cast<std::int64_t>(per_sample * pc.trend_horizon_samples * static_cast<double>(capacity_tokens));
  };
  // Fused groups whose load against their fused capacity votes for more memory.
  std::vector<GroupView> views;
  bool any_group_overloaded = false;
  if (config_.planner.grow_groups) {
    for (auto& [id, g] : groups_) {
      if (g.state != GroupState::kDropped || g.in_transition()) continue;
      GroupView v;
      v.id = id;
      for (std::int64_t m : g.members) {
        auto it = by_id.find(m);
        if (it != by_id.end()) v.members.push_back(it->second);
      }
      if (v.members.size() != g.members.size()) continue;
      v.overloaded = monitor_.group_load_vote(id) == Vote::kDrop;
      const std::int64_t capacity = Planner::group_capacity_tokens(v.members, shape_);
      v.growth_tokens = projected_growth(monitor_.group_load_window(id), capacity);
      if (!v.overloaded && pc.grow_on_trend && v.growth_tokens > 0 &&
          static_cast<double>(Planner::group_demand_tokens(v.members, shape_) + v.growth_tokens) >
              pc.target_utilization * static_cast<double>(capacity)) {
        v.overloaded = true;  // short before the horizon: grow now, not after the next vote
      }
      any_group_overloaded = any_group_overloaded || v.overloaded;
      views.push_back(std::move(v));
    }
  }
  if (overloaded.empty() && !any_group_overloaded) return actions;
  std::vector<std::int64_t> taken;
  if (!overloaded.empty()) {
    std::unordered_map<std::int64_t, std::int64_t> growth;
    if (trend) {
      for (const InstanceSnapshot& s : independent) {
        const std::int64_t t = projected_growth(monitor_.instance_window(s.instance), independent_capacity_tokens(s, shape_));
        if (t > 0) growth.emplace(s.instance, t);
      }
    }
    Plan plan = planner_.plan(independent, overloaded, shape_, growth);
    for (const std::string& note : plan.notes) KUN_LOG(kInfo) << "cluster: planner: " << note;
    for (PlannedGroup& pg : plan.groups) {
      taken.insert(taken.end(), pg.instances.begin(), pg.instances.end());
      actions.drops.push_back(create_group(pg.instances, now_us, pg.reason, false));
    }
  }
  if (any_group_overloaded) {
    std::vector<InstanceSnapshot> free;
    for (const InstanceSnapshot& s : independent) {
      if (std::find(taken.begin(), taken.end(), s.instance) == taken.end()) free.push_back(s);
    }
    for (PlannedGrowth& pg : planner_.plan_growth(views, free, shape_)) {
      for (std::int64_t old : pg.absorbs) dissolve_absorbed(old, now_us);
      DropAction a = create_group(pg.instances, now_us, pg.reason, false);
      a.absorbs = pg.absorbs;
      actions.drops.push_back(std::move(a));
    }
  }
  return actions;
}

}  // namespace kun::cluster
