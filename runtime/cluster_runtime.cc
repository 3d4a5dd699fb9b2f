#include "runtime/cluster_runtime.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <set>
#include <sstream>

#include "common/check.h"
#include "common/log.h"
#include "engine/restore_homes.h"

namespace kun::runtime {
namespace {

// Stage k of a g-way group holds layers [k L / g, (k + 1) L / g).
std::int64_t stage_begin(std::int64_t k, std::int64_t g, std::int64_t L) { return k * L / g; }
std::int64_t stage_of_layer(std::int64_t l, std::int64_t g, std::int64_t L) {
  for (std::int64_t k = 0; k < g; ++k) {
    if (l < stage_begin(k + 1, g, L)) return k;
  }
  return g - 1;
}

// A member's share of its unit's figures: a group's blocks are spread evenly over its g members,
// so sums over members stay exact (snapshots for the policy and stats for metrics both use it).
engine::InstanceStats member_share(engine::InstanceStats is, std::int64_t g) {
  is.kv_blocks_total /= g;
  is.kv_blocks_free /= g;
  is.blocks_demanded /= g;
  is.pending_blocks /= g;
  return is;
}

// Adds an engine's cumulative counters (not its gauges) into `into`.
void add_counters(const engine::ServingStats& from, engine::ServingStats* into) {
  into->num_preemptions += from.num_preemptions;
  into->recomputed_tokens_total += from.recomputed_tokens_total;
  into->transition_recomputed_tokens_total += from.transition_recomputed_tokens_total;
  into->prompt_tokens_total += from.prompt_tokens_total;
  into->generation_tokens_total += from.generation_tokens_total;
  into->requests_finished_total += from.requests_finished_total;
}

std::vector<std::int64_t> raw_ids(std::span<const kv::BlockId> ids) {
  std::vector<std::int64_t> out;
  out.reserve(ids.size());
  for (kv::BlockId b : ids) out.push_back(b.value);
  return out;
}

}  // namespace

std::int64_t ClusterRuntime::move_kv(std::int64_t src, std::span<const kv::BlockId> from, std::int64_t dst,
                                     std::span<const kv::BlockId> to, TransferKind kind) const {
  KUN_CHECK_EQ(from.size(), to.size());
  if (from.empty()) return 0;
  // One message: the source's agent reads the blocks and sends them to the destination's agent,
  // which writes them and acks here.
  const Status s = client().send_blocks(endpoint(src), raw_ids(from), endpoint(dst), raw_ids(to), kind);
  KUN_CHECK(s.ok()) << "KV move of " << from.size() << " blocks from device " << src << " to " << dst << ": " << s.to_string();
  return static_cast<std::int64_t>(from.size()) * fleet_->geometry(static_cast<int>(src)).block_bytes;
}

bool ClusterRuntime::mirror_has_layer(std::int64_t instance, std::int64_t layer) const {
  std::lock_guard<std::mutex> lock(mirror_mu_);
  return resident_[static_cast<std::size_t>(instance)][static_cast<std::size_t>(layer)] != 0;
}

void ClusterRuntime::mirror_set_layer(std::int64_t instance, std::int64_t layer, bool resident) {
  std::lock_guard<std::mutex> lock(mirror_mu_);
  resident_[static_cast<std::size_t>(instance)][static_cast<std::size_t>(layer)] = resident ? 1 : 0;
}

ClusterRuntime::ClusterRuntime(ClusterOptions options, const Clock* clock)
    : options_(std::move(options)), clock_(clock), router_(options_.router),
      events_(options_.coordinator.event_history),
      transition_log_(options_.coordinator.event_history) {}

namespace {
std::function<StatusOr<std::unique_ptr<DeviceFleet>>(const FleetOptions&, const model::WeightSource&)>& default_fleet_factory() {
  static std::function<StatusOr<std::unique_ptr<DeviceFleet>>(const FleetOptions&, const model::WeightSource&)> factory;
  return factory;
}
}  // namespace

void set_default_fleet_factory(
    std::function<StatusOr<std::unique_ptr<DeviceFleet>>(const FleetOptions&, const model::WeightSource&)> factory) {
  default_fleet_factory() = std::move(factory);
}

StatusOr<std::unique_ptr<ClusterRuntime>> ClusterRuntime::create(const ClusterOptions& options,
                                                                 const model::WeightSource& weights, const Clock* clock) {
  if (options.num_instances <= 0) return invalid_argument("num_instances must be >= 1");
  FleetOptions fleet_options;
  fleet_options.num_devices = options.num_instances;
  fleet_options.device = options.device;
  KUN_RETURN_IF_ERROR(check_workspace_fits(options.scheduler, weights.config(), options.device));
  fleet_options.link = options.link;
  fleet_options.host_link = options.host_link;
  fleet_options.host_swap_blocks = options.host_swap_blocks;
  std::unique_ptr<DeviceFleet> fleet;
  const auto& make_fleet = options.make_fleet ? options.make_fleet : default_fleet_factory();
  if (make_fleet) {
    KUN_ASSIGN_OR_RETURN(fleet, make_fleet(fleet_options, weights));
  } else {
    KUN_ASSIGN_OR_RETURN(fleet, InProcessFleet::create(fleet_options, weights));
  }
  return create_with_fleet(options, weights.config(), std::move(fleet), clock);
}

StatusOr<std::unique_ptr<ClusterRuntime>> ClusterRuntime::create_with_fleet(const ClusterOptions& options,
                                                                            const model::ModelConfig& config,
                                                                            std::unique_ptr<DeviceFleet> fleet,
                                                                            const Clock* clock) {
  if (fleet == nullptr || fleet->num_devices() != options.num_instances) {
    return invalid_argument("the fleet must have num_instances (" + std::to_string(options.num_instances) + ") devices");
  }
  std::unique_ptr<ClusterRuntime> rt(new ClusterRuntime(options, clock));
  rt->config_ = config;
  rt->fleet_ = std::move(fleet);
  for (std::int64_t i = 0; i < options.num_instances; ++i) {
    const DeviceGeometry& geo = rt->fleet_->geometry(static_cast<int>(i));
    if (geo.num_layers != config.num_layers || static_cast<int>(geo.resident_layers.size()) != config.num_layers) {
      return failed_precondition("device " + std::to_string(i) + " reports " + std::to_string(geo.resident_layers.size()) + " of " +
                                 std::to_string(geo.num_layers) + " layers resident; the cluster starts with every device holding all " +
                                 std::to_string(config.num_layers));
    }
    auto alloc = std::make_unique<kv::KvBlockAllocator>(geo.blocks_per_page);
    std::vector<memory::PageId> pages;
    for (std::int64_t p : geo.kv_page_ids) pages.push_back(memory::PageId(p));
    KUN_RETURN_IF_ERROR(alloc->add_pages(pages));
    if (alloc->num_total() < config.num_layers) return resource_exhausted("device dev" + std::to_string(i) + " has no room for KV");
    rt->allocators_.push_back(std::move(alloc));
    std::vector<char> resident(static_cast<std::size_t>(config.num_layers), 0);
    for (std::int64_t l : geo.resident_layers) resident[static_cast<std::size_t>(l)] = 1;
    rt->resident_.push_back(std::move(resident));
  }
  const DeviceGeometry& geo0 = rt->fleet_->geometry(0);
  cluster::ClusterShape shape;
  shape.num_instances = options.num_instances;
  shape.num_layers = config.num_layers;
  shape.layer_param_bytes = geo0.pages_per_layer * geo0.page_bytes;
  shape.layer_block_bytes = geo0.block_stride_bytes;
  shape.block_size_tokens = options.device.kv_block_size;
  std::vector<std::int64_t> degrees;
  for (std::int64_t g : options.allowed_degrees) {
    if (g <= options.num_instances && g <= config.num_layers) degrees.push_back(g);
  }
  shape.allowed_degrees = degrees;
  cluster::CoordinatorConfig coordinator = options.coordinator;
  if (coordinator.planner.grow_groups) {
    // Growing a fused group (cluster::PlannedGrowth) is carried out by the simulator only: the
    // in-process runtime would have to re-fuse a live group (re-spread its stale KV over twice
    // the members, drop more layers) and that path has no token-exact test yet. Groups here
    // keep the degree they were formed with; the planner still picks g from allowed_degrees.
    KUN_LOG(kInfo) << "cluster runtime: group growth is refused (not carried out by the in-process runtime); "
                      "overloaded groups keep their degree";
    coordinator.planner.grow_groups = false;
  }
  if (coordinator.planner.shrink_groups) {
    // Partial restore (cluster::plan_shrink: a group of 4 splits into two of 2) is carried out by
    // the simulator only; here a group restores whole, as before.
    KUN_LOG(kInfo) << "cluster runtime: shrinking a group by half (partial restore) is refused (not carried out by "
                      "the in-process runtime); groups restore whole";
    coordinator.planner.shrink_groups = false;
  }
  rt->coordinator_ = std::make_unique<cluster::Coordinator>(coordinator, shape);
  rt->router_ = cluster::Router(cluster::RouterConfig{options.router.policy, config.num_layers});
  rt->model_info_.name = options.model_name;
  rt->model_info_.vocab_size = config.vocab_size;
  rt->model_info_.eos_token_id = static_cast<std::int32_t>(config.eos_token_id);
  rt->model_info_.max_context_tokens =
      options.scheduler.max_model_len > 0 ? std::min(options.scheduler.max_model_len, config.max_position_embeddings)
                                          : config.max_position_embeddings;
  rt->admission_config_ = rt->instance_scheduler_config();  // fixed from here on: submits read it unlocked
  for (std::int64_t i = 0; i < options.num_instances; ++i) rt->units_.push_back(rt->make_unit({i}, -1));
  rt->publish_routing(rt->build_routing_locked());
  return rt;
}

ClusterRuntime::~ClusterRuntime() { stop(); }

std::shared_ptr<ClusterRuntime::Unit> ClusterRuntime::make_unit(const std::vector<std::int64_t>& instances,
                                                                 std::int64_t group) {
  auto unit = std::make_shared<Unit>();
  unit->instances = instances;
  unit->group = group;
  const auto g = static_cast<std::int64_t>(instances.size());
  const std::int64_t L = config_.num_layers;
  std::vector<StageSpec> stages;
  std::vector<kv::KvBlockAllocator*> allocs;
  for (std::int64_t k = 0; k < g; ++k) {
    const std::int64_t inst = instances[static_cast<std::size_t>(k)];
    stages.push_back(StageSpec{endpoint(inst), stage_begin(k, g, L), stage_begin(k + 1, g, L)});
    allocs.push_back(allocators_[static_cast<std::size_t>(inst)].get());
  }
  std::vector<std::int32_t> layer_device(static_cast<std::size_t>(L));
  for (std::int64_t l = 0; l < L; ++l) layer_device[static_cast<std::size_t>(l)] = static_cast<std::int32_t>(stage_of_layer(l, g, L));
  unit->kv = std::make_unique<engine::KvManager>(options_.device.kv_block_size, allocs, layer_device, options_.host_swap_blocks);
  unit->executor = std::make_unique<PipelineExecutor>(std::move(stages), fleet_->front_end());
  engine::EngineConfig ec;
  ec.scheduler = instance_scheduler_config();
  // A group is g devices running g virtual engines, each stage working through the g
  // micro-batches of a round.
  ec.scheduler = engine::fused_scheduler_config(ec.scheduler, g, options_.device.kv_block_size);
  // Lookahead balances the virtual engines by predicted step cost; the decoder layers' weights
  // set the per-token cost (the embedding is a lookup).
  ec.scheduler.step_cost = engine::StepCostModel::for_shape(static_cast<double>(config_.num_layers * config_.layer_param_count()),
                                                            config_.num_layers, config_.hidden_size);
  ec.model = model_info_;
  ec.publish_requests = options_.coordinator.policy == cluster::Policy::kMigrate;
  unit->engine = std::make_unique<engine::Engine>(ec, unit->kv.get(), unit->executor.get(), clock_);
  Unit* raw = unit.get();
  unit->engine->set_step_observer([raw, this](const engine::StepPlan&, const engine::StepResult&) {
    std::int64_t expected = -1;
    raw->first_step_us.compare_exchange_strong(expected, clock_->now_us());
  });
  if (g > 1) {
    unit->engine->set_between_steps([raw, this](const std::function<bool(RequestId)>& in_flight) { exchange_round(*raw, in_flight); });
  }
  return unit;
}

engine::SchedulerConfig ClusterRuntime::instance_scheduler_config() const {
  engine::SchedulerConfig sc = options_.scheduler;
  sc.vocab_size = config_.vocab_size;
  sc.eos_token_id = static_cast<std::int32_t>(config_.eos_token_id);
  sc.max_model_len = model_info_.max_context_tokens > 0 ? model_info_.max_context_tokens : config_.max_position_embeddings;
  return sc;
}

void ClusterRuntime::launch(Unit& unit) {
  if (started_) unit.engine->start();
}

void ClusterRuntime::exchange_round(Unit& unit, const std::function<bool(RequestId)>& in_flight) {
  // Live KV exchange, called on the engine thread after each completed step: one layer of each of
  // at most exchange_requests_per_round requests moves to the member it belongs on (the stage
  // that runs it after a drop; its home while the group restores), while the other virtual
  // engines' steps run. A request in a running step waits for the next round; a destination short
  // of blocks ends the round.
  const bool restoring = unit.restoring.load(std::memory_order_acquire);
  if (!restoring && options_.stale_kv != cluster::StaleKvStrategy::kExchange) return;
  const bool all_homed = !restoring || engine::assign_restore_homes(unit.engine->scheduler(), *unit.kv, unit.split_room).all_homed;
  std::int64_t moved = 0, blocks = 0;
  for (RequestId id : unit.kv->requests_with_misplaced_layers()) {
    if (moved >= options_.exchange_requests_per_round) break;
    if (in_flight(id)) continue;
    const std::int64_t layer = unit.kv->misplaced_layers(id).front();
    Status s = unit.kv->move_layer(id, layer, [&](std::int32_t from, const std::vector<kv::BlockId>& from_blocks, std::int32_t to,
                                                  const std::vector<kv::BlockId>& to_blocks) {
      const std::int64_t src = unit.instances[static_cast<std::size_t>(from)];
      const std::int64_t dst = unit.instances[static_cast<std::size_t>(to)];
      move_kv(src, from_blocks, dst, to_blocks, TransferKind::kKvExchange);
      blocks += static_cast<std::int64_t>(from_blocks.size());
    });
    if (!s.ok()) break;
    ++moved;
  }
  if (blocks > 0) {
    if (restoring) unit.live_gathered_blocks.fetch_add(blocks, std::memory_order_relaxed);
    std::lock_guard<std::mutex> el(events_mu_);
    kv_blocks_moved_ += blocks;
  }
  if (restoring && all_homed && !unit.gathered.load(std::memory_order_relaxed) &&
      unit.kv->requests_with_misplaced_layers().empty()) {
    unit.gathered.store(true, std::memory_order_release);
    notify_restore_progress();
  }
}

void ClusterRuntime::notify_restore_progress() {
  {
    std::lock_guard<std::mutex> pl(policy_mu_);
    restore_progress_ = true;
  }
  policy_cv_.notify_all();
}

StatusOr<std::vector<memory::PageId>> ClusterRuntime::reclaim_layer_pages(
    std::int64_t inst, const std::function<std::int64_t(std::span<const kv::BlockMove>)>& remap, std::int64_t* repacked) {
  kv::KvBlockAllocator& alloc = *allocators_[static_cast<std::size_t>(inst)];
  while (true) {
    KUN_ASSIGN_OR_RETURN(kv::ReclaimResult reclaimed, alloc.reclaim_pages(fleet_->geometry(static_cast<int>(inst)).pages_per_layer));
    if (reclaimed.moves.empty()) return std::move(reclaimed.pages);
    // The copies happen inside the device, by its agent (the group is paused).
    std::vector<std::int64_t> from, to;
    for (const kv::BlockMove& m : reclaimed.moves) {
      from.push_back(m.from.value);
      to.push_back(m.to.value);
    }
    const Status moved = client().move_blocks(endpoint(inst), from, to);
    KUN_CHECK(moved.ok()) << "repack on device " << inst << ": " << moved.to_string();
    const std::int64_t remapped = remap(reclaimed.moves);
    KUN_CHECK_EQ(remapped, static_cast<std::int64_t>(reclaimed.moves.size())) << "repack on device " << inst;
    for (const kv::BlockMove& m : reclaimed.moves) alloc.free(m.from);
    *repacked += remapped;
  }
}

Status ClusterRuntime::begin_restore_locked(std::int64_t group, const std::string& reason) {
  auto it = std::find_if(units_.begin(), units_.end(), [&](const auto& u) { return u->group == group; });
  if (it == units_.end()) return not_found("no fused group " + std::to_string(group));
  Unit& unit = **it;
  KUN_CHECK(!unit.restoring.load() && !unit.gathered.load()) << "group " << group << " is already restoring";
  unit.restore_began = std::chrono::steady_clock::now();
  unit.restore_reason = reason;
  unit.engine->pause();
  unit.engine->quiesce();
  // Weights first, as in the artifact: each member takes its dropped layers' pages back from its
  // KV pool now (repacking live blocks inside the device), and the bytes cross the link on a
  // background thread as bulk transfers, yielding to the activations of the group, which keeps
  // decoding on its stage layers. A layer whose pages the pool cannot spare yet waits for the split.
  cluster::RestoreInput input;
  input.group = group;
  input.members = unit.instances;
  input.strategy = options_.stale_kv;
  for (std::int64_t inst : unit.instances) input.kv_blocks_total.push_back(allocators_[static_cast<std::size_t>(inst)]->num_total());
  unit.restore_plan = cluster::plan_restore(input, transition_geometry());
  record_plan("restore", group, unit.restore_plan.to_string());
  struct Pull {
    std::int64_t from, to, layer;
    std::vector<std::int64_t> pages;  // KV pages of `to` the layer goes into (no live blocks)
  };
  std::vector<Pull> pulls;
  std::int32_t short_member = -1;  // its pool could not spare the next layer: the rest wait for the split
  for (const cluster::WeightPull& p : unit.restore_plan.pulls) {
    if (p.member == short_member) continue;
    const std::int64_t inst = unit.instances[static_cast<std::size_t>(p.member)];
    auto pages = reclaim_layer_pages(
        inst, [&](std::span<const kv::BlockMove> moves) { return unit.kv->remap_blocks(p.member, moves); },
        &unit.restore_repacked_blocks);
    if (!pages.ok()) {
      short_member = p.member;
      continue;
    }
    const std::int64_t owner = unit.instances[static_cast<std::size_t>(p.from)];
    pulls.push_back(Pull{owner, inst, p.layer, {}});
    for (memory::PageId page : *pages) pulls.back().pages.push_back(page.value);
    unit.restore_pulled_bytes += fleet_->geometry(static_cast<int>(owner)).layer_segment_bytes;
  }
  if (pulls.empty()) {
    unit.weights_back.store(true);
  } else {
    // Each puller's agent asks the owner's agent for the layer (a bulk kWeights message that
    // yields its links to activations) and maps it into the reclaimed pages; the acks come here.
    unit.weight_pull = std::thread([this, &unit, pulls = std::move(pulls)] {
      for (const Pull& p : pulls) {
        const Status s = client().pull_layer(endpoint(p.to), p.layer, endpoint(p.from), p.pages);
        KUN_CHECK(s.ok()) << "pull of layer " << p.layer << " by device " << p.to << " from " << p.from << ": " << s.to_string();
        mirror_set_layer(p.to, p.layer, true);
      }
      unit.weights_back.store(true, std::memory_order_release);
      notify_restore_progress();
    });
  }
  if (options_.stale_kv == cluster::StaleKvStrategy::kRecompute) {
    unit.gathered.store(true);  // nothing to gather: the split recomputes the running requests
  } else {
    unit.split_room = unit.restore_plan.split_room_blocks;
    unit.restoring.store(true, std::memory_order_release);
    const bool all_homed = engine::assign_restore_homes(unit.engine->scheduler(), *unit.kv, unit.split_room).all_homed;
    if (all_homed && unit.kv->requests_with_misplaced_layers().empty()) unit.gathered.store(true);
  }
  unit.engine->resume();
  return ok_status();
}

void ClusterRuntime::finish_gathered_restores() {
  const auto now = std::chrono::steady_clock::now();
  std::vector<std::pair<std::int64_t, std::vector<std::int64_t>>> ready;
  for (const auto& u : units_) {
    if (u->group < 0 || !(u->restoring.load() || u->gathered.load())) continue;  // not restoring
    // The weight pull always finishes (a bounded transfer that wakes this loop); the split waits
    // for it rather than joining it under transition_mu_.
    if (!u->weights_back.load(std::memory_order_acquire)) continue;
    const bool done = u->gathered.load(std::memory_order_acquire);
    if (done || now - u->restore_began >= std::chrono::microseconds(options_.restore_gather_timeout_us)) {
      ready.emplace_back(u->group, u->instances);
    }
  }
  for (const auto& [group, instances] : ready) {
    Status s = restore_locked(group);
    if (!s.ok()) {
      // The group stays fused and restoring; the next wake of the policy loop tries again.
      record_failure("split", group, instances, s);
      continue;
    }
    coordinator_->on_restore_done(group, clock_->now_us());
  }
}

void ClusterRuntime::start() {
  {
    std::unique_lock lock(transition_mu_);
    if (started_) return;
    started_ = true;
    for (auto& u : units_) u->engine->start();
  }
  const bool policy_active = options_.coordinator.policy == cluster::Policy::kKunServe ||
                             options_.coordinator.policy == cluster::Policy::kMigrate;
  if (options_.run_policy_thread && policy_active) policy_thread_ = std::thread([this] { policy_loop(); });
}

void ClusterRuntime::stop() {
  {
    std::lock_guard<std::mutex> lock(policy_mu_);
    stopping_ = true;
  }
  policy_cv_.notify_all();
  if (policy_thread_.joinable()) policy_thread_.join();
  std::unique_lock lock(transition_mu_);
  for (auto& u : units_) u->engine->stop();
}

ClusterRuntime::Unit* ClusterRuntime::unit_of_instance(std::int64_t instance) const {
  for (const auto& u : units_) {
    if (std::find(u->instances.begin(), u->instances.end(), instance) != u->instances.end()) return u.get();
  }
  return nullptr;
}

std::int64_t ClusterRuntime::num_units() const { return static_cast<std::int64_t>(routing()->units.size()); }

std::int64_t ClusterRuntime::group_of(std::int64_t instance) const {
  if (instance < 0 || instance >= options_.num_instances) return -1;
  return routing()->unit_of_instance[static_cast<std::size_t>(instance)]->group;
}

std::map<std::string, std::int64_t> ClusterRuntime::transition_failures() const {
  std::lock_guard<std::mutex> lock(events_mu_);
  return transition_failures_;
}

std::vector<std::int64_t> ClusterRuntime::admission_history(std::int64_t instance) const {
  std::lock_guard<std::mutex> lock(transition_mu_);
  Unit* u = unit_of_instance(instance);
  if (u == nullptr) return {};
  u->engine->pause();
  std::vector<std::int64_t> h = u->engine->scheduler().admission_history();
  u->engine->resume();
  return h;
}

void ClusterRuntime::record_failure(const std::string& kind, std::int64_t group, const std::vector<std::int64_t>& instances,
                                    const Status& status) {
  KUN_LOG(kWarn) << "cluster " << kind << " of group " << group << " failed and was rolled back: " << status.to_string();
  ClusterEvent ev;
  ev.time_us = clock_->now_us();
  ev.kind = kind + "_failed";
  ev.group = group;
  ev.instances = instances;
  ev.reason = status.to_string();
  {
    std::lock_guard<std::mutex> lock(events_mu_);
    ++transition_failures_[kind];
  }
  record(std::move(ev));
}

engine::TokenCallback ClusterRuntime::wrap_callback(engine::TokenCallback cb) {
  return [this, cb = std::move(cb)](const engine::TokenEvent& ev) {
    if (ev.finished) {
      std::lock_guard<std::mutex> lock(requests_mu_);
      request_instance_.erase(ev.id);
    }
    if (cb) cb(ev);
  };
}

std::vector<cluster::InstanceSnapshot> ClusterRuntime::snapshots_of(const std::vector<std::shared_ptr<Unit>>& units) const {
  std::vector<cluster::InstanceSnapshot> out;
  for (const auto& u : units) {
    const engine::ServingStats st = u->engine->stats();
    const auto g = static_cast<std::int64_t>(u->instances.size());
    const engine::InstanceStats is = member_share(st.instances.front(), g);
    std::vector<engine::RequestSummary> reqs;
    if (g == 1 && options_.coordinator.policy == cluster::Policy::kMigrate) reqs = u->engine->request_summaries();
    for (std::int64_t inst : u->instances) {
      cluster::InstanceSnapshot s;
      s.instance = inst;
      s.group = u->group;
      s.state = u->group < 0 ? cluster::GroupState::kInitial
                : u->restoring.load() || u->gathered.load() ? cluster::GroupState::kRestoring
                                                            : cluster::GroupState::kDropped;
      s.kv_blocks_total = is.kv_blocks_total;
      s.kv_blocks_free = is.kv_blocks_free;
      s.blocks_demanded = is.blocks_demanded;
      s.pending_blocks = is.pending_blocks;
      s.num_running = is.num_running;
      s.num_queued = is.num_waiting;
      for (const auto& r : reqs) s.requests.push_back(cluster::RequestSnapshot{r.id, r.running, r.tokens, r.blocks_held});
      out.push_back(std::move(s));
    }
  }
  return out;
}

std::shared_ptr<const ClusterRuntime::Routing> ClusterRuntime::routing() const {
  std::lock_guard<std::mutex> lock(routing_mu_);
  return routing_;
}

std::shared_ptr<const ClusterRuntime::Routing> ClusterRuntime::build_routing_locked() const {
  auto r = std::make_shared<Routing>();
  r->units = units_;
  r->unit_of_instance.assign(static_cast<std::size_t>(options_.num_instances), nullptr);
  for (const auto& u : units_) {
    for (std::int64_t inst : u->instances) {
      KUN_CHECK(r->unit_of_instance[static_cast<std::size_t>(inst)] == nullptr) << "instance " << inst << " in two units";
      r->unit_of_instance[static_cast<std::size_t>(inst)] = u.get();
    }
  }
  for (std::size_t i = 0; i < r->unit_of_instance.size(); ++i) {
    KUN_CHECK(r->unit_of_instance[i] != nullptr) << "instance " << i << " has no unit";
  }
  return r;
}

void ClusterRuntime::publish_routing(std::shared_ptr<const Routing> routing) {
  std::shared_ptr<const Routing> old;
  {
    std::lock_guard<std::mutex> lock(routing_mu_);
    old = std::move(routing_);
    routing_ = std::move(routing);
  }
  // `old` (and any unit only it kept alive) is released here, outside the lock.
}

std::int64_t ClusterRuntime::instance_of(RequestId id) const {
  std::lock_guard<std::mutex> rl(requests_mu_);
  auto it = request_instance_.find(id);
  return it == request_instance_.end() ? -1 : it->second;
}

bool ClusterRuntime::admit_submit(Unit& unit, PendingSubmit& p, Status* status) {
  std::lock_guard<std::mutex> lock(unit.gate.mu);
  if (unit.gate.retired) return false;
  if (unit.gate.closed) {
    unit.gate.submits.push_back(std::move(p));
    *status = ok_status();
    return true;
  }
  *status = unit.engine->submit_as(p.id, std::move(p.spec), std::move(p.callback));
  return true;
}

bool ClusterRuntime::admit_cancel(Unit& unit, RequestId id) {
  std::lock_guard<std::mutex> lock(unit.gate.mu);
  if (unit.gate.retired) return false;
  if (unit.gate.closed) {
    unit.gate.cancels.push_back(id);
  } else {
    unit.engine->cancel(id);
  }
  return true;
}

void ClusterRuntime::close_gate(Unit& unit) {
  std::lock_guard<std::mutex> lock(unit.gate.mu);
  KUN_CHECK(!unit.gate.retired && !unit.gate.closed) << "unit of instance " << unit.instances.front() << " closed twice";
  unit.gate.closed = true;
}

void ClusterRuntime::deliver_pending_locked(Unit& unit, const Routing& routing) {
  // Called with unit.gate.mu held, so a cancel that arrives meanwhile for one of these requests
  // waits (or retries) until its submit reached the target. A target other than `unit` (a newer
  // unit, or the other side of a migration) is reached through its own gate, locked inside this
  // one: transitions run one at a time, so two gates are never locked in opposite orders. When
  // the target is `unit` itself (a reopened gate), the queue goes straight to its engine.
  Gate& gate = unit.gate;
  std::vector<PendingSubmit> submits = std::move(gate.submits);
  std::vector<RequestId> cancels = std::move(gate.cancels);
  gate.submits.clear();
  gate.cancels.clear();
  for (PendingSubmit& p : submits) {
    const std::int64_t inst = instance_of(p.id);
    KUN_CHECK(inst >= 0) << "pending request " << p.id << " has no instance";
    Unit* target = routing.unit_of_instance[static_cast<std::size_t>(inst)];
    const RequestId id = p.id;
    engine::TokenCallback cb = p.callback;  // kept to report a refusal at the hand-over
    Status s;
    if (target == &unit) {
      KUN_CHECK(!gate.closed && !gate.retired) << "hand-over of request " << id << " to its own closed gate";
      s = unit.engine->submit_as(p.id, std::move(p.spec), std::move(p.callback));
    } else {
      KUN_CHECK(admit_submit(*target, p, &s)) << "hand-over of request " << id << " to a retired unit";
    }
    if (!s.ok()) {
      // The target refused it (its queue filled meanwhile): the client gets a final error event,
      // as for a submit the engine refuses at admission.
      {
        std::lock_guard<std::mutex> rl(requests_mu_);
        request_instance_.erase(id);
      }
      if (cb) {
        engine::TokenEvent ev;
        ev.id = id;
        ev.finished = true;
        ev.reason = engine::FinishReason::kError;
        ev.error = s;
        ev.time_us = clock_->now_us();
        cb(ev);
      }
    }
  }
  for (RequestId id : cancels) {
    const std::int64_t inst = instance_of(id);
    if (inst < 0) continue;  // finished meanwhile
    Unit* target = routing.unit_of_instance[static_cast<std::size_t>(inst)];
    if (target == &unit) {
      unit.engine->cancel(id);
    } else {
      KUN_CHECK(admit_cancel(*target, id)) << "cancel hand-over of " << id;
    }
  }
}

void ClusterRuntime::reopen_gate(Unit& unit, const Routing& routing) {
  std::lock_guard<std::mutex> lock(unit.gate.mu);
  unit.gate.closed = false;
  deliver_pending_locked(unit, routing);
}

void ClusterRuntime::retire_gate(Unit& unit, const Routing& next) {
  std::lock_guard<std::mutex> lock(unit.gate.mu);
  unit.gate.retired = true;
  deliver_pending_locked(unit, next);
}

StatusOr<RequestId> ClusterRuntime::submit(engine::RequestSpec spec, engine::TokenCallback on_event) {
  // Bad input is refused here, before it can queue behind a transition.
  KUN_RETURN_IF_ERROR(engine::validate_request(spec, admission_config_));
  PendingSubmit p{RequestId(), std::move(spec), wrap_callback(std::move(on_event))};
  while (true) {
    const std::shared_ptr<const Routing> r = routing();
    std::int64_t instance;
    {
      const std::vector<cluster::InstanceSnapshot> snaps = snapshots_of(r->units);
      std::lock_guard<std::mutex> lock(router_mu_);
      KUN_ASSIGN_OR_RETURN(instance, router_.route(snaps));
    }
    KUN_CHECK(instance >= 0 && instance < options_.num_instances) << "router chose unknown instance " << instance;
    Unit* unit = r->unit_of_instance[static_cast<std::size_t>(instance)];
    {
      std::lock_guard<std::mutex> rl(requests_mu_);
      if (!p.id.valid()) p.id = RequestId(next_id_++);
      request_instance_[p.id] = instance;
    }
    const RequestId id = p.id;
    Status s;
    if (!admit_submit(*unit, p, &s)) {
      std::this_thread::yield();  // the unit retired: its successor is being published
      continue;
    }
    if (!s.ok()) {
      std::lock_guard<std::mutex> rl(requests_mu_);
      request_instance_.erase(id);
      return s;
    }
    return id;
  }
}

void ClusterRuntime::cancel(RequestId id) {
  while (true) {
    const std::shared_ptr<const Routing> r = routing();
    const std::int64_t instance = instance_of(id);
    if (instance < 0) return;
    if (admit_cancel(*r->unit_of_instance[static_cast<std::size_t>(instance)], id)) return;
    std::this_thread::yield();
  }
}

engine::ServingStats ClusterRuntime::stats() const {
  engine::ServingStats out;
  PipelineExecutor::StageTime fused;  // live fused groups here, retired ones below
  // events_mu_ first, then the snapshot: a unit is retired (its counters moved into
  // retired_counters_ under events_mu_) only after its successors are published, so no unit
  // counts twice and none is missed. No transition lock: stats never waits for a transition.
  std::lock_guard<std::mutex> lock(events_mu_);
  {
    const std::shared_ptr<const Routing> r = routing();
    for (const auto& u : r->units) {
      const engine::ServingStats st = u->engine->stats();
      const auto g = static_cast<std::int64_t>(u->instances.size());
      for (std::int64_t inst : u->instances) {
        engine::InstanceStats is = member_share(st.instances.front(), g);
        is.instance = inst;
        is.group = u->group;
        is.group_state = u->group < 0 ? "INITIAL" : u->restoring.load() || u->gathered.load() ? "RESTORING" : "DROPPED";
        is.dropped_param_bytes = dropped_param_bytes(inst);
        out.instances.push_back(is);
      }
      add_counters(st, &out);
      if (u->executor->num_stages() > 1) fused.add(u->executor->stage_time());
    }
  }
  std::sort(out.instances.begin(), out.instances.end(),
            [](const engine::InstanceStats& a, const engine::InstanceStats& b) { return a.instance < b.instance; });
  add_counters(retired_counters_, &out);
  out.drops_total = drops_;
  out.restores_total = restores_;
  out.transition_failures_total = transition_failures_;
  out.kv_blocks_exchanged_total = kv_blocks_moved_;
  out.drop_latency_ms = drop_latency_ms_;
  out.restore_latency_ms = restore_latency_ms_;
  fused.add(retired_pipeline_time_);
  out.pipeline_stage_busy_s = static_cast<double>(fused.busy_ns) * 1e-9;
  out.pipeline_stage_idle_s = static_cast<double>(fused.idle_ns) * 1e-9;
  return out;
}

void ClusterRuntime::retire(const std::shared_ptr<Unit>& unit) {
  // After its successors are published and its gate retired: nothing reaches its engine now.
  unit->engine->stop();
  const engine::ServingStats st = unit->engine->stats();
  std::lock_guard<std::mutex> lock(events_mu_);
  // Counters are cumulative over the deployment's life, so a retired unit's stay counted.
  add_counters(st, &retired_counters_);
  if (unit->executor->num_stages() > 1) retired_pipeline_time_.add(unit->executor->stage_time());
}

void ClusterRuntime::record(ClusterEvent ev) {
  KUN_LOG(kInfo) << "cluster " << ev.kind << " group " << ev.group << " instances " << ev.instances.size() << ": "
                 << ev.bytes << " bytes, " << ev.latency_ms << " ms, " << ev.requests_moved << " requests; " << ev.reason;
  std::lock_guard<std::mutex> lock(events_mu_);
  if (ev.kind == "drop") {
    ++drops_;
    drop_latency_ms_.push_back(ev.latency_ms);
  } else if (ev.kind == "restore") {
    ++restores_;
    restore_latency_ms_.push_back(ev.latency_ms);
  }
  events_.push_back(std::move(ev));
}

std::vector<ClusterEvent> ClusterRuntime::events() const {
  std::lock_guard<std::mutex> lock(events_mu_);
  return events_.to_vector();
}

std::uint64_t ClusterRuntime::events_total() const {
  std::lock_guard<std::mutex> lock(events_mu_);
  return events_.total_pushed();
}

StatusOr<std::int64_t> ClusterRuntime::drop(const std::vector<std::int64_t>& instances) {
  std::unique_lock lock(transition_mu_);
  KUN_ASSIGN_OR_RETURN(cluster::DropAction action, coordinator_->force_drop(instances, clock_->now_us()));
  StatusOr<std::int64_t> group = drop_locked(action.instances, action.group, "forced");
  if (!group.ok()) {
    record_failure("drop", action.group, action.instances, group.status());
    abandon_drop_locked(action.group);
    return group.status();
  }
  coordinator_->on_drop_done(*group, clock_->now_us());
  return *group;
}

Status ClusterRuntime::restore(std::int64_t group) {
  std::shared_ptr<Unit> unit;
  {
    std::unique_lock lock(transition_mu_);
    const cluster::GroupInfo* info = coordinator_->group(group);
    if (info == nullptr || info->state != cluster::GroupState::kRestoring) {
      KUN_ASSIGN_OR_RETURN(cluster::RestoreAction action, coordinator_->force_restore(group, clock_->now_us()));
      coordinator_->on_restore_started(group, clock_->now_us());
      KUN_RETURN_IF_ERROR(begin_restore_locked(group, "forced"));
    }
    for (const auto& u : units_) {
      if (u->group == group) unit = u;
    }
  }
  if (unit == nullptr) return not_found("no fused group " + std::to_string(group));
  // The weights come back on the pull thread while the group decodes; wait for them without
  // transition_mu_, so other transitions (and the policy loop) are not held up by the transfer.
  {
    std::unique_lock<std::mutex> pl(policy_mu_);
    policy_cv_.wait(pl, [&] { return unit->weights_back.load(std::memory_order_acquire); });
  }
  std::unique_lock lock(transition_mu_);
  if (std::find(units_.begin(), units_.end(), unit) == units_.end()) return ok_status();  // the policy loop split it meanwhile
  if (Status s = restore_locked(group); !s.ok()) {
    record_failure("split", group, unit->instances, s);
    return s;
  }
  coordinator_->on_restore_done(group, clock_->now_us());
  return ok_status();
}

bool ClusterRuntime::ready_to_split(std::int64_t group) const {
  std::unique_lock lock(transition_mu_);
  for (const auto& u : units_) {
    if (u->group == group) return u->gathered.load(std::memory_order_acquire) && u->weights_back.load(std::memory_order_acquire);
  }
  return false;
}

Status ClusterRuntime::begin_restore(std::int64_t group) {
  std::unique_lock lock(transition_mu_);
  KUN_ASSIGN_OR_RETURN(cluster::RestoreAction action, coordinator_->force_restore(group, clock_->now_us()));
  coordinator_->on_restore_started(group, clock_->now_us());
  return begin_restore_locked(group, "forced");
}

Status ClusterRuntime::migrate(RequestId request, std::int64_t to_instance) {
  std::unique_lock lock(transition_mu_);
  return migrate_locked(request, to_instance, "forced");
}

cluster::TransitionGeometry ClusterRuntime::transition_geometry() const {
  cluster::TransitionGeometry geo;
  geo.num_layers = config_.num_layers;
  geo.block_size_tokens = options_.device.kv_block_size;
  geo.blocks_per_page = allocators_.front()->blocks_per_page();
  geo.pages_per_layer = fleet_->geometry(0).pages_per_layer;
  return geo;
}

void ClusterRuntime::record_plan(const std::string& kind, std::int64_t group, std::string plan) {
  KUN_LOG(kDebug) << "cluster plan: " << plan;
  std::lock_guard<std::mutex> lock(events_mu_);
  transition_log_.push_back(cluster::TransitionRecord{kind, group, std::move(plan)});
}

std::vector<cluster::TransitionRecord> ClusterRuntime::transition_log() const {
  std::lock_guard<std::mutex> lock(events_mu_);
  return transition_log_.to_vector();
}

StatusOr<std::int64_t> ClusterRuntime::drop_locked(const std::vector<std::int64_t>& instances, std::int64_t group,
                                                   const std::string& reason) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto g = static_cast<std::int64_t>(instances.size());
  const std::int64_t L = config_.num_layers;
  std::vector<std::shared_ptr<Unit>> members;
  for (std::int64_t inst : instances) {
    Unit* u = unit_of_instance(inst);
    if (u == nullptr || u->group >= 0) return failed_precondition("instance " + std::to_string(inst) + " is not independent");
  }
  for (std::int64_t inst : instances) {
    auto it = std::find_if(units_.begin(), units_.end(), [&](const auto& u) { return u->instances.front() == inst; });
    members.push_back(*it);
  }
  // Only the members stop: their gates close (submits and cancels routed to them queue there
  // and are handed to the group at the end) and their engines park at a step boundary. The
  // members stay published until the group replaces them, so routing always covers every
  // instance; other units keep serving throughout.
  for (auto& m : members) close_gate(*m);
  // The plan, from every member's requests at a step boundary (cluster/transition_plan.h).
  cluster::DropInput input;
  input.group = group;
  input.members = instances;
  input.strategy = options_.stale_kv;
  for (std::size_t k = 0; k < members.size(); ++k) {
    Unit& m = *members[k];
    m.engine->pause();
    m.engine->quiesce();
    input.held_begin.push_back(0);
    input.held_end.push_back(L);
    for (cluster::TransitionRequest& r :
         cluster::transition_requests(m.engine->scheduler(), *m.kv, {static_cast<std::int32_t>(k)})) {
      input.requests.push_back(std::move(r));
    }
  }
  const cluster::DropPlan plan = cluster::plan_drop(input, transition_geometry());
  // Commit point: nothing has moved yet, so a failure here rolls back by reopening the members.
  Status commit = options_.transition_fault ? options_.transition_fault("drop", group) : ok_status();
  for (std::size_t k = 0; commit.ok() && k < members.size(); ++k) {
    for (std::int64_t l : plan.members[k].layers_dropped) {
      if (!mirror_has_layer(plan.members[k].instance, l)) {
        commit = failed_precondition("device " + std::to_string(plan.members[k].instance) + " does not hold layer " + std::to_string(l));
      }
    }
  }
  if (!commit.ok()) {
    const std::shared_ptr<const Routing> r = routing();
    for (auto& m : members) {
      reopen_gate(*m, *r);
      m->engine->resume();
    }
    return commit;
  }
  record_plan("drop", group, plan.to_string());
  // The members' admission history (recent prompt lengths, for the lookahead's chunk cap) goes
  // with their requests into the group rather than starting it cold.
  // The members' histories interleave aligned at their newest entries (the group keeps the newest 64).
  std::vector<std::vector<std::int64_t>> histories;
  std::size_t longest = 0;
  for (auto& m : members) {
    histories.push_back(m->engine->scheduler().admission_history());
    longest = std::max(longest, histories.back().size());
  }
  std::vector<std::int64_t> history;
  for (std::size_t i = 0; i < longest; ++i) {
    for (const auto& h : histories) {
      if (h.size() + i >= longest) history.push_back(h[h.size() + i - longest]);
    }
  }
  // Carry it out: every request leaves its member; those the plan keeps with KV take their tables.
  std::set<RequestId> keep;
  for (const cluster::StaleKvPlan& s : plan.keep_kv) keep.insert(s.id);
  std::map<RequestId, engine::Engine::Detached> detached;
  std::map<RequestId, kv::BlockTable> home_tables;
  std::vector<RequestId> stale_ids;  // running at the drop: the requests the strategy is about
  for (const cluster::TransitionRequest& r : input.requests) {
    if (r.running) stale_ids.push_back(r.id);
  }
  for (std::size_t k = 0; k < members.size(); ++k) {
    Unit& m = *members[k];
    for (RequestId id : m.engine->scheduler().request_ids_in_order()) {
      const bool with_kv = keep.count(id) != 0;
      auto d = m.engine->detach(id, /*keep_kv=*/with_kv);
      KUN_CHECK(d.has_value());
      if (with_kv) home_tables.emplace(id, std::move(m.kv->export_tables(id).at(0)));
      detached.emplace(id, std::move(*d));
    }
  }
  std::int64_t dropped_bytes = 0;
  for (std::int64_t k = 0; k < g; ++k) {
    const cluster::MemberLayout& layout = plan.members[static_cast<std::size_t>(k)];
    kv::KvBlockAllocator& alloc = *allocators_[static_cast<std::size_t>(layout.instance)];
    for (std::int64_t l : layout.layers_dropped) {
      // Past the commit point (the layers were checked above): a failure here is a broken invariant.
      StatusOr<std::vector<std::int64_t>> pages_or = client().drop_layer(endpoint(layout.instance), l);
      KUN_CHECK(pages_or.ok()) << "drop of layer " << l << " on device " << layout.instance << ": " << pages_or.status().to_string();
      std::vector<memory::PageId> pages;
      for (std::int64_t p : *pages_or) pages.push_back(memory::PageId(p));
      KUN_CHECK_OK(alloc.add_pages(pages));
      mirror_set_layer(layout.instance, l, false);
      dropped_bytes += static_cast<std::int64_t>(pages.size()) * fleet_->geometry(static_cast<int>(layout.instance)).page_bytes;
    }
  }
  auto unit = make_unit(instances, group);
  unit->engine->mutable_scheduler().set_admission_history(history);
  // Stale requests keep their KV on the member they ran on; the group's KvManager knows it is
  // misplaced for the layers other members now run (the plan's moves), which reach it by remote
  // attention. Under `exchange` the unit then moves it home layer by layer between steps.
  const std::int64_t bs = options_.device.kv_block_size;
  const auto member_alloc = [&](std::int64_t k) -> kv::KvBlockAllocator& {
    return *allocators_[static_cast<std::size_t>(instances[static_cast<std::size_t>(k)])];
  };
  std::map<RequestId, std::int32_t> ran_on;  // an independent member holds every layer of its requests
  for (const cluster::TransitionRequest& r : input.requests) {
    if (!r.layer_member.empty()) ran_on[r.id] = r.layer_member.front();
  }
  {
    std::lock_guard<std::mutex> rl(requests_mu_);
    for (const cluster::StaleKvPlan& s : plan.keep_kv) {
      kv::BlockTable home = std::move(home_tables.at(s.id));
      KUN_CHECK_EQ(home.num_tokens(), s.tokens) << "request " << s.id;
      const std::int32_t stage = ran_on.at(s.id);
      std::map<std::int32_t, kv::BlockTable> tables;
      for (std::int64_t j = 0; j < g; ++j) {
        if (j == stage) continue;
        kv::BlockTable none(bs, 0, 0);  // no layers yet; the exchange adds them
        KUN_CHECK_OK(none.append_tokens(s.tokens, member_alloc(j)));
        tables.emplace(static_cast<std::int32_t>(j), std::move(none));
      }
      tables.emplace(stage, std::move(home));
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
  KUN_CHECK_EQ(moved, static_cast<std::int64_t>(detached.size())) << "drop of group " << group << " lost a request";
  launch(*unit);
  // Publish: the group replaces its members. Their gates retire first, handing what queued to
  // the group; a caller that meets a retired gate reloads the snapshot published just after.
  units_.erase(std::remove_if(units_.begin(), units_.end(),
                              [&](const auto& u) { return std::find(members.begin(), members.end(), u) != members.end(); }),
               units_.end());
  units_.push_back(std::move(unit));
  std::shared_ptr<const Routing> next = build_routing_locked();
  for (auto& m : members) retire_gate(*m, *next);
  publish_routing(std::move(next));
  for (auto& m : members) retire(m);
  members.clear();
  ClusterEvent ev;
  ev.time_us = clock_->now_us();
  ev.kind = "drop";
  ev.group = group;
  ev.instances = instances;
  ev.bytes = dropped_bytes;
  ev.latency_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ev.requests_moved = moved;
  const auto lost_kv = static_cast<std::int64_t>(plan.lose_kv.size());
  ev.requests_recomputed = lost_kv;  // running at the drop, no KV now (queued preempted ones recompute anyway)
  ev.stale_requests = std::move(stale_ids);
  ev.reason = reason + "; " + std::to_string(plan.keep_kv.size()) + " running requests keep their KV (" +
              cluster::stale_kv_strategy_name(options_.stale_kv) + "), " + std::to_string(lost_kv) + " recompute";
  record(std::move(ev));
  return group;
}

Status ClusterRuntime::restore_locked(std::int64_t group) {
  const auto t0 = std::chrono::steady_clock::now();
  auto it = std::find_if(units_.begin(), units_.end(), [&](const auto& u) { return u->group == group; });
  if (it == units_.end()) return not_found("no fused group " + std::to_string(group));
  KUN_CHECK((*it)->restoring.load() || (*it)->gathered.load()) << "group " << group << " splits before its gather phase";
  // The weights pulled since begin_restore have arrived (callers wait for weights_back before
  // they take transition_mu_), so this join returns at once: no lock waits on a transfer here.
  KUN_CHECK((*it)->weights_back.load(std::memory_order_acquire)) << "group " << group << " splits before its weights are back";
  if ((*it)->weight_pull.joinable()) (*it)->weight_pull.join();
  std::shared_ptr<Unit> unit = *it;
  const double gather_ms = std::chrono::duration<double, std::milli>(t0 - unit->restore_began).count();
  const std::string reason = unit->restore_reason;
  const std::vector<std::int64_t> instances = unit->instances;
  const auto g = static_cast<std::int64_t>(instances.size());
  const std::int64_t L = config_.num_layers;
  const auto member_alloc = [&](std::int64_t k) -> kv::KvBlockAllocator& {
    return *allocators_[static_cast<std::size_t>(instances[static_cast<std::size_t>(k)])];
  };
  // Only the group stops: its gate closes (what is routed to it meanwhile is handed to the
  // instances it splits into) and its engine parks at a step boundary.
  close_gate(*unit);
  unit->engine->pause();
  unit->engine->quiesce();
  // Commit point: nothing has moved yet; a failure leaves the group fused and restoring (the
  // policy thread retries the split later).
  if (Status commit = options_.transition_fault ? options_.transition_fault("split", group) : ok_status(); !commit.ok()) {
    reopen_gate(*unit, *routing());
    unit->engine->resume();
    return commit;
  }
  // The group's admission history goes to every instance it splits into.
  const std::vector<std::int64_t> history = unit->engine->scheduler().admission_history();
  cluster::SplitInput input;
  input.group = group;
  input.members = instances;
  input.strategy = options_.stale_kv;
  input.split_room_blocks = unit->restore_plan.split_room_blocks;
  std::vector<std::int32_t> stages(static_cast<std::size_t>(g));
  for (std::int64_t k = 0; k < g; ++k) stages[static_cast<std::size_t>(k)] = static_cast<std::int32_t>(k);
  input.requests = cluster::transition_requests(unit->engine->scheduler(), *unit->kv, stages);
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
  for (std::int64_t k = 0; k < g; ++k) input.free_blocks_now.push_back(member_alloc(k).num_free());
  const cluster::SplitPlan plan = cluster::plan_split(input, transition_geometry());
  record_plan("split", group, plan.to_string());
  const std::int64_t live_blocks = unit->live_gathered_blocks.load();
  std::int64_t pulled_bytes = unit->restore_pulled_bytes, repacked_blocks = unit->restore_repacked_blocks;
  const cluster::RestorePlan restore_plan = unit->restore_plan;
  const auto free_tables = [&](std::map<std::int32_t, kv::BlockTable>& tables) {
    for (auto& [k, t] : tables) t.free_all(member_alloc(k));
    tables.clear();
  };
  std::int64_t recomputed = 0;  // running requests that lose their KV here
  for (const cluster::Landing& l : plan.queued) {
    if (!l.lost_kv) continue;
    ++recomputed;
    auto tit = tables_of.find(l.id);
    if (tit != tables_of.end()) free_tables(tit->second);
  }
  // Each placed request's layers held elsewhere are copied to its member (stop-and-copy).
  std::int64_t exchanged_blocks = 0, exchanged_bytes = 0;
  std::map<RequestId, kv::BlockTable> placed;
  for (const cluster::Placement& p : plan.keep_kv) {
    auto& tables = tables_of.at(p.id);
    KUN_CHECK(tables.count(p.member) != 0) << "request " << p.id << " has no table on member " << p.member;
    kv::BlockTable& mine = tables.at(p.member);
    for (const cluster::LayerMove& m : p.moves) {
      KUN_CHECK_OK(mine.add_layer(m.layer, member_alloc(p.member)));
      const std::vector<kv::BlockId> from = tables.at(m.from).release_layer(m.layer);
      exchanged_bytes += move_kv(instances[static_cast<std::size_t>(m.from)], from, instances[static_cast<std::size_t>(p.member)],
                                 mine.layer_blocks(m.layer), TransferKind::kKvExchange);
      member_alloc(m.from).free(from);
      exchanged_blocks += static_cast<std::int64_t>(from.size());
    }
    KUN_CHECK_EQ(mine.num_layers(), L) << "request " << p.id << " gathered";
    KUN_CHECK_EQ(mine.num_tokens(), p.tokens) << "request " << p.id;
    placed.emplace(p.id, std::move(mine));
  }
  // Layers whose pages the pool could not spare at begin_restore get them now: repack live blocks
  // out of the pages the allocator picks (copies inside the device), then pull the weights from
  // the peer that kept them, with the group paused.
  for (const cluster::WeightPull& wp : restore_plan.pulls) {
    const std::int64_t inst = instances[static_cast<std::size_t>(wp.member)];
    if (mirror_has_layer(inst, wp.layer)) continue;  // pulled during the gather
    const auto remap = [&](std::span<const kv::BlockMove> moves) {
      std::int64_t remapped = 0;
      for (const cluster::Placement& p : plan.keep_kv) {
        if (p.member == wp.member) remapped += placed.at(p.id).remap_blocks(moves);
      }
      return remapped;
    };
    // Past the commit point: every request has left the group. The plan sized the split so these
    // pages exist (free blocks, repacked); a shortfall is a broken invariant, not a lost request.
    StatusOr<std::vector<memory::PageId>> pages_or = reclaim_layer_pages(inst, remap, &repacked_blocks);
    KUN_CHECK(pages_or.ok()) << "split of group " << group << ": layer " << wp.layer << " on device " << inst << ": "
                             << pages_or.status().to_string();
    std::vector<std::int64_t> pages;
    for (memory::PageId page : *pages_or) pages.push_back(page.value);
    const std::int64_t owner = instances[static_cast<std::size_t>(wp.from)];
    const Status pulled = client().pull_layer(endpoint(inst), wp.layer, endpoint(owner), pages);
    KUN_CHECK(pulled.ok()) << "split of group " << group << ": pull of layer " << wp.layer << " by device " << inst << ": "
                           << pulled.to_string();
    mirror_set_layer(inst, wp.layer, true);
    pulled_bytes += fleet_->geometry(static_cast<int>(owner)).layer_segment_bytes;
  }
  for (std::int64_t inst : instances) {
    auto snap = client().check_integrity(endpoint(inst));
    KUN_CHECK(snap.ok()) << "device " << inst << ": " << snap.status().to_string();
    KUN_CHECK_EQ(snap->kv_pages, allocators_[static_cast<std::size_t>(inst)]->num_pages()) << "device " << inst;
  }
  std::vector<Unit*> fresh_units;
  std::vector<std::shared_ptr<Unit>> fresh;
  for (std::int64_t inst : instances) {
    fresh.push_back(make_unit({inst}, -1));
    fresh.back()->engine->mutable_scheduler().set_admission_history(history);
    fresh_units.push_back(fresh.back().get());
  }
  const auto moved = static_cast<std::int64_t>(plan.keep_kv.size() + plan.queued.size());
  KUN_CHECK_EQ(moved, static_cast<std::int64_t>(detached.size())) << "split of group " << group << " lost a request";
  {
    std::lock_guard<std::mutex> rl(requests_mu_);
    for (const cluster::Placement& p : plan.keep_kv) {
      Unit* u = fresh_units[static_cast<std::size_t>(p.member)];
      std::map<std::int32_t, kv::BlockTable> whole;
      whole.emplace(0, std::move(placed.at(p.id)));
      u->kv->import_tables(p.id, p.tokens, std::move(whole));
      request_instance_[p.id] = u->instances.front();
      u->engine->adopt_with_imported_kv(std::move(detached.at(p.id)));
    }
    for (const cluster::Landing& l : plan.queued) {
      Unit* u = fresh_units[static_cast<std::size_t>(l.member)];
      request_instance_[l.id] = u->instances.front();
      KUN_CHECK_OK(u->engine->adopt(std::move(detached.at(l.id)), /*with_kv=*/false));
    }
  }
  for (Unit* u : fresh_units) launch(*u);
  // Publish: the instances replace the group, whose gate retires handing what queued to them.
  units_.erase(std::find(units_.begin(), units_.end(), unit));
  for (auto& f : fresh) units_.push_back(std::move(f));
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
  ev.kind = "restore";
  ev.group = group;
  ev.instances = instances;
  ev.bytes = pulled_bytes;
  ev.latency_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ev.requests_moved = moved;
  ev.gather_ms = gather_ms;
  ev.kv_blocks_exchanged = exchanged_blocks;
  ev.kv_blocks_gathered_live = live_blocks;
  ev.requests_recomputed = recomputed;
  ev.blocks_repacked = repacked_blocks;
  ev.reason = reason + "; KV gathered back: " + std::to_string(plan.keep_kv.size()) + " requests, " + std::to_string(live_blocks) +
              " blocks while decoding, " + std::to_string(exchanged_blocks) + " blocks, " + std::to_string(exchanged_bytes) +
              " bytes at the split (" +
              std::to_string(repacked_blocks) + " blocks repacked, " + std::to_string(recomputed) + " requests recompute)";
  record(std::move(ev));
  return ok_status();
}

Status ClusterRuntime::migrate_locked(RequestId request, std::int64_t to_instance, const std::string& reason) {
  const auto t0 = std::chrono::steady_clock::now();
  std::int64_t from_instance;
  {
    std::lock_guard<std::mutex> rl(requests_mu_);
    auto it = request_instance_.find(request);
    if (it == request_instance_.end()) return not_found("request " + std::to_string(request.value) + " is not live");
    from_instance = it->second;
  }
  Unit* from = unit_of_instance(from_instance);
  Unit* to = unit_of_instance(to_instance);
  if (from == nullptr || to == nullptr || from == to) return invalid_argument("migration needs two different instances");
  if (from->group >= 0 || to->group >= 0) return failed_precondition("migration is between independent instances");
  // Both gates close, so no cancel of the moving request can reach the engine it is leaving
  // after it left; they reopen (handing on what queued) once request_instance_ names its new home.
  close_gate(*from);
  close_gate(*to);
  from->engine->pause();
  to->engine->pause();
  auto resume = [&] {
    const std::shared_ptr<const Routing> r = routing();
    reopen_gate(*from, *r);
    reopen_gate(*to, *r);
    from->engine->resume();
    to->engine->resume();
  };
  std::optional<engine::Engine::Detached> d = from->engine->detach(request, /*keep_kv=*/true);
  if (!d) {
    resume();
    return not_found("request " + std::to_string(request.value) + " finished before it could move");
  }
  const bool live = from->kv->tokens_held(request) > 0 && d->request.state == engine::RequestState::kRunning;
  std::int64_t bytes = 0, blocks = 0;
  if (live && to->kv->can_grow(request, d->request.num_computed)) {
    const std::vector<engine::LayerBlockList> src = from->kv->block_lists(request);
    KUN_CHECK_OK(to->engine->adopt(std::move(*d), /*with_kv=*/true));
    const std::vector<engine::LayerBlockList> dst = to->kv->block_lists(request);
    KUN_CHECK_EQ(src.size(), dst.size());
    const auto ids = [](const std::vector<std::int64_t>& v) {
      std::vector<kv::BlockId> out;
      for (std::int64_t b : v) out.push_back(kv::BlockId(b));
      return out;
    };
    std::vector<kv::BlockId> src_blocks, dst_blocks;  // every layer's blocks, one message
    for (std::size_t i = 0; i < src.size(); ++i) {
      KUN_CHECK_EQ(src[i].layer, dst[i].layer);
      KUN_CHECK_EQ(src[i].blocks.size(), dst[i].blocks.size());
      for (kv::BlockId b : ids(src[i].blocks)) src_blocks.push_back(b);
      for (kv::BlockId b : ids(dst[i].blocks)) dst_blocks.push_back(b);
    }
    bytes += move_kv(from_instance, src_blocks, to_instance, dst_blocks, TransferKind::kKvMigration);
    blocks += static_cast<std::int64_t>(src_blocks.size());
    from->engine->mutable_scheduler().release_detached(request);
  } else if (live) {
    // The destination cannot hold its KV: it stays where it is.
    KUN_CHECK_OK(from->engine->adopt(std::move(*d), /*with_kv=*/true));
    resume();
    return resource_exhausted("instance " + std::to_string(to_instance) + " has no room for the request's KV");
  } else {
    from->engine->mutable_scheduler().release_detached(request);
    KUN_CHECK_OK(to->engine->adopt(std::move(*d), /*with_kv=*/false));
  }
  {
    std::lock_guard<std::mutex> rl(requests_mu_);
    request_instance_[request] = to_instance;
  }
  resume();
  {
    std::lock_guard<std::mutex> el(events_mu_);
    kv_blocks_moved_ += blocks;
  }
  ClusterEvent ev;
  ev.time_us = clock_->now_us();
  ev.kind = "migrate";
  ev.instances = {from_instance, to_instance};
  ev.bytes = bytes;
  ev.latency_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ev.requests_moved = 1;
  ev.reason = reason;
  record(std::move(ev));
  return ok_status();
}

void ClusterRuntime::abandon_drop_locked(std::int64_t group) {
  // The coordinator has no "drop failed" edge; the group it created goes through its whole
  // lifecycle at once (formed, restore requested, restored), which leaves its members independent
  // as they are in the runtime.
  const std::int64_t now = clock_->now_us();
  coordinator_->on_drop_done(group, now);
  KUN_CHECK_OK(coordinator_->force_restore(group, now).status());
  coordinator_->on_restore_started(group, now);
  coordinator_->on_restore_done(group, now);
}

void ClusterRuntime::run_actions(const cluster::Actions& actions) {
  for (const auto& r : actions.restores) {
    coordinator_->on_restore_started(r.group, clock_->now_us());
    Status s = begin_restore_locked(r.group, r.reason);
    if (!s.ok()) {
      Unit* u = nullptr;
      for (const auto& unit : units_) {
        if (unit->group == r.group) u = unit.get();
      }
      record_failure("restore", r.group, u ? u->instances : std::vector<std::int64_t>{}, s);
    }
  }
  finish_gathered_restores();  // groups with nothing to gather split at once
  for (const auto& d : actions.drops) {
    KUN_CHECK(d.absorbs.empty()) << "group growth reached the runtime, which refuses it";
    auto s = drop_locked(d.instances, d.group, d.reason);
    if (!s.ok()) {
      record_failure("drop", d.group, d.instances, s.status());
      abandon_drop_locked(d.group);
      continue;
    }
    coordinator_->on_drop_done(d.group, clock_->now_us());
  }
  for (const auto& m : actions.migrations) {
    Status s = migrate_locked(m.request, m.to, m.reason);
    if (!s.ok()) {
      KUN_LOG(kInfo) << "migration of request " << m.request << " skipped: " << s.to_string();
    }
    coordinator_->on_migration_done(m.request);
  }
}

void ClusterRuntime::policy_loop() {
  // The coordinator ticks every monitor period; in between, a finished gather wakes the loop to
  // split its group at once.
  const auto period = std::chrono::microseconds(options_.coordinator.monitor.sample_period_us);
  auto next_tick = std::chrono::steady_clock::now() + period;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(policy_mu_);
      policy_cv_.wait_until(lock, next_tick, [this] { return stopping_ || restore_progress_; });
      if (stopping_) return;
      restore_progress_ = false;
    }
    std::unique_lock lock(transition_mu_);
    if (std::chrono::steady_clock::now() >= next_tick) {
      next_tick = std::chrono::steady_clock::now() + period;
      const cluster::Actions actions = coordinator_->tick(clock_->now_us(), snapshots_of(units_));
      if (!actions.empty()) run_actions(actions);
    }
    finish_gathered_restores();
  }
}

bool ClusterRuntime::run_step_all() {
  std::unique_lock lock(transition_mu_);
  bool any = false;
  for (auto& u : units_) any = u->engine->run_step() || any;
  return any;
}

std::int64_t ClusterRuntime::dropped_param_bytes(std::int64_t instance) const {
  const DeviceGeometry& geo = fleet_->geometry(static_cast<int>(instance));
  std::int64_t dropped = 0;
  {
    std::lock_guard<std::mutex> lock(mirror_mu_);
    for (char r : resident_[static_cast<std::size_t>(instance)]) dropped += r == 0 ? 1 : 0;
  }
  return dropped * geo.pages_per_layer * geo.page_bytes;
}

void ClusterRuntime::check_integrity() {
  // Weight pulls in flight change a device's pages under the front end's feet (pages leave its
  // allocator at begin_restore, its arena when the pull lands): wait for them, without the
  // transition lock, then check with the lock held and every engine paused.
  std::unique_lock lock(transition_mu_);
  while (true) {
    std::shared_ptr<Unit> pulling;
    for (const auto& u : units_) {
      if (u->weight_pull.joinable() && !u->weights_back.load(std::memory_order_acquire)) pulling = u;
    }
    if (pulling == nullptr) break;
    lock.unlock();
    {
      std::unique_lock<std::mutex> pl(policy_mu_);
      policy_cv_.wait(pl, [&] { return pulling->weights_back.load(std::memory_order_acquire); });
    }
    lock.lock();
  }
  for (auto& u : units_) u->engine->pause();
  // What each device reports of itself (its agent checks its arena's page accounting).
  std::vector<DeviceSnapshot> reported;
  for (std::int64_t i = 0; i < options_.num_instances; ++i) {
    auto snap = client().check_integrity(endpoint(i));
    KUN_CHECK(snap.ok()) << "device " << i << ": " << snap.status().to_string();
    reported.push_back(std::move(*snap));
  }
  const auto holds = [&](std::int64_t inst, std::int64_t l) {
    const auto& layers = reported[static_cast<std::size_t>(inst)].resident_layers;
    const bool held = std::find(layers.begin(), layers.end(), l) != layers.end();
    KUN_CHECK_EQ(held, mirror_has_layer(inst, l)) << "the front end's mirror of device " << inst << " is wrong about layer " << l;
    return held;
  };
  const std::int64_t L = config_.num_layers;
  std::set<RequestId> seen;
  for (auto& u : units_) {
    {
      // Between transitions every gate is open and empty: nothing waits for a hand-over.
      std::lock_guard<std::mutex> gl(u->gate.mu);
      KUN_CHECK(!u->gate.closed && !u->gate.retired && u->gate.submits.empty() && u->gate.cancels.empty())
          << "unit of instance " << u->instances.front() << " has a closed gate or requests waiting at it";
    }
    u->kv->check_integrity();
    u->engine->scheduler().check_invariants();
    for (RequestId id : u->engine->scheduler().request_ids_in_order()) {
      KUN_CHECK(seen.insert(id).second) << "request " << id << " is in two units";
    }
    // The members together hold every layer exactly once (all of them when independent).
    for (std::int64_t l = 0; l < L; ++l) {
      int holders = 0;
      for (std::int64_t inst : u->instances) holders += holds(inst, l) ? 1 : 0;
      if (u->restoring.load() || u->gathered.load()) {
        // A restoring group pulls its dropped layers back while it serves from the stage owners.
        const std::int64_t g = static_cast<std::int64_t>(u->instances.size());
        const std::int64_t owner = u->instances[static_cast<std::size_t>(stage_of_layer(l, g, L))];
        KUN_CHECK(holds(owner, l)) << "layer " << l << " left its stage owner " << owner;
      } else {
        KUN_CHECK_EQ(holders, 1) << "layer " << l << " in unit of instance " << u->instances.front();
      }
    }
  }
  for (std::size_t i = 0; i < reported.size(); ++i) {
    KUN_CHECK_EQ(reported[i].kv_pages, allocators_[i]->num_pages()) << "device " << i;
  }
  for (auto& u : units_) u->engine->resume();
}

}  // namespace kun::runtime
