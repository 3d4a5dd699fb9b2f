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

}  // namespace

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
  fleet_options.agent_fault = options.agent_fault;  // in-process fleets only (tests)
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
  // Growth (an overloaded group g -> 2g) and partial restore (shrink 2g -> g) follow the
  // coordinator's planner options, as in the simulator; runtime/cluster_regroup.cc carries them out.
  const cluster::CoordinatorConfig& coordinator = options.coordinator;
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
    stages.push_back(StageSpec{endpoint(inst), cluster::stage_layer_begin(k, g, L), cluster::stage_layer_begin(k + 1, g, L)});
    allocs.push_back(allocators_[static_cast<std::size_t>(inst)].get());
  }
  std::vector<std::int32_t> layer_device(static_cast<std::size_t>(L));
  for (std::int64_t l = 0; l < L; ++l) layer_device[static_cast<std::size_t>(l)] = static_cast<std::int32_t>(cluster::stage_holding_layer(l, g, L));
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
  unit->engine->set_step_observer([raw, this](const engine::StepPlan& plan, const engine::StepResult& result) {
    const std::int64_t now = clock_->now_us();
    std::int64_t expected = -1;
    raw->first_step_us.compare_exchange_strong(expected, now);
    if (!options_.record_steps) return;
    StepRecord r;
    r.end_us = now;
    r.duration_us = result.duration_us;
    r.unit_devices = static_cast<std::int32_t>(raw->instances.size());
    r.first_instance = raw->instances.front();
    r.sequences = static_cast<std::int32_t>(plan.sequences.size());
    for (const auto& s : plan.sequences) {
      const auto n = static_cast<std::int64_t>(s.tokens.size());
      r.new_tokens += n;
      r.sampled += s.sample ? 1 : 0;
      r.attended_pairs += n * s.start_pos + n * (n + 1) / 2;  // causal, as sim::CostModel counts
    }
    r.swap_blocks = static_cast<std::int32_t>(plan.swap_in.size() + plan.swap_out.size());
    std::lock_guard<std::mutex> lock(steps_mu_);
    step_records_.push_back(r);
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
  // A shrinking group gathers each request homed at begin_shrink onto its half (requests that
  // start later stay on their stages: the switch places and copies them).
  // Its moves wait for the weights: a KV move queued on a link behind a layer's bulk transfer
  // would hold this engine thread (and the group's next step) for the whole transfer.
  const bool restoring = unit.restoring.load(std::memory_order_acquire);
  const bool shrinking = unit.shrinking.load(std::memory_order_acquire);
  const bool gathering = restoring || shrinking;
  if (!gathering && options_.stale_kv != cluster::StaleKvStrategy::kExchange) return;
  const bool all_homed = !restoring || engine::assign_restore_homes(unit.engine->scheduler(), *unit.kv, unit.split_room).all_homed;
  const bool defer_moves = shrinking && !unit.weights_back.load(std::memory_order_acquire);
  std::int64_t moved = 0, blocks = 0;
  for (RequestId id : defer_moves ? std::vector<RequestId>{} : unit.kv->requests_with_misplaced_layers()) {
    if (moved >= options_.exchange_requests_per_round) break;
    if (in_flight(id)) continue;
    const std::int64_t layer = unit.kv->misplaced_layers(id).front();
    bool transfer_failed = false;
    Status s = unit.kv->try_move_layer(id, layer, [&](std::int32_t from, const std::vector<kv::BlockId>& from_blocks,
                                                      std::int32_t to, const std::vector<kv::BlockId>& to_blocks) {
      const std::int64_t src = unit.instances[static_cast<std::size_t>(from)];
      const std::int64_t dst = unit.instances[static_cast<std::size_t>(to)];
      const Status moved_kv = move_kv(src, from_blocks, dst, to_blocks, TransferKind::kKvExchange);
      transfer_failed = !moved_kv.ok();
      if (moved_kv.ok()) blocks += static_cast<std::int64_t>(from_blocks.size());
      return moved_kv;
    });
    if (transfer_failed) {
      // Nothing changed: the layer stays where it is and remote attention keeps serving it; a
      // later round (or the split's stop-and-copy, which recomputes what it cannot move) retries.
      record_failure("exchange", unit.group, unit.instances, s,
                     "request " + std::to_string(id.value) + " keeps layer " + std::to_string(layer) + " where it was");
    }
    if (!s.ok()) break;
    ++moved;
  }
  if (blocks > 0) {
    if (gathering) unit.live_gathered_blocks.fetch_add(blocks, std::memory_order_relaxed);
    std::lock_guard<std::mutex> el(events_mu_);
    kv_blocks_moved_ += blocks;
  }
  if (gathering && all_homed && !unit.gathered.load(std::memory_order_relaxed) &&
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

void ClusterRuntime::finish_gathered_restores(TransitionLock& lock) {
  const auto now = std::chrono::steady_clock::now();
  std::vector<std::int64_t> ready;
  for (const auto& u : units_) {
    if (u->group < 0 || u->in_transition || !(u->in_restore() || u->shrinking.load())) continue;  // neither restoring nor shrinking
    // The weight pull always finishes (a bounded transfer that wakes this loop); the split waits
    // for it rather than joining it under transition_mu_.
    if (!u->weights_back.load(std::memory_order_acquire)) continue;
    const bool done = u->gathered.load(std::memory_order_acquire);
    if (done || now - u->restore_began >= std::chrono::microseconds(options_.restore_gather_timeout_us)) ready.push_back(u->group);
  }
  for (std::int64_t group : ready) {
    // Each split releases transition_mu_ while it works: another thread may have taken the group.
    const std::shared_ptr<Unit> u = group_unit_locked(group);
    if (u == nullptr || u->in_transition || !(u->in_restore() || u->shrinking.load())) continue;  // a shrink() rolled back meanwhile
    if (u->shrinking.load()) {
      (void)finish_shrink_locked(lock, group);  // cluster_regroup.cc; a failure is recorded and the group stays whole
      continue;
    }
    const std::vector<std::int64_t> instances = u->instances;
    Status s = restore_locked(lock, group);
    if (!s.ok()) {
      // The group stays fused and restoring; the next wake of the policy loop tries again.
      record_failure("split", group, instances, s);
      continue;
    }
    coordinator_->on_restore_done(group, clock_->now_us());
  }
}

bool ClusterRuntime::any_in_transition_locked() const {
  return std::any_of(units_.begin(), units_.end(), [](const auto& u) { return u->in_transition; });
}

std::vector<std::shared_ptr<ClusterRuntime::Unit>> ClusterRuntime::reserve_all_locked(TransitionLock& lock) {
  transition_cv_.wait(lock, [&] { return !any_in_transition_locked(); });
  for (auto& u : units_) u->in_transition = true;
  return units_;
}

void ClusterRuntime::release_locked(const std::vector<std::shared_ptr<Unit>>& units) const {
  for (const auto& u : units) u->in_transition = false;
  transition_cv_.notify_all();
}

void ClusterRuntime::wait_instances_free_locked(TransitionLock& lock, const std::vector<std::int64_t>& instances) const {
  transition_cv_.wait(lock, [&] {
    for (std::int64_t inst : instances) {
      const Unit* u = unit_of_instance(inst);
      if (u != nullptr && u->in_transition) return false;
    }
    return true;
  });
}

void ClusterRuntime::wait_group_free_locked(TransitionLock& lock, std::int64_t group) const {
  transition_cv_.wait(lock, [&] {
    const std::shared_ptr<Unit> u = group_unit_locked(group);
    return u == nullptr || !u->in_transition;
  });
}

std::shared_ptr<ClusterRuntime::Unit> ClusterRuntime::group_unit_locked(std::int64_t group) const {
  for (const auto& u : units_) {
    if (u->group == group) return u;
  }
  return nullptr;
}

void ClusterRuntime::start() {
  {
    TransitionLock lock(transition_mu_);
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
  // Transitions still in flight (called from other threads) finish first; the engines' threads
  // are joined without transition_mu_.
  TransitionLock lock(transition_mu_);
  const std::vector<std::shared_ptr<Unit>> all = reserve_all_locked(lock);
  lock.unlock();
  for (auto& u : all) u->engine->stop();
  lock.lock();
  release_locked(all);
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
  TransitionLock lock(transition_mu_);
  wait_instances_free_locked(lock, {instance});
  std::shared_ptr<Unit> u;
  for (const auto& unit : units_) {
    if (std::find(unit->instances.begin(), unit->instances.end(), instance) != unit->instances.end()) u = unit;
  }
  if (u == nullptr) return {};
  u->in_transition = true;  // pausing waits for a step boundary: not under transition_mu_
  lock.unlock();
  u->engine->pause();
  std::vector<std::int64_t> h = u->engine->scheduler().admission_history();
  u->engine->resume();
  lock.lock();
  release_locked({u});
  return h;
}

void ClusterRuntime::record_failure(const std::string& kind, std::int64_t group, const std::vector<std::int64_t>& instances,
                                    const Status& status, const std::string& outcome) {
  KUN_LOG(kWarn) << "cluster " << kind << " of group " << group << " failed (" << outcome << "): " << status.to_string();
  ClusterEvent ev;
  ev.time_us = clock_->now_us();
  ev.kind = kind + "_failed";
  ev.group = group;
  ev.instances = instances;
  ev.reason = outcome + ": " + status.to_string();
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
    const engine::Engine::PublishedView view = u->engine->published_view();
    const auto g = static_cast<std::int64_t>(u->instances.size());
    const engine::InstanceStats is = member_share(view.stats.instances.front(), g);
    std::vector<engine::RequestSummary> reqs;
    if (g == 1 && options_.coordinator.policy == cluster::Policy::kMigrate) reqs = u->engine->request_summaries();
    // Queued: the published waiting requests plus those submitted since (the engine's inbox).
    // The published count alone misses every request routed here during the step in flight, so
    // the router sent a whole burst to the lowest id (34 / 28 / 19 / 19 % of the tokens on 4
    // instances in the validation runs; the simulator showed it costs kunserve its peak ratio).
    const std::int64_t queued = view.queued_estimate;
    // Likewise the KV those requests' prompts want: the demand the monitor votes on (engine.h).
    const std::int64_t unpublished_blocks = view.unpublished_pending_blocks / g;
    for (std::int64_t k = 0; k < g; ++k) {
      cluster::InstanceSnapshot s;
      s.instance = u->instances[static_cast<std::size_t>(k)];
      s.group = u->group;
      s.state = u->group < 0 ? cluster::GroupState::kInitial
                : u->in_restore() ? cluster::GroupState::kRestoring
                                                            : cluster::GroupState::kDropped;
      s.kv_blocks_total = is.kv_blocks_total;
      s.kv_blocks_free = is.kv_blocks_free;
      s.blocks_demanded = is.blocks_demanded + unpublished_blocks;
      s.pending_blocks = is.pending_blocks + unpublished_blocks;
      s.num_running = cluster::member_count_share(is.num_running, g, k);
      s.num_queued = cluster::member_count_share(queued, g, k);
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
  // one: hand-overs happen only while a transition publishes or rolls back, under
  // transition_mu_, so two gates are never locked in opposite orders. When
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
        is.group_state = u->group < 0 ? "INITIAL" : u->in_restore() ? "RESTORING" : "DROPPED";
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
  out.grows_total = grows_;
  out.shrinks_total = shrinks_;
  out.transition_failures_total = transition_failures_;
  out.kv_blocks_exchanged_total = kv_blocks_moved_;
  out.drop_latency_ms = drop_latency_ms_;
  out.drop_quiesce_ms = drop_quiesce_ms_;
  out.drop_layers = drop_layers_;
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
    drop_quiesce_ms_.push_back(ev.quiesce_ms);
    drop_layers_.push_back(ev.layers_dropped);
  } else if (ev.kind == "restore") {
    ++restores_;
    restore_latency_ms_.push_back(ev.latency_ms);
  } else if (ev.kind == "grow") {
    ++grows_;
  } else if (ev.kind == "shrink") {
    ++shrinks_;
  }
  events_.push_back(std::move(ev));
}

std::vector<StepRecord> ClusterRuntime::step_records() const {
  std::lock_guard<std::mutex> lock(steps_mu_);
  return step_records_;
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
  TransitionLock lock(transition_mu_);
  wait_instances_free_locked(lock, instances);
  KUN_ASSIGN_OR_RETURN(cluster::DropAction action, coordinator_->force_drop(instances, clock_->now_us()));
  action.reason = "forced";
  StatusOr<std::int64_t> group = drop_locked(lock, action);
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
    TransitionLock lock(transition_mu_);
    wait_group_free_locked(lock, group);
    const cluster::GroupInfo* info = coordinator_->group(group);
    if (info == nullptr || info->state != cluster::GroupState::kRestoring) {
      KUN_ASSIGN_OR_RETURN(cluster::RestoreAction action, coordinator_->force_restore(group, clock_->now_us()));
      coordinator_->on_restore_started(group, clock_->now_us());
      KUN_RETURN_IF_ERROR(begin_restore_locked(lock, group, "forced"));
    }
    unit = group_unit_locked(group);
  }
  if (unit == nullptr) return not_found("no fused group " + std::to_string(group));
  // The weights come back on the pull thread while the group decodes; wait for them without
  // transition_mu_, so other transitions (and the policy loop) are not held up by the transfer.
  {
    std::unique_lock<std::mutex> pl(policy_mu_);
    policy_cv_.wait(pl, [&] { return unit->weights_back.load(std::memory_order_acquire); });
  }
  TransitionLock lock(transition_mu_);
  wait_group_free_locked(lock, group);
  if (std::find(units_.begin(), units_.end(), unit) == units_.end()) return ok_status();  // the policy loop split it meanwhile
  if (Status s = restore_locked(lock, group); !s.ok()) {
    record_failure("split", group, unit->instances, s);
    return s;
  }
  coordinator_->on_restore_done(group, clock_->now_us());
  return ok_status();
}

bool ClusterRuntime::ready_to_split(std::int64_t group) const {
  TransitionLock lock(transition_mu_);
  for (const auto& u : units_) {
    if (u->group == group) return u->gathered.load(std::memory_order_acquire) && u->weights_back.load(std::memory_order_acquire);
  }
  return false;
}

Status ClusterRuntime::begin_restore(std::int64_t group) {
  TransitionLock lock(transition_mu_);
  wait_group_free_locked(lock, group);
  KUN_ASSIGN_OR_RETURN(cluster::RestoreAction action, coordinator_->force_restore(group, clock_->now_us()));
  coordinator_->on_restore_started(group, clock_->now_us());
  return begin_restore_locked(lock, group, "forced");
}

Status ClusterRuntime::migrate(RequestId request, std::int64_t to_instance) {
  TransitionLock lock(transition_mu_);
  const std::int64_t from_instance = instance_of(request);
  wait_instances_free_locked(lock, {from_instance, to_instance});
  return migrate_locked(lock, request, to_instance, "forced");
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

void ClusterRuntime::run_actions(TransitionLock& lock, const cluster::Actions& actions) {
  // Each transition below releases transition_mu_ while it works, so a transition called from
  // another thread may take units meanwhile: an action whose units are in transition is skipped.
  const auto busy = [&](const std::vector<std::int64_t>& instances) {
    return std::any_of(instances.begin(), instances.end(), [&](std::int64_t inst) {
      const Unit* u = unit_of_instance(inst);
      return u != nullptr && u->in_transition;
    });
  };
  for (const auto& r : actions.restores) {
    coordinator_->on_restore_started(r.group, clock_->now_us());
    const std::shared_ptr<Unit> u = group_unit_locked(r.group);
    Status s = u != nullptr && u->in_transition ? unavailable("group " + std::to_string(r.group) + " is in another transition")
                                                : begin_restore_locked(lock, r.group, r.reason);
    if (!s.ok()) record_failure("restore", r.group, u ? u->instances : std::vector<std::int64_t>{}, s);
  }
  finish_gathered_restores(lock);  // groups with nothing to gather split at once
  for (const auto& sh : actions.shrinks) {
    const std::shared_ptr<Unit> u = group_unit_locked(sh.group);
    if (u != nullptr && u->in_transition) {
      KUN_LOG(kInfo) << "shrink of group " << sh.group << " skipped: it is in another transition";
      coordinator_->abandon_shrink(sh.group, clock_->now_us());
      continue;
    }
    (void)run_shrink_locked(lock, sh);  // cluster_regroup.cc; failures are recorded
  }
  for (const auto& d : actions.drops) {
    if (busy(d.instances)) {
      KUN_LOG(kInfo) << (d.absorbs.empty() ? "drop" : "growth") << " of group " << d.group
                     << " skipped: a member is in another transition";
      if (d.absorbs.empty()) {
        abandon_drop_locked(d.group);
      } else {
        coordinator_->abandon_growth(d.group, absorbed_groups_locked(d.absorbs), clock_->now_us());
      }
      continue;
    }
    if (!d.absorbs.empty()) {
      (void)run_growth_locked(lock, d);  // cluster_regroup.cc; failures are recorded
      continue;
    }
    auto s = drop_locked(lock, d);
    if (!s.ok()) {
      record_failure("drop", d.group, d.instances, s.status());
      abandon_drop_locked(d.group);
      continue;
    }
    coordinator_->on_drop_done(d.group, clock_->now_us());
  }
  for (const auto& m : actions.migrations) {
    Status s = busy({instance_of(m.request), m.to}) ? unavailable("an instance is in another transition")
                                                     : migrate_locked(lock, m.request, m.to, m.reason);
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
    TransitionLock lock(transition_mu_);
    if (std::chrono::steady_clock::now() >= next_tick) {
      next_tick = std::chrono::steady_clock::now() + period;
      // A transition in flight (called from another thread) owns some units: the coordinator
      // would plan over a cluster in motion, so this tick is skipped (the next one runs).
      if (!any_in_transition_locked()) {
        const cluster::Actions actions = coordinator_->tick(clock_->now_us(), snapshots_of(units_));
        if (!actions.empty()) run_actions(lock, actions);
      }
    }
    finish_gathered_restores(lock);
  }
}

bool ClusterRuntime::run_step_all() {
  // Steps wait on agents: the units are reserved and the steps run without transition_mu_.
  TransitionLock lock(transition_mu_);
  const std::vector<std::shared_ptr<Unit>> all = reserve_all_locked(lock);
  lock.unlock();
  bool any = false;
  for (auto& u : all) any = u->engine->run_step() || any;
  lock.lock();
  release_locked(all);
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
  // Transitions in flight finish first (transition_cv_). Weight pulls in flight change a
  // device's pages under the front end's feet (pages leave its allocator at begin_restore, its
  // arena when the pull lands): wait for them too, without the transition lock. Then every unit
  // is reserved (no transition starts meanwhile) and checked with its engine paused, without
  // transition_mu_ (pausing waits for a step boundary, the checks for agents).
  TransitionLock lock(transition_mu_);
  std::vector<std::shared_ptr<Unit>> all;
  while (true) {
    transition_cv_.wait(lock, [&] { return !any_in_transition_locked(); });
    std::shared_ptr<Unit> pulling;
    for (const auto& u : units_) {
      if (u->weight_pull.joinable() && !u->weights_back.load(std::memory_order_acquire)) pulling = u;
    }
    if (pulling == nullptr) {
      all = reserve_all_locked(lock);
      break;
    }
    lock.unlock();
    {
      std::unique_lock<std::mutex> pl(policy_mu_);
      policy_cv_.wait(pl, [&] { return pulling->weights_back.load(std::memory_order_acquire); });
    }
    lock.lock();
  }
  lock.unlock();
  for (auto& u : all) u->engine->pause();
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
  for (auto& u : all) {
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
      if (u->in_restore() || u->shrinking.load()) {
        // A restoring (or shrinking) group pulls layers back while it serves from the stage owners.
        const std::int64_t g = static_cast<std::int64_t>(u->instances.size());
        const std::int64_t owner = u->instances[static_cast<std::size_t>(cluster::stage_holding_layer(l, g, L))];
        KUN_CHECK(holds(owner, l)) << "layer " << l << " left its stage owner " << owner;
      } else {
        // Once each, plus the copies members kept because their drop_layer failed.
        const auto kept = std::count_if(u->kept_layers.begin(), u->kept_layers.end(), [&](const auto& k) { return k.second == l; });
        KUN_CHECK_EQ(holders, 1 + kept) << "layer " << l << " in unit of instance " << u->instances.front();
      }
    }
  }
  // Pages of a weight pull that failed during a gather left the front end's pool but are still KV
  // pages on the device (the split gives them back).
  std::vector<std::int64_t> set_aside(reported.size(), 0);
  for (auto& u : all) {
    for (const Unit::FailedPull& f : u->failed_pulls) set_aside[static_cast<std::size_t>(f.instance)] += static_cast<std::int64_t>(f.pages.size());
  }
  for (std::size_t i = 0; i < reported.size(); ++i) {
    KUN_CHECK_EQ(reported[i].kv_pages, allocators_[i]->num_pages() + set_aside[i]) << "device " << i;
  }
  for (auto& u : all) u->engine->resume();
  lock.lock();
  release_locked(all);
}

}  // namespace kun::runtime
