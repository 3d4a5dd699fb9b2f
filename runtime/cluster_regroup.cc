// Regrouping a live fused group (issue 15): growth g -> 2g and partial restore (shrink) 2g -> g,
// carried out from the same pure plans the simulator carries out (cluster/transition_plan.h):
//  * growth is cluster::plan_drop over members that already hold a part of the layers (an
//    absorbed group's members hold their stage, an absorbed instance holds every layer): each
//    member drops the layers its new stage does not keep (their pages become KV pages), the
//    running requests keep their KV where it is and the layers now run by another member reach it
//    by remote attention until the live exchange moves them (as after a drop);
//  * shrink is cluster::plan_shrink: stop-and-copy at a step boundary, each running request's KV
//    is gathered onto the half it continues on, each member reclaims a layer's pages from its KV
//    pool (repacking live blocks inside the device) and pulls the layers its new stage adds.
// Both run under transition_mu_ in the style of drop_locked / restore_locked; the transfer steps
// (hand_dropped_layers_to_kv, move_request_layer, pull_layer_into) are separate calls so that
// they can move out of the lock with the rest of the control path.
#include <algorithm>
#include <chrono>
#include <set>

#include "common/check.h"
#include "common/log.h"
#include "runtime/cluster_runtime.h"

namespace kun::runtime {
namespace {

std::int64_t stage_begin(std::int64_t k, std::int64_t g, std::int64_t L) { return k * L / g; }

}  // namespace

std::vector<std::int64_t> ClusterRuntime::merged_admission_history(const std::vector<std::vector<std::int64_t>>& histories) {
  std::size_t longest = 0;
  for (const auto& h : histories) longest = std::max(longest, h.size());
  std::vector<std::int64_t> history;
  for (std::size_t i = 0; i < longest; ++i) {
    for (const auto& h : histories) {
      if (h.size() + i >= longest) history.push_back(h[h.size() + i - longest]);
    }
  }
  return history;
}

std::int64_t ClusterRuntime::hand_dropped_layers_to_kv(const cluster::DropPlan& plan) {
  std::int64_t dropped_bytes = 0;
  for (const cluster::MemberLayout& layout : plan.members) {
    kv::KvBlockAllocator& alloc = *allocators_[static_cast<std::size_t>(layout.instance)];
    for (std::int64_t l : layout.layers_dropped) {
      // Past the commit point (the layers were checked there): a failure is a broken invariant.
      StatusOr<std::vector<std::int64_t>> pages_or = client().drop_layer(endpoint(layout.instance), l);
      KUN_CHECK(pages_or.ok()) << "drop of layer " << l << " on device " << layout.instance << ": " << pages_or.status().to_string();
      std::vector<memory::PageId> pages;
      for (std::int64_t p : *pages_or) pages.push_back(memory::PageId(p));
      KUN_CHECK_OK(alloc.add_pages(pages));
      mirror_set_layer(layout.instance, l, false);
      dropped_bytes += static_cast<std::int64_t>(pages.size()) * fleet_->geometry(static_cast<int>(layout.instance)).page_bytes;
    }
  }
  return dropped_bytes;
}

std::int64_t ClusterRuntime::move_request_layer(const std::vector<std::int64_t>& instances,
                                                std::map<std::int32_t, kv::BlockTable>& tables, const cluster::LayerMove& move) {
  const std::int64_t src = instances[static_cast<std::size_t>(move.from)];
  const std::int64_t dst = instances[static_cast<std::size_t>(move.to)];
  kv::KvBlockAllocator& dst_alloc = *allocators_[static_cast<std::size_t>(dst)];
  KUN_CHECK(tables.count(move.to) != 0 && tables.count(move.from) != 0) << "layer " << move.layer << " move without a table";
  kv::BlockTable& to = tables.at(move.to);
  KUN_CHECK_OK(to.add_layer(move.layer, dst_alloc));
  const std::vector<kv::BlockId> from = tables.at(move.from).release_layer(move.layer);
  move_kv(src, from, dst, to.layer_blocks(move.layer), TransferKind::kKvExchange);
  allocators_[static_cast<std::size_t>(src)]->free(from);
  return static_cast<std::int64_t>(from.size());
}

std::int64_t ClusterRuntime::pull_layer_into(std::int64_t inst, std::int64_t layer, std::int64_t owner,
                                             const std::function<std::int64_t(std::span<const kv::BlockMove>)>& remap,
                                             std::int64_t* repacked) {
  // Past the commit point: the plan sized the pool so these pages exist (free blocks, repacked).
  StatusOr<std::vector<memory::PageId>> pages_or = reclaim_layer_pages(inst, remap, repacked);
  KUN_CHECK(pages_or.ok()) << "layer " << layer << " on device " << inst << ": " << pages_or.status().to_string();
  std::vector<std::int64_t> pages;
  for (memory::PageId page : *pages_or) pages.push_back(page.value);
  const Status pulled = client().pull_layer(endpoint(inst), layer, endpoint(owner), pages);
  KUN_CHECK(pulled.ok()) << "pull of layer " << layer << " by device " << inst << " from " << owner << ": " << pulled.to_string();
  mirror_set_layer(inst, layer, true);
  return fleet_->geometry(static_cast<int>(owner)).layer_segment_bytes;
}

void ClusterRuntime::run_policy_round() {
  std::unique_lock lock(transition_mu_);
  const cluster::Actions actions = coordinator_->tick(clock_->now_us(), snapshots_of(units_));
  if (!actions.empty()) run_actions(actions);
  finish_gathered_restores();
}

StatusOr<std::int64_t> ClusterRuntime::grow(std::int64_t group, const std::vector<std::int64_t>& partners) {
  std::unique_lock lock(transition_mu_);
  KUN_ASSIGN_OR_RETURN(cluster::DropAction action, coordinator_->force_grow(group, partners, clock_->now_us()));
  KUN_RETURN_IF_ERROR(run_growth_locked(action));
  return action.group;
}

StatusOr<std::vector<std::int64_t>> ClusterRuntime::shrink(std::int64_t group) {
  std::unique_lock lock(transition_mu_);
  KUN_ASSIGN_OR_RETURN(cluster::ShrinkAction action, coordinator_->force_shrink(group, clock_->now_us()));
  KUN_RETURN_IF_ERROR(run_shrink_locked(action));
  return action.new_groups;
}

Status ClusterRuntime::run_growth_locked(const cluster::DropAction& action) {
  // The groups absorbed, as they are now, so that a failed growth can give them back.
  std::vector<cluster::Coordinator::AbsorbedGroup> absorbed;
  for (std::int64_t id : action.absorbs) {
    for (const auto& u : units_) {
      if (u->group == id) absorbed.push_back(cluster::Coordinator::AbsorbedGroup{id, u->instances});
    }
  }
  StatusOr<std::int64_t> grown = grow_locked(action);
  if (!grown.ok()) {
    record_failure("grow", action.group, action.instances, grown.status());
    coordinator_->abandon_growth(action.group, absorbed, clock_->now_us());
    return grown.status();
  }
  coordinator_->on_drop_done(action.group, clock_->now_us());
  return ok_status();
}

Status ClusterRuntime::run_shrink_locked(const cluster::ShrinkAction& action) {
  std::vector<std::int64_t> instances;
  for (const auto& half : action.halves) instances.insert(instances.end(), half.begin(), half.end());
  Status s = shrink_locked(action);
  if (!s.ok()) {
    record_failure("shrink", action.group, instances, s);
    coordinator_->abandon_shrink(action.group, clock_->now_us());
    return s;
  }
  coordinator_->on_shrink_done(action.group, clock_->now_us());
  return ok_status();
}

StatusOr<std::int64_t> ClusterRuntime::grow_locked(const cluster::DropAction& action) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<std::int64_t>& instances = action.instances;
  const std::int64_t group = action.group;
  const auto g = static_cast<std::int64_t>(instances.size());
  const std::int64_t L = config_.num_layers;
  // The units giving their members, in order of first appearance: the absorbed groups and
  // instances. Each absorbed group must come whole.
  std::vector<std::shared_ptr<Unit>> sources;
  for (std::int64_t inst : instances) {
    Unit* u = unit_of_instance(inst);
    if (u == nullptr) return failed_precondition("instance " + std::to_string(inst) + " has no unit");
    if (u->group >= 0 && std::find(action.absorbs.begin(), action.absorbs.end(), u->group) == action.absorbs.end()) {
      return failed_precondition("instance " + std::to_string(inst) + " is in group " + std::to_string(u->group) +
                                 ", which the growth does not absorb");
    }
    if (u->restoring.load() || u->gathered.load()) {
      return failed_precondition("group " + std::to_string(u->group) + " is restoring");
    }
    auto it = std::find_if(units_.begin(), units_.end(), [&](const auto& p) { return p.get() == u; });
    if (std::find(sources.begin(), sources.end(), *it) == sources.end()) sources.push_back(*it);
  }
  for (const auto& s : sources) {
    for (std::int64_t inst : s->instances) {
      if (std::find(instances.begin(), instances.end(), inst) == instances.end()) {
        return failed_precondition("group " + std::to_string(s->group) + " is absorbed without its member " + std::to_string(inst));
      }
    }
  }
  const auto member_index = [&](std::int64_t inst) {
    return static_cast<std::int32_t>(std::find(instances.begin(), instances.end(), inst) - instances.begin());
  };
  for (auto& s : sources) close_gate(*s);
  // The plan, from every source's requests at a step boundary; a member holds the layers of its
  // stage in its source (all of them when it was independent).
  cluster::DropInput input;
  input.group = group;
  input.members = instances;
  input.strategy = options_.stale_kv;
  std::vector<std::vector<std::int32_t>> member_of_device;
  for (auto& s : sources) {
    s->engine->pause();
    s->engine->quiesce();
    std::vector<std::int32_t> m;
    for (std::int64_t inst : s->instances) m.push_back(member_index(inst));
    member_of_device.push_back(std::move(m));
  }
  for (std::int64_t inst : instances) {
    Unit* u = unit_of_instance(inst);
    const auto src_g = static_cast<std::int64_t>(u->instances.size());
    const auto stage = static_cast<std::int64_t>(std::find(u->instances.begin(), u->instances.end(), inst) - u->instances.begin());
    input.held_begin.push_back(stage_begin(stage, src_g, L));
    input.held_end.push_back(stage_begin(stage + 1, src_g, L));
  }
  for (std::size_t k = 0; k < sources.size(); ++k) {
    for (cluster::TransitionRequest& r : cluster::transition_requests(sources[k]->engine->scheduler(), *sources[k]->kv, member_of_device[k])) {
      input.requests.push_back(std::move(r));
    }
  }
  const cluster::DropPlan plan = cluster::plan_drop(input, transition_geometry());
  // Commit point: nothing has moved yet, so a failure here rolls back by reopening the sources.
  Status commit = options_.transition_fault ? options_.transition_fault("grow", group) : ok_status();
  for (std::size_t k = 0; commit.ok() && k < plan.members.size(); ++k) {
    for (std::int64_t l : plan.members[k].layers_dropped) {
      if (!mirror_has_layer(plan.members[k].instance, l)) {
        commit = failed_precondition("device " + std::to_string(plan.members[k].instance) + " does not hold layer " + std::to_string(l));
      }
    }
  }
  if (!commit.ok()) {
    const std::shared_ptr<const Routing> r = routing();
    for (auto& s : sources) {
      reopen_gate(*s, *r);
      s->engine->resume();
    }
    return commit;
  }
  record_plan("grow", group, plan.to_string());
  std::vector<std::vector<std::int64_t>> histories;
  for (auto& s : sources) histories.push_back(s->engine->scheduler().admission_history());
  const std::vector<std::int64_t> history = merged_admission_history(histories);
  // Every request leaves its source; those the plan keeps with KV take their tables, re-keyed
  // from the source's device index to the new member index.
  std::set<RequestId> keep;
  for (const cluster::StaleKvPlan& s : plan.keep_kv) keep.insert(s.id);
  std::map<RequestId, engine::Engine::Detached> detached;
  std::map<RequestId, std::map<std::int32_t, kv::BlockTable>> tables_of;
  std::vector<RequestId> stale_ids;
  for (const cluster::TransitionRequest& r : input.requests) {
    if (r.running) stale_ids.push_back(r.id);
  }
  for (std::size_t k = 0; k < sources.size(); ++k) {
    Unit& s = *sources[k];
    for (RequestId id : s.engine->scheduler().request_ids_in_order()) {
      const bool with_kv = keep.count(id) != 0;
      auto d = s.engine->detach(id, /*keep_kv=*/with_kv);
      KUN_CHECK(d.has_value());
      if (with_kv) {
        std::map<std::int32_t, kv::BlockTable> rekeyed;
        for (auto& [device, table] : s.kv->export_tables(id)) {
          rekeyed.emplace(member_of_device[k][static_cast<std::size_t>(device)], std::move(table));
        }
        tables_of.emplace(id, std::move(rekeyed));
      }
      detached.emplace(id, std::move(*d));
    }
  }
  const std::int64_t dropped_bytes = hand_dropped_layers_to_kv(plan);
  auto unit = make_unit(instances, group);
  unit->engine->mutable_scheduler().set_admission_history(history);
  // Running requests keep their KV where it is; the grown group's KvManager knows which layers
  // are away from the stage that now runs them (the plan's moves): remote attention reaches them,
  // and under `exchange` the unit moves them home layer by layer between steps.
  const std::int64_t bs = options_.device.kv_block_size;
  {
    std::lock_guard<std::mutex> rl(requests_mu_);
    for (const cluster::StaleKvPlan& s : plan.keep_kv) {
      std::map<std::int32_t, kv::BlockTable> tables = std::move(tables_of.at(s.id));
      for (std::int64_t j = 0; j < g; ++j) {
        if (tables.count(static_cast<std::int32_t>(j)) != 0) continue;
        kv::BlockTable none(bs, 0, 0);  // no layers yet; the exchange adds them
        KUN_CHECK_OK(none.append_tokens(s.tokens, *allocators_[static_cast<std::size_t>(instances[static_cast<std::size_t>(j)])]));
        tables.emplace(static_cast<std::int32_t>(j), std::move(none));
      }
      for (const auto& [j, t] : tables) KUN_CHECK_EQ(t.num_tokens(), s.tokens) << "request " << s.id << " on member " << j;
      unit->kv->import_tables(s.id, s.tokens, std::move(tables));
      KUN_CHECK_EQ(unit->kv->misplaced_layers(s.id).size(), s.moves.size()) << "request " << s.id << " against its plan";
      request_instance_[s.id] = instances.front();
      unit->engine->adopt_with_imported_kv(std::move(detached.at(s.id)));
    }
    for (RequestId id : plan.queue) {
      request_instance_[id] = instances.front();
      KUN_CHECK_OK(unit->engine->adopt(std::move(detached.at(id)), /*with_kv=*/false));
    }
  }
  const auto moved = static_cast<std::int64_t>(plan.keep_kv.size() + plan.queue.size());
  KUN_CHECK_EQ(moved, static_cast<std::int64_t>(detached.size())) << "growth into group " << group << " lost a request";
  launch(*unit);
  // Publish: the grown group replaces its sources, whose gates retire handing what queued to it.
  units_.erase(std::remove_if(units_.begin(), units_.end(),
                              [&](const auto& u) { return std::find(sources.begin(), sources.end(), u) != sources.end(); }),
               units_.end());
  units_.push_back(std::move(unit));
  std::shared_ptr<const Routing> next = build_routing_locked();
  for (auto& s : sources) retire_gate(*s, *next);
  publish_routing(std::move(next));
  for (auto& s : sources) retire(s);
  sources.clear();
  ClusterEvent ev;
  ev.time_us = clock_->now_us();
  ev.kind = "grow";
  ev.group = group;
  ev.instances = instances;
  ev.bytes = dropped_bytes;
  ev.latency_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ev.requests_moved = moved;
  ev.requests_recomputed = static_cast<std::int64_t>(plan.lose_kv.size());
  ev.stale_requests = std::move(stale_ids);
  std::string absorbed;
  for (std::int64_t a : action.absorbs) absorbed += (absorbed.empty() ? "" : ",") + std::to_string(a);
  ev.reason = action.reason + "; grew from group(s) " + absorbed + " to degree " + std::to_string(g) + "; " +
              std::to_string(plan.keep_kv.size()) + " running requests keep their KV (" +
              cluster::stale_kv_strategy_name(options_.stale_kv) + "), " + std::to_string(plan.lose_kv.size()) + " recompute";
  record(std::move(ev));
  return group;
}

Status ClusterRuntime::shrink_locked(const cluster::ShrinkAction& action) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::int64_t group = action.group;
  auto it = std::find_if(units_.begin(), units_.end(), [&](const auto& u) { return u->group == group; });
  if (it == units_.end()) return not_found("no fused group " + std::to_string(group));
  std::shared_ptr<Unit> unit = *it;
  if (unit->restoring.load() || unit->gathered.load()) return failed_precondition("group " + std::to_string(group) + " is restoring");
  const std::vector<std::int64_t> instances = unit->instances;
  const auto g = static_cast<std::int64_t>(instances.size());
  if (g < 4 || g % 2 != 0) return failed_precondition("a shrink needs an even degree >= 4, not " + std::to_string(g));
  const std::int64_t L = config_.num_layers;
  const cluster::TransitionGeometry geo = transition_geometry();
  const auto member_alloc = [&](std::int64_t k) -> kv::KvBlockAllocator& {
    return *allocators_[static_cast<std::size_t>(instances[static_cast<std::size_t>(k)])];
  };
  // Only the group stops: its gate closes (what is routed to it meanwhile goes to its halves).
  close_gate(*unit);
  unit->engine->pause();
  unit->engine->quiesce();
  cluster::ShrinkInput input;
  input.group = group;
  input.members = instances;
  input.strategy = options_.stale_kv;
  for (std::int64_t k = 0; k < g; ++k) {
    std::int64_t held = 0;
    for (std::int64_t l = 0; l < L; ++l) held += mirror_has_layer(instances[static_cast<std::size_t>(k)], l) ? 1 : 0;
    // The member's pool as an independent instance: its pool now less the pages its dropped layers lent.
    input.base_kv_blocks.push_back(member_alloc(k).num_total() - (L - held) * geo.pages_per_layer * geo.blocks_per_page);
  }
  std::vector<std::int32_t> stages(static_cast<std::size_t>(g));
  for (std::int64_t k = 0; k < g; ++k) stages[static_cast<std::size_t>(k)] = static_cast<std::int32_t>(k);
  input.requests = cluster::transition_requests(unit->engine->scheduler(), *unit->kv, stages);
  const cluster::ShrinkPlan plan = cluster::plan_shrink(input, geo);
  KUN_CHECK(plan.halves == action.halves) << "shrink of group " << group << ": plan and action disagree on the halves";
  // Commit point: nothing has moved yet. Besides the fault hook, the carrying out is checked on
  // block counts first: each gather copy allocates on its destination before it frees its source,
  // so every member must have the blocks at every point, and end within its room after the shrink.
  Status commit = options_.transition_fault ? options_.transition_fault("shrink", group) : ok_status();
  if (commit.ok()) {
    std::vector<std::int64_t> used(static_cast<std::size_t>(g)), total(static_cast<std::size_t>(g));
    for (std::int64_t k = 0; k < g; ++k) {
      total[static_cast<std::size_t>(k)] = member_alloc(k).num_total();
      used[static_cast<std::size_t>(k)] = total[static_cast<std::size_t>(k)] - member_alloc(k).num_free();
    }
    std::map<RequestId, const cluster::TransitionRequest*> by_id;
    for (const cluster::TransitionRequest& r : input.requests) by_id[r.id] = &r;
    for (const cluster::Landing& l : plan.queued) {
      const cluster::TransitionRequest& r = *by_id.at(l.id);
      if (!l.lost_kv || !r.running) continue;
      for (std::int32_t m : r.layer_member) used[static_cast<std::size_t>(m)] -= geo.token_blocks(r.tokens_held);
    }
    for (const cluster::Placement& p : plan.keep_kv) {
      const std::int64_t tb = geo.token_blocks(p.tokens);
      for (const cluster::LayerMove& m : p.moves) {
        used[static_cast<std::size_t>(m.to)] += tb;
        if (used[static_cast<std::size_t>(m.to)] > total[static_cast<std::size_t>(m.to)] && commit.ok()) {
          commit = resource_exhausted("shrink of group " + std::to_string(group) + ": device " +
                                      std::to_string(instances[static_cast<std::size_t>(m.to)]) + " is short of blocks to gather request " +
                                      std::to_string(p.id.value));
        }
        used[static_cast<std::size_t>(m.from)] -= tb;
      }
    }
    for (std::int64_t k = 0; commit.ok() && k < g; ++k) {
      if (used[static_cast<std::size_t>(k)] > plan.room_blocks[static_cast<std::size_t>(k)]) {
        commit = resource_exhausted("shrink of group " + std::to_string(group) + ": device " +
                                    std::to_string(instances[static_cast<std::size_t>(k)]) + " would keep " +
                                    std::to_string(used[static_cast<std::size_t>(k)]) + " blocks in a pool of " +
                                    std::to_string(plan.room_blocks[static_cast<std::size_t>(k)]));
      }
    }
  }
  if (!commit.ok()) {
    reopen_gate(*unit, *routing());
    unit->engine->resume();
    return commit;
  }
  record_plan("shrink", group, plan.to_string());
  const std::vector<std::int64_t> history = unit->engine->scheduler().admission_history();
  // Every request leaves the group; those the rule may keep take their tables along.
  std::map<RequestId, engine::Engine::Detached> detached;
  std::map<RequestId, std::map<std::int32_t, kv::BlockTable>> tables_of;
  for (const cluster::TransitionRequest& r : input.requests) {
    const bool keep = options_.stale_kv != cluster::StaleKvStrategy::kRecompute && r.running;
    auto d = unit->engine->detach(r.id, keep);
    KUN_CHECK(d.has_value());
    if (keep) tables_of.emplace(r.id, unit->kv->export_tables(r.id));
    detached.emplace(r.id, std::move(*d));
  }
  std::int64_t recomputed = 0;
  for (const cluster::Landing& l : plan.queued) {
    if (!l.lost_kv) continue;
    ++recomputed;
    auto tit = tables_of.find(l.id);
    if (tit == tables_of.end()) continue;
    for (auto& [k, t] : tit->second) t.free_all(member_alloc(k));
    tables_of.erase(tit);
  }
  // Each kept request's layers held away from its half's stage owners are copied there
  // (stop-and-copy); its tables then move to the half, keyed by the half's stage index.
  std::int64_t exchanged_blocks = 0;
  std::map<RequestId, std::map<std::int32_t, kv::BlockTable>> half_tables;
  std::vector<std::int64_t> half_of(static_cast<std::size_t>(g)), stage_in_half(static_cast<std::size_t>(g));
  for (std::size_t h = 0; h < 2; ++h) {
    for (std::size_t j = 0; j < plan.half_members[h].size(); ++j) {
      half_of[static_cast<std::size_t>(plan.half_members[h][j])] = static_cast<std::int64_t>(h);
      stage_in_half[static_cast<std::size_t>(plan.half_members[h][j])] = static_cast<std::int64_t>(j);
    }
  }
  const std::int64_t h_degree = g / 2;
  for (const cluster::Placement& p : plan.keep_kv) {
    auto& tables = tables_of.at(p.id);
    for (const cluster::LayerMove& m : p.moves) exchanged_blocks += move_request_layer(instances, tables, m);
    std::map<std::int32_t, kv::BlockTable> mine;
    for (auto& [k, t] : tables) {
      if (half_of[static_cast<std::size_t>(k)] != p.member) {
        KUN_CHECK_EQ(t.num_layers(), 0) << "request " << p.id << " left layers on member " << k << " of the other half";
        t.free_all(member_alloc(k));
        continue;
      }
      const std::int64_t j = stage_in_half[static_cast<std::size_t>(k)];
      KUN_CHECK_EQ(t.num_layers(), stage_begin(j + 1, h_degree, L) - stage_begin(j, h_degree, L))
          << "request " << p.id << " on member " << k << " after the gather";
      mine.emplace(static_cast<std::int32_t>(j), std::move(t));
    }
    KUN_CHECK_EQ(static_cast<std::int64_t>(mine.size()), h_degree) << "request " << p.id;
    half_tables.emplace(p.id, std::move(mine));
  }
  // The weights: each member takes a layer's pages back from its KV pool (the kept requests'
  // blocks on it are remapped when live blocks are repacked) and pulls the layer from the old
  // stage that kept it.
  std::int64_t pulled_bytes = 0, repacked_blocks = 0;
  for (const cluster::WeightPull& wp : plan.pulls) {
    const std::int64_t h = half_of[static_cast<std::size_t>(wp.member)];
    const auto j = static_cast<std::int32_t>(stage_in_half[static_cast<std::size_t>(wp.member)]);
    const auto remap = [&](std::span<const kv::BlockMove> moves) {
      std::int64_t remapped = 0;
      for (const cluster::Placement& p : plan.keep_kv) {
        if (p.member == h) remapped += half_tables.at(p.id).at(j).remap_blocks(moves);
      }
      return remapped;
    };
    pulled_bytes += pull_layer_into(instances[static_cast<std::size_t>(wp.member)], wp.layer,
                                    instances[static_cast<std::size_t>(wp.from)], remap, &repacked_blocks);
  }
  for (std::int64_t inst : instances) {
    auto snap = client().check_integrity(endpoint(inst));
    KUN_CHECK(snap.ok()) << "device " << inst << ": " << snap.status().to_string();
    KUN_CHECK_EQ(snap->kv_pages, allocators_[static_cast<std::size_t>(inst)]->num_pages()) << "device " << inst;
  }
  std::vector<std::shared_ptr<Unit>> halves;
  for (std::size_t h = 0; h < 2; ++h) {
    halves.push_back(make_unit(plan.halves[h], action.new_groups[h]));
    halves.back()->engine->mutable_scheduler().set_admission_history(history);
  }
  const auto moved = static_cast<std::int64_t>(plan.keep_kv.size() + plan.queued.size());
  KUN_CHECK_EQ(moved, static_cast<std::int64_t>(detached.size())) << "shrink of group " << group << " lost a request";
  {
    std::lock_guard<std::mutex> rl(requests_mu_);
    for (const cluster::Placement& p : plan.keep_kv) {
      Unit& u = *halves[static_cast<std::size_t>(p.member)];
      u.kv->import_tables(p.id, p.tokens, std::move(half_tables.at(p.id)));
      KUN_CHECK(u.kv->misplaced_layers(p.id).empty()) << "request " << p.id << " gathered onto half " << p.member;
      request_instance_[p.id] = u.instances.front();
      u.engine->adopt_with_imported_kv(std::move(detached.at(p.id)));
    }
    for (const cluster::Landing& l : plan.queued) {
      Unit& u = *halves[static_cast<std::size_t>(l.member)];
      request_instance_[l.id] = u.instances.front();
      KUN_CHECK_OK(u.engine->adopt(std::move(detached.at(l.id)), /*with_kv=*/false));
    }
  }
  for (auto& h : halves) launch(*h);
  // Publish: the halves replace the group, whose gate retires handing what queued to them.
  units_.erase(std::find(units_.begin(), units_.end(), unit));
  for (auto& h : halves) units_.push_back(h);
  std::shared_ptr<const Routing> next = build_routing_locked();
  retire_gate(*unit, *next);
  publish_routing(std::move(next));
  retire(unit);
  unit.reset();
  {
    std::lock_guard<std::mutex> el(events_mu_);
    kv_blocks_moved_ += exchanged_blocks;
  }
  ClusterEvent ev;
  ev.time_us = clock_->now_us();
  ev.kind = "shrink";
  ev.group = group;
  ev.instances = instances;
  ev.bytes = pulled_bytes;
  ev.latency_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ev.requests_moved = moved;
  ev.kv_blocks_exchanged = exchanged_blocks;
  ev.requests_recomputed = recomputed;
  ev.blocks_repacked = repacked_blocks;
  ev.reason = action.reason + "; into groups " + std::to_string(action.new_groups[0]) + " and " +
              std::to_string(action.new_groups[1]) + ": " + std::to_string(plan.keep_kv.size()) + " requests keep their KV (" +
              std::to_string(exchanged_blocks) + " blocks gathered, " + std::to_string(repacked_blocks) + " repacked), " +
              std::to_string(recomputed) + " recompute";
  record(std::move(ev));
  return ok_status();
}

}  // namespace kun::runtime
