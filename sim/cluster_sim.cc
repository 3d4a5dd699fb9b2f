#include "sim/cluster_sim.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>

#include "cluster/planner.h"
#include "cluster/transition_snapshot.h"
#include "common/check.h"
#include "common/log.h"
#include "engine/restore_homes.h"

namespace kun::sim {

struct ClusterSim::Unit {
  std::vector<std::int64_t> members;  // instance ids in stage order
  std::int64_t group = -1;
  std::vector<std::int64_t> stage_layers;
  std::vector<std::unique_ptr<kv::KvBlockAllocator>> allocators;
  std::unique_ptr<engine::KvManager> kv;
  std::unique_ptr<engine::Scheduler> scheduler;
  std::unique_ptr<SimExecutor> executor;
  std::set<std::int64_t> requests;  // trace indices outstanding here
  bool in_flight = false;
  std::int64_t busy_until_us = 0;
  std::vector<engine::StepPlan> plans;  // the round in flight: one micro-batch per virtual engine with work
  std::vector<engine::StepResult> results;
  bool blocked = false;  // waiting for a transition at its next step boundary
  bool migrating = false;  // a live migration's source or destination: paused from its next step boundary until the copy ends
  std::int64_t resume_us = 0;  // no step starts before (a split's stop-and-copy gather)
  double compute_devices = 1.0;  // devices computing during the step in flight (host contention)
  // Host contention (a CPU profile): the step in flight's work left, in microseconds of an
  // uncontended step, as of ClusterSim::contention_at_us_, and when it started.
  double work_left_us = 0.0;
  double copy_left_us = 0.0;  // swap copies first: on the link, not computing, not contended
  std::int64_t copy_until_us = -1;  // when those end (an event: the devices computing change)
  bool latency_pending = false;  // the host's fixed time per step not yet added (reprice does)
  std::int64_t copy_waits = 0;   // paced swap copies (SimExecutorCounters): each then waits host_swap_us
  double idle_wake_us = 0.0;     // and the host's extra time after an idle spell (GpuSpec::idle_wake_us)
  std::int64_t step_tokens = 0;  // new tokens of the step (a fused round: its largest micro-batch)
  double factor = 1.0;           // its slowdown since ClusterSim::contention_at_us_
  std::int64_t step_start_us = 0;
  // Fused units: live KV exchange after the drop, reverse exchange (gather) while restoring.
  struct KvMove {
    std::int64_t index = -1;     // trace index
    std::int64_t ready_us = -1;  // its bulk transfer has crossed the link
  };
  std::vector<KvMove> kv_moves;            // in queue order
  std::vector<std::int64_t> link_free_us;  // per stage: when its link has carried what is queued
  std::vector<std::vector<std::size_t>> open_round;  // per stage: kv_moves entries of the round being filled
  std::vector<double> open_round_us;                  // per stage: that round's transfer time
  std::int64_t exchange_begin_us = -1;     // a drop's exchange still running
  bool restoring = false;
  std::int64_t restore_begin_us = 0;
  std::int64_t weights_ready_us = 0;
  std::vector<std::int64_t> split_room;  // restoring: the plan's KV room per member after the split
  // What the runtime's engine last published (engine::Engine::publish_stats): the router and the
  // coordinator read this, not the live scheduler, as runtime::ClusterRuntime::snapshots_of does.
  // The engine publishes when a step's result is applied (before it takes in what arrived during
  // the step), when it has nothing to run, and after a request is detached or adopted; requests
  // routed to it since are invisible to the next routing decision (they sit in its inbox).
  engine::InstanceStats published;
  // Trace indices routed here while a step was in flight: the engine's inbox, drained into the
  // scheduler when the step ends (after publishing), as engine::Engine::run_step does.
  std::vector<std::int64_t> inbox;
  // Routed here since the last publish (the engine's queued_estimate_ counts them, reset at a
  // publish to what is still in the inbox): the queued count the runtime's router reads.
  std::int64_t submitted_since_publish = 0;
  // The KV layer blocks those requests' prompts want (engine::Engine::PublishedView::unpublished_pending_blocks):
  // the monitor counts them as pending demand.
  std::int64_t submitted_blocks_since_publish = 0;
};

namespace {

std::int64_t layers_of_stage(std::int64_t stage, std::int64_t degree, std::int64_t num_layers) {
  return cluster::layers_kept(stage, degree, num_layers);
}

}  // namespace

ClusterSim::ClusterSim(SimConfig config, CostModel cost, LinkSpec link, LinkSpec host_link)
    : config_(std::move(config)), cost_(std::move(cost)), link_(std::move(link)), host_link_(std::move(host_link)) {}

ClusterSim::~ClusterSim() = default;

StatusOr<std::unique_ptr<ClusterSim>> ClusterSim::create(const SimConfig& in) {
  SimConfig config = in;
  auto gpu = gpu_spec(config.gpu);
  if (!gpu.ok()) return gpu.status();
  auto link = link_spec(config.link);
  if (!link.ok()) return link.status();
  auto host = link_spec(config.host_link);
  if (!host.ok()) return host.status();
  if (config.link_gbps > 0) *link = LinkSpec{"paced", config.link_gbps * 1e9, config.link_latency_us, false};
  if (config.host_link_gbps > 0) *host = LinkSpec{"paced-host", config.host_link_gbps * 1e9, config.host_link_latency_us, false};
  model::ModelConfig m;
  if (config.use_model) {
    m = config.model;
  } else {
    auto mc = sim_model_config(config.model_name);
    if (!mc.ok()) return mc.status();
    m = *mc;
  }
  if (!gpu->measured_model.empty() && !config.use_model && config.model_name != gpu->measured_model) {
    return invalid_argument("device profile '" + gpu->name + "' was measured with model '" + gpu->measured_model +
                            "', not '" + config.model_name + "' (its step times hold for that model only)");
  }
  if (config.num_instances <= 0) return invalid_argument("num_instances must be > 0");
  if (config.gpu_memory_utilization <= 0 || config.gpu_memory_utilization > 1) {
    return invalid_argument("gpu_memory_utilization must be in (0, 1]");
  }
  if (config.page_bytes <= 0 || config.block_size_tokens <= 0) return invalid_argument("page and block sizes must be > 0");
  if (config.timeline_period_us <= 0) return invalid_argument("timeline_period_us must be > 0");
  config.scheduler.preemption =
      config.policy == cluster::Policy::kSwap ? engine::PreemptionMode::kSwap : engine::PreemptionMode::kRecompute;
  if (config.scheduler.vocab_size == 0) config.scheduler.vocab_size = m.vocab_size;
  config.scheduler.eos_token_id = static_cast<std::int32_t>(m.eos_token_id);
  // The executor reads only which layers are held off the stage that runs them, not block ids.
  config.scheduler.plan_kv = engine::PlanKv::kOffsiteOnly;
  KUN_RETURN_IF_ERROR(config.scheduler.validate());
  config.coordinator.policy = config.policy;

  if (const std::string p = CostModel::tp_problem(*gpu, m, config.tp); !p.empty()) return invalid_argument(p);
  CostModel cost(*gpu, m, config.tp);
  if (gpu->page_bytes > 0) config.page_bytes = gpu->page_bytes;  // a measured device's own page (CPU profile)
  // An instance's page is one page on each of its t GPUs (each holds 1/t of a block's heads and
  // of a layer's weights), so every page count below is per instance and per GPU alike.
  config.page_bytes *= config.tp;
  std::unique_ptr<ClusterSim> sim(new ClusterSim(config, cost, *link, *host));
  const std::int64_t page = config.page_bytes;
  const std::int64_t layer_block_bytes = config.block_size_tokens * cost.kv_bytes_per_token_per_layer();
  sim->blocks_per_page_ = page / layer_block_bytes;
  if (sim->blocks_per_page_ < 1) return invalid_argument("a page must hold at least one KV block");
  sim->pages_per_layer_ = (cost.layer_param_bytes() + page - 1) / page;
  const double tp = static_cast<double>(config.tp);
  const double budget = static_cast<double>(gpu->memory_bytes) * config.gpu_memory_utilization * tp;
  const double kv_bytes = budget - static_cast<double>(config.activation_reserve_bytes) * tp -
                          static_cast<double>(cost.non_layer_param_bytes()) -
                          static_cast<double>(m.num_layers * sim->pages_per_layer_ * page);
  sim->kv_pages_per_instance_ = static_cast<std::int64_t>(std::floor(kv_bytes / static_cast<double>(page)));
  if (config.kv_tokens_per_instance > 0) {
    const std::int64_t blocks = (config.kv_tokens_per_instance + config.block_size_tokens - 1) / config.block_size_tokens *
                                m.num_layers;
    sim->kv_pages_per_instance_ = (blocks + sim->blocks_per_page_ - 1) / sim->blocks_per_page_;
  }
  if (sim->kv_pages_per_instance_ <= 0) {
    return invalid_argument("model '" + (config.use_model ? m.architecture : config.model_name) + "' leaves no KV memory on " +
                            std::to_string(config.tp) + " x " + gpu->name);
  }
  sim->kv_blocks_per_instance_ = sim->kv_pages_per_instance_ * sim->blocks_per_page_;

  cluster::ClusterShape shape;
  shape.num_instances = config.num_instances;
  shape.num_layers = m.num_layers;
  shape.layer_param_bytes = sim->pages_per_layer_ * page;
  shape.layer_block_bytes = page / sim->blocks_per_page_;
  shape.block_size_tokens = config.block_size_tokens;
  if (!config.allowed_degrees.empty()) shape.allowed_degrees = config.allowed_degrees;
  shape.allowed_degrees.erase(std::remove_if(shape.allowed_degrees.begin(), shape.allowed_degrees.end(),
                                             [&](std::int64_t g) { return g > config.num_instances || g > m.num_layers; }),
                              shape.allowed_degrees.end());
  sim->coordinator_ = std::make_unique<cluster::Coordinator>(config.coordinator, shape);
  cluster::RouterConfig rc;
  rc.policy = config.route;
  rc.num_layers = m.num_layers;
  sim->router_ = std::make_unique<cluster::Router>(rc);
  for (std::int64_t i = 0; i < config.num_instances; ++i) sim->units_.push_back(sim->make_unit({i}, -1));
  sim->last_step_end_us_.assign(static_cast<std::size_t>(config.num_instances), -1);
  return sim;
}

std::unique_ptr<ClusterSim::Unit> ClusterSim::make_unit(const std::vector<std::int64_t>& members, std::int64_t group) {
  auto u = std::make_unique<Unit>();
  u->members = members;
  u->group = group;
  const auto g = static_cast<std::int64_t>(members.size());
  const std::int64_t num_layers = cost_.model().num_layers;
  std::vector<kv::KvBlockAllocator*> devices;
  std::vector<std::int32_t> layer_device;
  for (std::int64_t s = 0; s < g; ++s) {
    const std::int64_t kept = g == 1 ? num_layers : layers_of_stage(s, g, num_layers);
    u->stage_layers.push_back(kept);
    for (std::int64_t l = 0; l < kept; ++l) layer_device.push_back(static_cast<std::int32_t>(s));
    const std::int64_t pages = kv_pages_per_instance_ + (num_layers - kept) * pages_per_layer_;
    // Counted, not named: the executor reads no block id (PlanKv::kOffsiteOnly), and naming every
    // layer's blocks of every request was most of a simulation's time.
    auto alloc = std::make_unique<kv::KvBlockAllocator>(blocks_per_page_, kv::AllocationOrder::kDeterministic, 0,
                                                        kv::BlockNaming::kCountsOnly);
    std::vector<kv::PageId> ids;
    ids.reserve(static_cast<std::size_t>(pages));
    for (std::int64_t p = 0; p < pages; ++p) ids.emplace_back(p);  // base pool, then extension
    KUN_CHECK_OK(alloc->add_pages(ids));
    devices.push_back(alloc.get());
    u->allocators.push_back(std::move(alloc));
  }
  const std::int64_t layer_block_bytes = config_.block_size_tokens * cost_.kv_bytes_per_token_per_layer();
  const std::int64_t host_blocks =
      config_.policy == cluster::Policy::kSwap ? config_.host_swap_bytes * g / layer_block_bytes : 0;
  u->kv = std::make_unique<engine::KvManager>(config_.block_size_tokens, devices, layer_device, host_blocks);
  // A fused group's configuration is the runtime's (g virtual engines); one simulated step is a
  // round of the g virtual engines' micro-batches as the scheduler forms them, which the executor
  // pipelines.
  const engine::SchedulerConfig sc = engine::fused_scheduler_config(config_.scheduler, g, config_.block_size_tokens);
  u->scheduler = std::make_unique<engine::Scheduler>(sc, u->kv.get(), &clock_);
  SimExecutorConfig ec;
  ec.stage_layers = u->stage_layers;
  ec.host_link = host_link_;
  ec.stage_link = link_;
  ec.block_size_tokens = config_.block_size_tokens;
  ec.eos_token_id = static_cast<std::int32_t>(cost_.model().eos_token_id);
  ec.vocab_size = cost_.model().vocab_size;
  u->executor = std::make_unique<SimExecutor>(&cost_, ec);
  u->link_free_us.assign(static_cast<std::size_t>(g), clock_.now_us());
  u->open_round.assign(static_cast<std::size_t>(g), {});
  u->open_round_us.assign(static_cast<std::size_t>(g), 0.0);
  publish(*u);
  return u;
}

std::int64_t ClusterSim::layer_block_bytes() const {
  return config_.block_size_tokens * cost_.kv_bytes_per_token_per_layer();
}

void ClusterSim::queue_kv_move(Unit& u, std::int64_t index, std::int64_t link, std::int64_t layers,
                               std::int64_t layer_bytes) {
  const auto k = static_cast<std::size_t>(link);
  u.kv_moves.push_back(Unit::KvMove{index, -1});
  u.open_round[k].push_back(u.kv_moves.size() - 1);
  u.open_round_us[k] += static_cast<double>(layers) * link_us(layer_bytes);  // one message per layer
  if (static_cast<std::int64_t>(u.open_round[k].size()) >= config_.exchange_requests_per_round) close_kv_round(u, link);
}

void ClusterSim::close_kv_round(Unit& u, std::int64_t link) {
  const auto k = static_cast<std::size_t>(link);
  if (u.open_round[k].empty()) return;
  const std::int64_t start = std::max(clock_.now_us(), u.link_free_us[k]);
  const std::int64_t end = start + static_cast<std::int64_t>(std::ceil(u.open_round_us[k]));
  for (std::size_t i : u.open_round[k]) u.kv_moves[i].ready_us = end;
  u.link_free_us[k] = end;
  u.open_round[k].clear();
  u.open_round_us[k] = 0.0;
}

void ClusterSim::assign_homes(Unit& u) {
  // As the runtime: a running request continues after the split on a home member (the one with
  // the most room left after the split, its base pool), and its other layers are gathered there.
  const auto g = static_cast<std::int64_t>(u.members.size());
  const engine::HomeAssignment homes = engine::assign_restore_homes(*u.scheduler, *u.kv, u.split_room);
  bool queued = false;
  for (RequestId id : homes.newly_homed) {
    const auto layers = static_cast<std::int64_t>(u.kv->misplaced_layers(id).size());
    if (layers == 0) continue;
    queue_kv_move(u, id.value, u.kv->home(id), layers, u.kv->token_blocks(u.kv->tokens_held(id)) * layer_block_bytes());
    queued = true;
  }
  if (!queued) return;
  for (std::int64_t k = 0; k < g; ++k) close_kv_round(u, k);
  // The split waits for the gather (at most restore_gather_timeout_us) and the weights.
  const std::int64_t gathered = *std::max_element(u.link_free_us.begin(), u.link_free_us.end());
  const std::int64_t ready =
      std::max(u.weights_ready_us, std::min(gathered, u.restore_begin_us + config_.restore_gather_timeout_us));
  for (auto& pr : pending_restores_) {
    if (pr.group == u.group) pr.ready_us = ready;
  }
}

void ClusterSim::advance_kv_moves(Unit& u, bool assign) {
  if (u.members.size() < 2) return;
  if (assign && u.restoring && keeps_kv()) assign_homes(u);
  const std::int64_t now = clock_.now_us();
  const std::int64_t block_bytes = layer_block_bytes();
  std::vector<Unit::KvMove> left;
  for (const Unit::KvMove& m : u.kv_moves) {
    const RequestId id(m.index);
    if (m.ready_us < 0 || m.ready_us > now) {
      left.push_back(m);
      continue;
    }
    if (u.scheduler->find(id) == nullptr || u.kv->tokens_held(id) == 0) continue;  // finished or preempted
    bool done = true;
    for (std::int64_t layer : u.kv->misplaced_layers(id)) {
      const std::int64_t blocks = u.kv->token_blocks(u.kv->tokens_held(id));  // the layer's (counted) blocks
      Status st = u.kv->move_layer(id, layer, [](std::int32_t, const std::vector<kv::BlockId>&, std::int32_t,
                                                 const std::vector<kv::BlockId>&) {});
      if (!st.ok()) {  // the destination is short of blocks: retry at the next step boundary
        done = false;
        break;
      }
      (u.restoring ? counters_.kv_bytes_gathered : counters_.kv_bytes_exchanged) += blocks * block_bytes;
    }
    if (!done) left.push_back(m);
  }
  u.kv_moves = std::move(left);
  if (!u.restoring && u.exchange_begin_us >= 0 && u.kv_moves.empty()) {
    counters_.exchange_ms.push_back(static_cast<double>(now - u.exchange_begin_us) / 1000.0);
    u.exchange_begin_us = -1;
  }
}

ClusterSim::Unit* ClusterSim::unit_of_instance(std::int64_t instance) {
  for (auto& u : units_) {
    if (std::find(u->members.begin(), u->members.end(), instance) != u->members.end()) return u.get();
  }
  return nullptr;
}

std::int64_t ClusterSim::outstanding() const {
  std::int64_t n = static_cast<std::int64_t>(pending_moves_.size());
  for (const auto& u : units_) n += static_cast<std::int64_t>(u->requests.size());
  return n;
}

void ClusterSim::publish(Unit& u) const {
  u.published = u.scheduler->report();
  u.submitted_since_publish = static_cast<std::int64_t>(u.inbox.size());
  u.submitted_blocks_since_publish = 0;
  for (std::int64_t index : u.inbox) u.submitted_blocks_since_publish += u.kv->layer_blocks_for(prompt_tokens_[static_cast<std::size_t>(index)]);
}

std::vector<cluster::InstanceSnapshot> ClusterSim::snapshots(bool for_routing) const {
  // As runtime::ClusterRuntime::snapshots_of: every member of a unit reports its share of the
  // unit's published request counts (cluster::member_count_share) and its KV totals / g.
  std::vector<cluster::InstanceSnapshot> out;
  for (const auto& u : units_) {
    const auto g = static_cast<std::int64_t>(u->members.size());
    const engine::InstanceStats& is = u->published;
    cluster::GroupState state = cluster::GroupState::kInitial;
    if (u->group >= 0) {
      if (const cluster::GroupInfo* gi = coordinator_->group(u->group)) state = gi->state;
    }
    for (std::int64_t s = 0; s < g; ++s) {
      cluster::InstanceSnapshot snap;
      snap.instance = u->members[static_cast<std::size_t>(s)];
      snap.group = u->group;
      snap.state = state;
      snap.kv_blocks_total = is.kv_blocks_total / g;
      snap.kv_blocks_free = is.kv_blocks_free / g;
      // engine::Engine::PublishedView::unpublished_pending_blocks: the prompts routed here since the publish.
      snap.blocks_demanded = is.blocks_demanded / g + u->submitted_blocks_since_publish / g;
      snap.pending_blocks = is.pending_blocks / g + u->submitted_blocks_since_publish / g;
      snap.num_running = cluster::member_count_share(is.num_running, g, s);
      // engine::Engine::PublishedView::queued_estimate
      snap.num_queued = cluster::member_count_share(is.num_waiting + u->submitted_since_publish, g, s);
      // The runtime publishes these per step too (EngineConfig::publish_requests); read live here
      // (O(requests) per step would dominate a migrate simulation under overload).
      if (!for_routing && config_.policy == cluster::Policy::kMigrate && g == 1) {
        for (std::int64_t idx : u->requests) {
          const engine::Request* r = u->scheduler->find(RequestId(idx));
          if (r == nullptr) continue;
          cluster::RequestSnapshot rs;
          rs.id = RequestId(idx);
          rs.running = r->state == engine::RequestState::kRunning;
          rs.tokens = r->num_tokens();
          rs.blocks_held = u->kv->layer_blocks_for(u->kv->tokens_held(rs.id));
          snap.requests.push_back(rs);
        }
      }
      out.push_back(std::move(snap));
    }
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.instance < b.instance; });
  return out;
}

bool ClusterSim::add_to_unit(Unit& u, std::int64_t index, std::vector<std::int32_t> prompt, std::int64_t max_tokens) {
  engine::RequestSpec spec;
  spec.prompt_tokens = std::move(prompt);
  spec.max_tokens = max_tokens;
  spec.ignore_eos = true;
  Status st = u.scheduler->add_request(RequestId(index), std::move(spec));
  auto& rec = records_[static_cast<std::size_t>(index)];
  if (!st.ok()) {
    rec.outcome = st.code() == StatusCode::kOverloaded ? workload::RequestOutcome::kRejected
                                                       : workload::RequestOutcome::kFailed;
    rec.error = st.to_string();
    rec.finish_us = clock_.now_us();
    rec.output_tokens = static_cast<std::int32_t>(generated_[static_cast<std::size_t>(index)]);
    ++counters_.rejected;
    return false;
  }
  u.requests.insert(index);
  return true;
}

std::vector<std::int32_t> ClusterSim::prompt_of(std::int64_t index) const {
  const auto i = static_cast<std::size_t>(index);
  std::vector<std::int32_t> prompt(static_cast<std::size_t>(prompt_tokens_[i]));
  const auto vocab = static_cast<std::uint64_t>(std::max<std::int64_t>(cost_.model().vocab_size, 2));
  for (std::size_t j = 0; j < prompt.size(); ++j) {
    prompt[j] = static_cast<std::int32_t>((static_cast<std::uint64_t>(index) * 7919u + j * 104729u + config_.seed) % vocab);
  }
  return prompt;
}

void ClusterSim::arrive(std::int64_t index) {
  if (config_.live_stats) {
    for (auto& u : units_) publish(*u);
  }
  auto target = router_->route(snapshots(/*for_routing=*/true));
  KUN_CHECK(target.ok()) << target.status().to_string();
  Unit* u = unit_of_instance(*target);
  KUN_CHECK(u != nullptr) << "router chose unknown instance " << *target;
  ++u->submitted_since_publish;
  u->submitted_blocks_since_publish += u->kv->layer_blocks_for(prompt_tokens_[static_cast<std::size_t>(index)]);
  if (u->in_flight && !config_.live_stats) {
    u->inbox.push_back(index);  // taken in when the step ends
    return;
  }
  add_to_unit(*u, index, prompt_of(index), max_tokens_[static_cast<std::size_t>(index)]);
}

void ClusterSim::drain_inbox(Unit& u) {
  for (std::int64_t index : u.inbox) add_to_unit(u, index, prompt_of(index), max_tokens_[static_cast<std::size_t>(index)]);
  u.inbox.clear();
}

void ClusterSim::handle_events(Unit& u, const std::vector<engine::TokenEvent>& events) {
  constexpr std::size_t kAhead = 8;  // records loaded ahead: each is a cache miss in a large batch
  for (std::size_t e = 0; e < events.size(); ++e) {
    if (e + kAhead < events.size()) {
      const auto& ahead = records_[static_cast<std::size_t>(events[e + kAhead].id.value)];
      __builtin_prefetch(&ahead);
      if (!ahead.token_times_us.empty() && e + kAhead / 2 < events.size()) __builtin_prefetch(&ahead.token_times_us.back() + 1);
    }
    const engine::TokenEvent& ev = events[e];
    const auto i = static_cast<std::size_t>(ev.id.value);
    auto& rec = records_[i];
    if (ev.token >= 0) {
      ++generated_[i];
      rec.token_times_us.push_back(ev.time_us);
      if (rec.first_token_us < 0) rec.first_token_us = ev.time_us;
    }
    if (ev.finished) {
      rec.finish_us = ev.time_us;
      rec.output_tokens = static_cast<std::int32_t>(generated_[i]);
      rec.outcome = (ev.reason == engine::FinishReason::kLength || ev.reason == engine::FinishReason::kStop)
                        ? workload::RequestOutcome::kOk
                        : workload::RequestOutcome::kFailed;
      u.requests.erase(ev.id.value);
    }
  }
}

void ClusterSim::finish_step(Unit& u) {
  KUN_CHECK(u.in_flight);
  u.in_flight = false;
  last_step_end_us_[static_cast<std::size_t>(u.members.front())] = clock_.now_us();
  if (!cost_.gpu().host_contention.empty()) {
    const std::int64_t took = std::max<std::int64_t>(1, clock_.now_us() - u.step_start_us);
    for (auto& r : u.results) r.duration_us = took;
  }
  for (std::size_t i = 0; i < u.plans.size(); ++i) handle_events(u, u.scheduler->apply_result(u.plans[i], u.results[i]));
  if (config_.record_steps) {
    for (std::size_t i = 0; i < u.plans.size(); ++i) {
      RecordedStep r;
      r.end_us = clock_.now_us();
      r.duration_us = u.results[i].duration_us;
      r.unit_devices = static_cast<std::int64_t>(u.members.size());
      r.first_instance = u.members.front();
      r.sequences = static_cast<std::int64_t>(u.plans[i].sequences.size());
      for (const auto& s : u.plans[i].sequences) {
        const auto n = static_cast<std::int64_t>(s.tokens.size());
        r.new_tokens += n;
        r.sampled += s.sample ? 1 : 0;
        r.attended_pairs += n * s.start_pos + n * (n + 1) / 2;
      }
      r.swap_blocks = static_cast<std::int64_t>(u.plans[i].swap_in.size() + u.plans[i].swap_out.size());
      steps_.push_back(r);
    }
  }
  for (engine::StepPlan& p : u.plans) u.scheduler->recycle(std::move(p));  // reuse the token buffers
  u.plans.clear();
  publish(u);      // the engine publishes after applying a step's result,
  drain_inbox(u);  // then takes in what arrived meanwhile
  advance_kv_moves(u, /*assign=*/true);
  if (!planned_migrations_.empty()) start_migrations();
  const std::int64_t every = config_.check_invariants_every_steps;
  if (every > 0 && u.scheduler->counters().steps % every == 0) u.scheduler->check_invariants();
}

void ClusterSim::advance_contended_steps() {
  // Processor sharing: since contention_at_us_ every step in flight progressed at 1 / factor of
  // an uncontended step, the factor being the measured slowdown at the number of devices then
  // computing (the set changes only at event instants, where reprice_contended_steps runs).
  if (cost_.gpu().host_contention.empty()) return;
  const std::int64_t now = clock_.now_us();
  const double elapsed = static_cast<double>(now - contention_at_us_);
  if (elapsed > 0 && contention_factor_ > 0) {
    for (auto& u : units_) {
      if (!u->in_flight) continue;
      // The copy first, at the link's speed; then the forward at the shared host's.
      const double copy = std::min(u->copy_left_us, elapsed);
      u->copy_left_us -= copy;
      if (u->copy_left_us < 1e-6) u->copy_left_us = 0.0;
      u->work_left_us = std::max(0.0, u->work_left_us - (elapsed - copy) / u->factor);
    }
  }
  contention_at_us_ = now;
}

double ClusterSim::devices_computing() const {
  double busy = 0.0;
  for (const auto& u : units_) {
    if (u->in_flight && u->copy_left_us <= 0.0) busy += u->compute_devices;
  }
  return busy;
}

void ClusterSim::reprice_contended_steps() {
  if (cost_.gpu().host_contention.empty()) return;
  const std::int64_t now = clock_.now_us();
  KUN_CHECK(contention_at_us_ == now) << "advance_contended_steps must run first";
  const double busy = devices_computing();
  contention_factor_ = cost_.gpu().contention_factor(busy);
  // A step started now also pays the host's fixed time per step at the devices computing with it
  // (GpuSpec::host_contention_us), as work at today's factor: a x W + b = a x (W + b / a). A fused
  // round pays it once, at the value fitted to fused rounds where the profile has one
  // (GpuSpec::host_contention_fused_us): its stages' threads stay busy from one micro-batch to the
  // next (measured: a 2-stage round paying b per micro-batch made kunserve's TPOT 1.8x the
  // bench's, and paying an independent step's b once per round still made it 1.1-1.3x, with
  // p50 TTFT 1.2-1.3x: the bench's fused micro-batches took 1.0-1.3 ms beyond a x table at 4
  // devices computing, its independent steps 2.6-3.3 ms). A step with swap copies pays it at
  // the devices computing when its forward starts, itself included (as the fit counts them); its
  // wait for a core after each paced copy (GpuSpec::host_swap_us) is added to its copy time in
  // start_steps, not computing.
  // A step's factor is a(k) times the contended shape for its size (GpuSpec::contention_shape):
  // an independent step's fitted to independent steps, a fused round's (by its largest
  // micro-batch) to the fused micro-batches with their own fixed time.
  for (auto& u : units_) {
    if (!u->in_flight) continue;
    u->factor = std::max(0.1, contention_factor_ * cost_.gpu().contention_shape(busy, u->step_tokens, u->members.size() > 1));
    if (u->latency_pending) {
      // A step that copies first is not computing yet, but its waits come when it does: at the
      // devices computing with it then (as the fit counts them, devices_computing in
      // sim/device_profile.h).
      const double at = u->copy_left_us > 0.0 ? busy + u->compute_devices : std::max(1.0, busy);
      const double wait = u->members.size() > 1 ? cost_.gpu().fused_contention_latency_us(at) : cost_.gpu().contention_latency_us(at);
      u->work_left_us += (wait + u->idle_wake_us) / u->factor;
      u->latency_pending = false;
    }
    // At least 1 us ahead, so that every event instant moves the clock. A step still copying has
    // an event where its forward starts (copy_until_us): the devices computing change there.
    const double copy = std::ceil(u->copy_left_us - 1e-6);
    u->copy_until_us = copy > 0 ? now + static_cast<std::int64_t>(copy) : -1;
    u->busy_until_us = now + std::max<std::int64_t>(1, static_cast<std::int64_t>(copy + std::ceil(u->work_left_us * u->factor - 1e-6)));
  }
}

void ClusterSim::start_steps() {
  const std::int64_t now = clock_.now_us();
  for (auto& up : units_) {
    Unit& u = *up;
    if (u.in_flight) continue;
    if (u.blocked || u.migrating || now < u.resume_us || !u.scheduler->has_unfinished()) {
      if (!u.blocked) publish(u);  // an idle engine publishes each time round its loop
      continue;
    }
    u.plans.clear();
    for (std::int64_t ve = 0; ve < u.scheduler->config().num_virtual_engines; ++ve) {
      engine::StepPlan plan = u.scheduler->schedule(ve);
      if (plan.sequences.empty() && plan.swap_in.empty() && plan.swap_out.empty()) continue;
      for (const auto& s : plan.sequences) {
        auto& rec = records_[static_cast<std::size_t>(s.id.value)];
        if (rec.queue_us < 0) rec.queue_us = now - rec.arrival_us;
      }
      u.plans.push_back(std::move(plan));
    }
    if (u.plans.empty()) {
      publish(u);
      continue;
    }
    const double stage_busy_before = u.executor->counters().stage_busy_us;
    u.results = u.executor->execute_round(u.plans);
    std::int64_t duration = u.results.front().duration_us;
    // Devices computing during this step: 1, or for a fused round its stages' busy time over the
    // round (the pipeline bubble computes nothing).
    u.compute_devices = 1.0;
    if (u.members.size() > 1 && duration > 0) {
      u.compute_devices = std::max(1.0, (u.executor->counters().stage_busy_us - stage_busy_before) / static_cast<double>(duration));
    }
    // Devices sharing one host's cores (a CPU profile): the step's time is set by
    // reprice_contended_steps() once every step of this instant has started.
    u.copy_left_us = std::min(static_cast<double>(duration), u.executor->counters().last_round_copy_us);
    u.work_left_us = std::max(1.0, static_cast<double>(duration) - u.copy_left_us);
    u.latency_pending = true;
    u.copy_waits = u.executor->counters().last_round_copy_waits;
    // After each paced copy the agent's thread waits for a core (GpuSpec::host_swap_us): not
    // computing, so it slows no one else, like the copy itself.
    u.copy_left_us += cost_.gpu().host_swap_us * static_cast<double>(u.copy_waits);
    if (!cost_.gpu().host_contention.empty()) {  // a CPU profile's host (GPUs: neither applies)
      u.step_tokens = 0;
      for (const engine::StepPlan& p : u.plans) u.step_tokens = std::max(u.step_tokens, p.num_tokens());
      const std::int64_t last_end = last_step_end_us_[static_cast<std::size_t>(u.members.front())];
      u.idle_wake_us = cost_.gpu().idle_wake_us(last_end < 0 ? std::numeric_limits<double>::infinity()
                                                             : static_cast<double>(now - last_end));
    }
    u.step_start_us = now;
    u.busy_until_us = now + std::max<std::int64_t>(1, duration);
    u.in_flight = true;
    ++counters_.steps;
  }
}

std::int64_t ClusterSim::least_outstanding(const std::vector<std::int64_t>& unit_indices) const {
  std::int64_t best = unit_indices.front();
  for (std::int64_t i : unit_indices) {
    const auto& a = *units_[static_cast<std::size_t>(i)];
    const auto& b = *units_[static_cast<std::size_t>(best)];
    if (a.requests.size() < b.requests.size()) best = i;
  }
  return best;
}

void ClusterSim::collect(const Unit& u) {
  const auto& c = u.scheduler->counters();
  counters_.preemptions_recompute += c.preemptions_recompute;
  counters_.preemptions_swap += c.preemptions_swap;
  counters_.preemptions += c.preemptions_recompute + c.preemptions_swap;
  counters_.recomputed_tokens += c.recomputed_tokens;
  counters_.transition_recomputed_tokens += c.transition_recomputed_tokens;
  counters_.swap_bytes += u.executor->counters().swap_bytes;
  counters_.activation_bytes += u.executor->counters().activation_bytes;
  counters_.remote_attention_bytes += u.executor->counters().remote_attention_bytes;
  counters_.remote_attention_us += u.executor->counters().remote_attention_us;
  counters_.fused_stage_busy_us += u.executor->counters().stage_busy_us;
  counters_.fused_stage_idle_us += u.executor->counters().stage_idle_us;
}

cluster::TransitionGeometry ClusterSim::transition_geometry() const {
  cluster::TransitionGeometry geo;
  geo.num_layers = cost_.model().num_layers;
  geo.block_size_tokens = config_.block_size_tokens;
  geo.blocks_per_page = blocks_per_page_;
  geo.pages_per_layer = pages_per_layer_;
  return geo;
}

void ClusterSim::record_plan(const std::string& kind, std::int64_t group, std::string plan) {
  transition_log_.push_back(cluster::TransitionRecord{kind, group, std::move(plan)});
}

std::int64_t ClusterSim::fuse(const cluster::DropAction& drop) {
  // Carries out cluster::plan_drop, as the runtime's drop: every request leaves its member at a
  // step boundary; the plan says which keep their KV where it is and in which order the others
  // queue in the group.
  const std::int64_t now = clock_.now_us();
  const std::int64_t num_layers = cost_.model().num_layers;
  cluster::DropInput input;
  input.group = drop.group;
  input.members = drop.instances;
  input.strategy = config_.stale_kv;
  // The units giving their members: independent instances and, when a group grows, the fused
  // groups it absorbs (each member keeps a part of the layers it runs now).
  std::vector<Unit*> sources;
  for (std::int64_t inst : drop.instances) {
    Unit* u = unit_of_instance(inst);
    KUN_CHECK(u != nullptr) << "instance " << inst;
    KUN_CHECK(!u->in_flight) << "fuse at a step boundary only";
    KUN_CHECK(u->inbox.empty()) << "instance " << inst << ": arrivals not taken in at its step boundary";
    KUN_CHECK(u->members.size() == 1 || std::find(drop.absorbs.begin(), drop.absorbs.end(), u->group) != drop.absorbs.end())
        << "instance " << inst << " is in group " << u->group << ", which the drop does not absorb";
    if (std::find(sources.begin(), sources.end(), u) == sources.end()) sources.push_back(u);
    const auto src_g = static_cast<std::int64_t>(u->members.size());
    const auto stage = static_cast<std::int64_t>(std::find(u->members.begin(), u->members.end(), inst) - u->members.begin());
    input.held_begin.push_back(src_g == 1 ? 0 : stage * num_layers / src_g);
    input.held_end.push_back(src_g == 1 ? num_layers : (stage + 1) * num_layers / src_g);
  }
  for (Unit* u : sources) {
    std::vector<std::int32_t> member_of_device;
    for (std::int64_t inst : u->members) {
      member_of_device.push_back(static_cast<std::int32_t>(
          std::find(drop.instances.begin(), drop.instances.end(), inst) - drop.instances.begin()));
    }
    for (cluster::TransitionRequest& r : cluster::transition_requests(*u->scheduler, *u->kv, member_of_device)) {
      input.requests.push_back(std::move(r));
    }
  }
  const cluster::DropPlan plan = cluster::plan_drop(input, transition_geometry());
  record_plan(drop.absorbs.empty() ? "drop" : "grow", drop.group, plan.to_string());
  std::set<RequestId> keep;
  for (const cluster::StaleKvPlan& sk : plan.keep_kv) keep.insert(sk.id);
  std::map<RequestId, engine::Request> detached;
  std::map<RequestId, std::vector<std::int32_t>> layer_member;
  for (const cluster::TransitionRequest& r : input.requests) {
    if (!r.running) continue;
    layer_member[r.id] = r.layer_member;
    if (!is_stale_[static_cast<std::size_t>(r.id.value)]) {
      is_stale_[static_cast<std::size_t>(r.id.value)] = true;
      stale_ids_.push_back(r.id.value);
    }
    if (keep.count(r.id) == 0) {
      ++counters_.stale_requests_recomputed;
      counters_.stale_tokens_recomputed += r.tokens_held;
    }
  }
  for (Unit* u : sources) {
    for (RequestId id : u->scheduler->request_ids_in_order()) {
      auto d = u->scheduler->detach(id, keep.count(id) != 0);
      KUN_CHECK(d.has_value());
      detached.emplace(id, std::move(*d));
    }
    KUN_CHECK_EQ(u->scheduler->has_unfinished(), false);
    u->requests.clear();
    collect(*u);
  }
  units_.erase(std::remove_if(units_.begin(), units_.end(),
                              [&](const auto& u) { return std::find(sources.begin(), sources.end(), u.get()) != sources.end(); }),
               units_.end());
  auto group = make_unit(drop.instances, drop.group);
  const auto g = static_cast<std::int64_t>(drop.instances.size());
  for (const cluster::MemberLayout& m : plan.members) {
    counters_.param_bytes_dropped += m.pages_to_kv * config_.page_bytes;
  }
  // Stale requests keep their KV on the member they ran on (every layer there); the group's
  // KvManager knows which layers are misplaced (the plan's moves), and the executor charges
  // remote attention for them.
  const std::int64_t bs = config_.block_size_tokens;
  bool exchanging = false;
  for (const cluster::StaleKvPlan& sk : plan.keep_kv) {
    const std::vector<std::int32_t>& where = layer_member.at(sk.id);
    std::map<std::int32_t, kv::BlockTable> tables;
    for (std::int64_t j = 0; j < g; ++j) {
      kv::BlockTable t(bs, 0, 0);
      KUN_CHECK_OK(t.append_tokens(sk.tokens, *group->allocators[static_cast<std::size_t>(j)]));
      // Each member's pool only grew: the layers it holds fit again.
      for (std::int64_t l = 0; l < num_layers; ++l) {
        if (where[static_cast<std::size_t>(l)] == j) KUN_CHECK_OK(t.add_layer(l, *group->allocators[static_cast<std::size_t>(j)]));
      }
      tables.emplace(static_cast<std::int32_t>(j), std::move(t));
    }
    group->kv->import_tables(sk.id, sk.tokens, std::move(tables));
    KUN_CHECK_EQ(group->kv->misplaced_layers(sk.id).size(), sk.moves.size()) << "request " << sk.id << " against its plan";
    group->scheduler->adopt_with_imported_kv(std::move(detached.at(sk.id)));
    group->requests.insert(sk.id.value);
    ++counters_.stale_requests_kept_kv;
    if (config_.stale_kv == cluster::StaleKvStrategy::kExchange && !sk.moves.empty()) {
      queue_kv_move(*group, sk.id.value, sk.moves.front().from, static_cast<std::int64_t>(sk.moves.size()),
                    group->kv->token_blocks(sk.tokens) * layer_block_bytes());
      exchanging = true;
    }
  }
  if (exchanging) {
    for (std::int64_t k = 0; k < g; ++k) close_kv_round(*group, k);
    group->exchange_begin_us = now;
  }
  for (RequestId id : plan.queue) {
    KUN_CHECK_OK(group->scheduler->adopt(std::move(detached.at(id)), /*with_kv=*/false));
    group->requests.insert(id.value);
  }
  KUN_CHECK_EQ(plan.keep_kv.size() + plan.queue.size(), detached.size()) << "fuse of group " << drop.group << " lost a request";
  publish(*group);  // the engine publishes after each adopt
  units_.push_back(std::move(group));
  std::int64_t layers_freed = 0;
  for (const cluster::MemberLayout& m : plan.members) layers_freed += static_cast<std::int64_t>(m.layers_dropped.size());
  return layers_freed;
}

void ClusterSim::split(std::int64_t unit_index) {
  // Carries out cluster::plan_split, as the runtime's split: every request leaves the group at a
  // step boundary; the plan says which continue with their KV on which member (what is not there
  // yet is copied now, and the member resumes once it has crossed) and where the others queue.
  Unit& g = *units_[static_cast<std::size_t>(unit_index)];
  KUN_CHECK(!g.in_flight) << "split at a step boundary only";
  KUN_CHECK(g.inbox.empty()) << "group " << g.group << ": arrivals not taken in at its step boundary";
  const std::int64_t now = clock_.now_us();
  const auto num_members = static_cast<std::int64_t>(g.members.size());
  cluster::SplitInput input;
  input.group = g.group;
  input.members = g.members;
  input.strategy = config_.stale_kv;
  input.split_room_blocks = g.split_room;
  std::vector<std::int32_t> stages(static_cast<std::size_t>(num_members));
  for (std::int64_t k = 0; k < num_members; ++k) stages[static_cast<std::size_t>(k)] = static_cast<std::int32_t>(k);
  input.requests = cluster::transition_requests(*g.scheduler, *g.kv, stages);
  std::map<RequestId, engine::Request> detached;
  for (const cluster::TransitionRequest& r : input.requests) {
    auto d = g.scheduler->detach(r.id, r.running && keeps_kv());
    KUN_CHECK(d.has_value());
    detached.emplace(r.id, std::move(*d));
  }
  for (const auto& alloc : g.allocators) input.free_blocks_now.push_back(alloc->num_free());
  const cluster::SplitPlan plan = cluster::plan_split(input, transition_geometry());
  record_plan("split", g.group, plan.to_string());
  std::map<RequestId, std::int64_t> held;
  for (const cluster::TransitionRequest& r : input.requests) held[r.id] = r.tokens_held;
  for (const cluster::Landing& l : plan.queued) {
    if (!l.lost_kv) continue;
    ++counters_.stale_requests_recomputed;
    counters_.stale_tokens_recomputed += held.at(l.id);
  }
  const std::vector<std::int64_t> members = g.members;
  collect(g);
  units_.erase(units_.begin() + unit_index);
  std::vector<std::int64_t> fresh;
  for (std::int64_t inst : members) {
    units_.push_back(make_unit({inst}, -1));
    fresh.push_back(static_cast<std::int64_t>(units_.size()) - 1);
  }
  const auto member_unit = [&](std::int64_t k) -> Unit& {
    return *units_[static_cast<std::size_t>(fresh[static_cast<std::size_t>(k)])];
  };
  std::vector<std::int64_t> copy_bytes(static_cast<std::size_t>(num_members), 0);
  for (const cluster::Placement& p : plan.keep_kv) {
    Unit& dst = member_unit(p.member);
    KUN_CHECK_OK(dst.scheduler->adopt(std::move(detached.at(p.id)), /*with_kv=*/true));
    dst.requests.insert(p.id.value);
    ++counters_.restore_requests_kept_kv;
    const std::int64_t bytes =
        static_cast<std::int64_t>(p.moves.size()) * dst.kv->token_blocks(p.tokens) * layer_block_bytes();
    copy_bytes[static_cast<std::size_t>(p.member)] += bytes;
    counters_.kv_bytes_gathered += bytes;
    counters_.kv_bytes_gathered_at_split += bytes;
  }
  for (std::int64_t m = 0; m < num_members; ++m) {
    const std::int64_t bytes = copy_bytes[static_cast<std::size_t>(m)];
    if (bytes > 0) member_unit(m).resume_us = now + static_cast<std::int64_t>(std::ceil(transfer_us(link_, bytes)));
  }
  for (const cluster::Landing& l : plan.queued) {
    Unit& dst = member_unit(l.member);
    KUN_CHECK_OK(dst.scheduler->adopt(std::move(detached.at(l.id)), /*with_kv=*/false));
    dst.requests.insert(l.id.value);
  }
  KUN_CHECK_EQ(plan.keep_kv.size() + plan.queued.size(), detached.size()) << "split lost a request";
  for (std::int64_t m = 0; m < num_members; ++m) publish(member_unit(m));
}

void ClusterSim::shrink(std::int64_t unit_index, const cluster::ShrinkAction& action) {
  // Carries out cluster::plan_shrink: every request leaves the group at a step boundary; those
  // the plan keeps continue with their KV on their half (the layers held in the other half are
  // copied now, the half resuming once they crossed), the others queue on their half.
  Unit& g = *units_[static_cast<std::size_t>(unit_index)];
  KUN_CHECK(!g.in_flight) << "shrink at a step boundary only";
  KUN_CHECK(g.inbox.empty()) << "group " << g.group << ": arrivals not taken in at its step boundary";
  const std::int64_t now = clock_.now_us();
  const auto num_members = static_cast<std::int64_t>(g.members.size());
  const std::int64_t num_layers = cost_.model().num_layers;
  cluster::ShrinkInput input;
  input.group = g.group;
  input.members = g.members;
  input.strategy = config_.stale_kv;
  input.base_kv_blocks.assign(static_cast<std::size_t>(num_members), kv_blocks_per_instance_);
  std::vector<std::int32_t> stages(static_cast<std::size_t>(num_members));
  for (std::int64_t k = 0; k < num_members; ++k) stages[static_cast<std::size_t>(k)] = static_cast<std::int32_t>(k);
  input.requests = cluster::transition_requests(*g.scheduler, *g.kv, stages);
  const cluster::ShrinkPlan plan = cluster::plan_shrink(input, transition_geometry());
  KUN_CHECK(plan.halves == action.halves) << "shrink of group " << g.group << ": plan and action disagree on the halves";
  record_plan("shrink", g.group, plan.to_string());
  std::map<RequestId, engine::Request> detached;
  std::map<RequestId, std::int64_t> held;
  for (const cluster::TransitionRequest& r : input.requests) {
    auto d = g.scheduler->detach(r.id, r.running && keeps_kv());
    KUN_CHECK(d.has_value());
    detached.emplace(r.id, std::move(*d));
    held[r.id] = r.tokens_held;
  }
  for (const cluster::Landing& l : plan.queued) {
    if (!l.lost_kv) continue;
    ++counters_.stale_requests_recomputed;
    counters_.stale_tokens_recomputed += held.at(l.id);
  }
  collect(g);
  units_.erase(units_.begin() + unit_index);
  std::vector<Unit*> halves;
  for (std::size_t h = 0; h < 2; ++h) {
    units_.push_back(make_unit(plan.halves[h], action.new_groups[h]));
    halves.push_back(units_.back().get());
  }
  const std::int64_t degree = num_members / 2;
  const std::int64_t bs = config_.block_size_tokens;
  std::vector<std::int64_t> copy_bytes(static_cast<std::size_t>(num_members), 0);  // per old member, received
  for (const cluster::Placement& p : plan.keep_kv) {
    Unit& dst = *halves[static_cast<std::size_t>(p.member)];
    std::map<std::int32_t, kv::BlockTable> tables;
    for (std::int64_t j = 0; j < degree; ++j) {
      auto& alloc = *dst.allocators[static_cast<std::size_t>(j)];
      kv::BlockTable t(bs, 0, 0);
      KUN_CHECK_OK(t.append_tokens(p.tokens, alloc));  // the plan checked the room
      for (std::int64_t l = j * num_layers / degree; l < (j + 1) * num_layers / degree; ++l) KUN_CHECK_OK(t.add_layer(l, alloc));
      tables.emplace(static_cast<std::int32_t>(j), std::move(t));
    }
    dst.kv->import_tables(p.id, p.tokens, std::move(tables));
    dst.scheduler->adopt_with_imported_kv(std::move(detached.at(p.id)));
    dst.requests.insert(p.id.value);
    ++counters_.restore_requests_kept_kv;
    const std::int64_t layer_bytes = dst.kv->token_blocks(p.tokens) * layer_block_bytes();
    for (const cluster::LayerMove& m : p.moves) copy_bytes[static_cast<std::size_t>(m.to)] += layer_bytes;
    counters_.kv_bytes_gathered += static_cast<std::int64_t>(p.moves.size()) * layer_bytes;
    counters_.kv_bytes_gathered_at_split += static_cast<std::int64_t>(p.moves.size()) * layer_bytes;
  }
  for (std::size_t h = 0; h < 2; ++h) {
    std::int64_t most = 0;
    for (std::int32_t m : plan.half_members[h]) most = std::max(most, copy_bytes[static_cast<std::size_t>(m)]);
    if (most > 0) halves[h]->resume_us = now + static_cast<std::int64_t>(std::ceil(link_us(most)));
  }
  for (const cluster::Landing& l : plan.queued) {
    Unit& dst = *halves[static_cast<std::size_t>(l.member)];
    KUN_CHECK_OK(dst.scheduler->adopt(std::move(detached.at(l.id)), /*with_kv=*/false));
    dst.requests.insert(l.id.value);
  }
  KUN_CHECK_EQ(plan.keep_kv.size() + plan.queued.size(), detached.size()) << "shrink lost a request";
  for (Unit* h : halves) publish(*h);
}

void ClusterSim::apply(const cluster::Actions& actions) {
  const std::int64_t now = clock_.now_us();
  for (const auto& d : actions.drops) {
    drop_requested_us_[d.group] = now;
    pending_drops_.push_back(d);
    events_.push_back(std::to_string(now) + " drop requested group " + std::to_string(d.group) + ": " + d.reason);
  }
  block_next_drop();
  for (const auto& r : actions.restores) {
    coordinator_->on_restore_started(r.group, now);
    restore_requested_us_[r.group] = now;
    Unit* gu = nullptr;
    for (auto& u : units_) {
      if (u->group == r.group) gu = u.get();
    }
    KUN_CHECK(gu != nullptr) << "restore of unknown group " << r.group;
    // Each member pulls its dropped layers' weights over its link (members in parallel) while the
    // group keeps serving (cluster::plan_restore); an exchange still running is abandoned (the
    // gather takes over).
    cluster::RestoreInput input;
    input.group = r.group;
    input.members = gu->members;
    input.strategy = config_.stale_kv;
    for (const auto& alloc : gu->allocators) input.kv_blocks_total.push_back(alloc->num_total());
    const cluster::RestorePlan plan = cluster::plan_restore(input, transition_geometry());
    record_plan("restore", r.group, plan.to_string());
    gu->split_room = plan.split_room_blocks;
    gu->kv_moves.clear();
    gu->exchange_begin_us = -1;
    gu->restoring = true;
    gu->restore_begin_us = now;
    gu->weights_ready_us = now;
    std::vector<std::int64_t> pulled_bytes(gu->members.size(), 0);
    for (const cluster::WeightPull& p : plan.pulls) {
      pulled_bytes[static_cast<std::size_t>(p.member)] += pages_per_layer_ * config_.page_bytes;
    }
    for (std::size_t k = 0; k < gu->members.size(); ++k) {
      counters_.weight_bytes_restored += pulled_bytes[k];
      gu->link_free_us[k] = now + static_cast<std::int64_t>(std::ceil(link_us(pulled_bytes[k])));
      gu->weights_ready_us = std::max(gu->weights_ready_us, gu->link_free_us[k]);
    }
    pending_restores_.push_back(PendingRestore{r.group, gu->weights_ready_us});
    // Then (remote-attention / exchange) the running requests' KV is gathered on their homes.
    if (keeps_kv()) assign_homes(*gu);
    events_.push_back(std::to_string(now) + " restore requested group " + std::to_string(r.group) + ": " + r.reason);
  }
  for (const auto& sh : actions.shrinks) {
    Unit* gu = nullptr;
    for (auto& u : units_) {
      if (u->group == sh.group) gu = u.get();
    }
    KUN_CHECK(gu != nullptr) << "shrink of unknown group " << sh.group;
    // Each member pulls the layers its new stage adds from its neighbour (cluster::plan_shrink),
    // members in parallel, while the group keeps serving; an exchange still running is abandoned
    // (the shrink copies what is misplaced then).
    restore_requested_us_[sh.group] = now;
    const auto g = static_cast<std::int64_t>(gu->members.size());
    const std::int64_t layers_added = cost_.model().num_layers / (g / 2) - cost_.model().num_layers / g;
    const std::int64_t bytes = std::max<std::int64_t>(0, layers_added) * pages_per_layer_ * config_.page_bytes;
    counters_.weight_bytes_restored += bytes * g;
    gu->kv_moves.clear();
    gu->exchange_begin_us = -1;
    for (std::size_t k = 0; k < gu->members.size(); ++k) gu->link_free_us[k] = now + static_cast<std::int64_t>(std::ceil(link_us(bytes)));
    pending_shrinks_.push_back(PendingShrink{sh, now + static_cast<std::int64_t>(std::ceil(link_us(bytes)))});
    events_.push_back(std::to_string(now) + " shrink requested group " + std::to_string(sh.group) + ": " + sh.reason);
  }
  for (const auto& m : actions.migrations) {
    ++counters_.migrations_planned;
    planned_migrations_.push_back(m);
  }
  start_migrations();
}

void ClusterSim::start_migrations() {
  // As the runtime's ClusterRuntime::migrate: one migration at a time; its source and its
  // destination both stop at their next step boundary and stay paused while the request's KV
  // crosses the link, then resume (finish_migration).
  const std::int64_t now = clock_.now_us();
  while (!planned_migrations_.empty() && pending_moves_.empty()) {
    const cluster::MigrateAction m = planned_migrations_.front();
    Unit* src = unit_of_instance(m.from);
    Unit* dst = unit_of_instance(m.to);
    if (src == nullptr || dst == nullptr || src == dst || src->members.size() != 1 || dst->members.size() != 1 ||
        src->requests.count(m.request.value) == 0) {
      if (src != nullptr) src->migrating = false;
      if (dst != nullptr) dst->migrating = false;
      ++counters_.migrations_skipped;
      coordinator_->on_migration_done(m.request);  // finished, or not between independent instances now
      planned_migrations_.erase(planned_migrations_.begin());
      continue;
    }
    src->migrating = true;
    dst->migrating = true;
    if (src->in_flight || dst->in_flight) return;  // at their step boundaries (finish_step calls back)
    planned_migrations_.erase(planned_migrations_.begin());
    const engine::Request* r = src->scheduler->find(m.request);
    KUN_CHECK(r != nullptr) << "request " << m.request << " listed on instance " << m.from;
    const std::int64_t held = src->kv->tokens_held(m.request);
    const bool live = held > 0 && r->state == engine::RequestState::kRunning;
    auto d = src->scheduler->detach(m.request, /*keep_kv=*/live);
    KUN_CHECK(d.has_value());
    src->requests.erase(m.request.value);
    publish(*src);
    PendingMove pm;
    pm.request = std::move(*d);
    pm.from = m.from;
    pm.to = m.to;
    pm.with_kv = live;
    pm.ready_us = now;
    if (live) {
      const std::int64_t bytes = src->kv->layer_blocks_for(held) * layer_block_bytes();
      pm.ready_us = now + static_cast<std::int64_t>(std::ceil(link_us(bytes)));
      counters_.migration_bytes += bytes;
    }
    events_.push_back(std::to_string(now) + " migrate request " + std::to_string(m.request.value) + " from instance " +
                      std::to_string(m.from) + " to " + std::to_string(m.to) + (live ? " with its KV" : "") + ", both paused until " +
                      std::to_string(pm.ready_us));
    pending_moves_.push_back(std::move(pm));
  }
}

void ClusterSim::finish_migration(PendingMove& m) {
  const RequestId id = m.request.id;
  Unit* src = unit_of_instance(m.from);
  Unit* dst = unit_of_instance(m.to);
  // Under `migrate` instances never fuse, so both are still independent.
  KUN_CHECK(src != nullptr && dst != nullptr && src->members.size() == 1 && dst->members.size() == 1);
  if (!m.with_kv) {
    KUN_CHECK_OK(dst->scheduler->adopt(std::move(m.request), /*with_kv=*/false));
    dst->requests.insert(id.value);
    ++counters_.migrations;
  } else if (dst->kv->can_grow(id, m.request.num_computed)) {
    KUN_CHECK_OK(dst->scheduler->adopt(std::move(m.request), /*with_kv=*/true));
    src->scheduler->release_detached(id);
    dst->requests.insert(id.value);
    ++counters_.migrations;
    ++counters_.migrations_with_kv;
  } else {  // no room on the destination by now: it continues where it is, with its KV
    KUN_CHECK_OK(src->scheduler->adopt(std::move(m.request), /*with_kv=*/true));
    src->requests.insert(id.value);
    ++counters_.migrations_skipped;
  }
  src->migrating = false;
  dst->migrating = false;
  publish(*src);
  publish(*dst);
  coordinator_->on_migration_done(id);
}

void ClusterSim::block_next_drop() {
  // The runtime's policy thread carries out one tick's drops one after another
  // (ClusterRuntime::run_actions): a drop's sources stop (their gates close, their engines park
  // at a step boundary) only when the drop before it has finished.
  if (pending_drops_.empty() || clock_.now_us() < drop_busy_until_us_) return;
  for (std::int64_t inst : pending_drops_.front().instances) {
    if (Unit* u = unit_of_instance(inst)) u->blocked = true;
  }
}

void ClusterSim::try_pending_transitions() {
  const std::int64_t now = clock_.now_us();
  block_next_drop();
  while (!pending_drops_.empty() && now >= drop_busy_until_us_) {
    const cluster::DropAction d = pending_drops_.front();
    bool idle = true;
    for (std::int64_t inst : d.instances) {
      Unit* u = unit_of_instance(inst);
      if (u == nullptr || u->in_flight || !u->blocked) idle = false;
    }
    if (!idle) break;
    // Fused at this step boundary; then the members free their dropped layers, one control
    // round trip each (GpuSpec::drop_layer_us), before the group's first step.
    const std::int64_t layers = fuse(d);
    const auto work = static_cast<std::int64_t>(std::llround(cost_.gpu().drop_layer_us * static_cast<double>(layers)));
    const std::int64_t done = now + work;
    if (Unit* g = unit_of_instance(d.instances.front()); g != nullptr && work > 0) g->resume_us = std::max(g->resume_us, done);
    drop_busy_until_us_ = done;
    coordinator_->on_drop_done(d.group, now);
    ++(d.absorbs.empty() ? counters_.drops : counters_.grows);
    const double ms = static_cast<double>(done - drop_requested_us_[d.group]) / 1000.0;
    counters_.drop_latency_ms.push_back(ms);
    events_.push_back(std::to_string(done) + " drop done group " + std::to_string(d.group));
    pending_drops_.erase(pending_drops_.begin());
    block_next_drop();
  }
  for (auto it = pending_restores_.begin(); it != pending_restores_.end();) {
    std::int64_t idx = -1;
    for (std::size_t i = 0; i < units_.size(); ++i) {
      if (units_[i]->group == it->group) idx = static_cast<std::int64_t>(i);
    }
    KUN_CHECK_GE(idx, 0) << "group " << it->group;
    Unit& gu = *units_[static_cast<std::size_t>(idx)];
    if (it->ready_us > now) {
      gu.blocked = false;  // a request homed late extended the gather: keep serving
      ++it;
      continue;
    }
    gu.blocked = true;  // weights are back, KV gathered: split at the next step boundary
    if (gu.in_flight) {
      ++it;
      continue;
    }
    advance_kv_moves(gu, /*assign=*/false);  // moves due now are live, not stop-and-copy
    const std::int64_t group = it->group;
    split(idx);
    coordinator_->on_restore_done(group, now);
    ++counters_.restores;
    counters_.restore_latency_ms.push_back(static_cast<double>(now - restore_requested_us_[group]) / 1000.0);
    events_.push_back(std::to_string(now) + " restore done group " + std::to_string(group));
    it = pending_restores_.erase(it);
  }
  try_pending_shrinks();
}

void ClusterSim::try_pending_shrinks() {
  const std::int64_t now = clock_.now_us();
  for (auto it = pending_shrinks_.begin(); it != pending_shrinks_.end();) {
    std::int64_t idx = -1;
    for (std::size_t i = 0; i < units_.size(); ++i) {
      if (units_[i]->group == it->action.group) idx = static_cast<std::int64_t>(i);
    }
    KUN_CHECK_GE(idx, 0) << "group " << it->action.group;
    Unit& gu = *units_[static_cast<std::size_t>(idx)];
    if (it->ready_us > now) {
      ++it;
      continue;
    }
    gu.blocked = true;  // weights are back: shrink at the next step boundary
    if (gu.in_flight) {
      ++it;
      continue;
    }
    const cluster::ShrinkAction action = it->action;
    it = pending_shrinks_.erase(it);
    shrink(idx, action);
    coordinator_->on_shrink_done(action.group, now);
    ++counters_.shrinks;
    counters_.restore_latency_ms.push_back(static_cast<double>(now - restore_requested_us_[action.group]) / 1000.0);
    events_.push_back(std::to_string(now) + " shrink done group " + std::to_string(action.group) + " into " +
                      std::to_string(action.new_groups[0]) + " and " + std::to_string(action.new_groups[1]));
  }
}

void ClusterSim::tick() {
  const std::int64_t now = clock_.now_us();
  if (config_.live_stats) {
    for (auto& u : units_) publish(*u);
  }
  auto snaps = snapshots();
  for (const auto& s : snaps) {
    const std::string label = "{instance=\"" + std::to_string(s.instance) + "\"}";
    const double usage = s.kv_blocks_total > 0
                             ? static_cast<double>(s.kv_blocks_total - s.kv_blocks_free) / static_cast<double>(s.kv_blocks_total)
                             : 0.0;
    gauges_.push_back({now, "demand" + label, s.demand()});
    gauges_.push_back({now, "kv_usage" + label, usage});
    gauges_.push_back({now, "queue" + label, static_cast<double>(s.num_queued)});
    gauges_.push_back({now, "running" + label, static_cast<double>(s.num_running)});
    gauges_.push_back({now, "group_state" + label, static_cast<double>(static_cast<int>(s.state))});
  }
  apply(coordinator_->tick(now, snaps));
  run_script();
}

void ClusterSim::run_script() {
  const std::int64_t now = clock_.now_us();
  while (next_script_ < config_.script.size() && config_.script[next_script_].at_us <= now) {
    const SimConfig::ScriptedTransition& st = config_.script[next_script_++];
    cluster::Actions a;
    if (st.grow_group >= 0) {
      auto d = coordinator_->force_grow(st.grow_group, st.grow_with, now);
      KUN_CHECK(d.ok()) << "scripted growth at " << st.at_us << "us: " << d.status().to_string();
      a.drops.push_back(*d);
    } else if (st.shrink_group >= 0) {
      auto sh = coordinator_->force_shrink(st.shrink_group, now);
      KUN_CHECK(sh.ok()) << "scripted shrink at " << st.at_us << "us: " << sh.status().to_string();
      a.shrinks.push_back(*sh);
    } else if (!st.drop.empty()) {
      auto d = coordinator_->force_drop(st.drop, now);
      KUN_CHECK(d.ok()) << "scripted drop at " << st.at_us << "us: " << d.status().to_string();
      a.drops.push_back(*d);
    } else {
      auto r = coordinator_->force_restore(st.restore_group, now);
      KUN_CHECK(r.ok()) << "scripted restore at " << st.at_us << "us: " << r.status().to_string();
      a.restores.push_back(*r);
    }
    apply(a);
  }
}

StatusOr<SimReport> ClusterSim::run(const workload::Trace& trace) {
  workload::check_trace(trace);
  trace_ = &trace;
  const std::size_t n = trace.size();
  records_.assign(n, {});
  generated_.assign(n, 0);
  max_tokens_.assign(n, 0);
  prompt_tokens_.assign(n, 0);
  is_stale_.assign(n, false);
  stale_ids_.clear();
  const std::int64_t max_len = config_.scheduler.max_model_len;
  for (std::size_t i = 0; i < n; ++i) {
    const auto& tr = trace.requests[i];
    std::int64_t out = std::max<std::int64_t>(1, tr.output_tokens);
    std::int64_t prompt = std::max<std::int64_t>(1, tr.prompt_tokens);
    if (prompt + out > max_len) {
      ++counters_.clipped;
      out = std::min(out, max_len - 1);
      prompt = std::min(prompt, max_len - out);
    }
    max_tokens_[i] = static_cast<std::int32_t>(out);
    prompt_tokens_[i] = static_cast<std::int32_t>(prompt);
    auto& rec = records_[i];
    rec.index = static_cast<std::int64_t>(i);
    rec.arrival_us = tr.arrival_us;
    rec.prompt_tokens = static_cast<std::int32_t>(prompt);
    rec.expected_output_tokens = static_cast<std::int32_t>(out);
    rec.outcome = workload::RequestOutcome::kFailed;  // until it finishes
  }

  std::size_t next_arrival = 0;
  std::int64_t next_tick = 0;
  bool tick_woken = false;  // the tick is due and waited for a core (next_tick: when it runs)
  std::int64_t idle_ticks = 0;
  constexpr std::int64_t kInf = std::numeric_limits<std::int64_t>::max();
  while (true) {
    bool any_in_flight = false;
    std::int64_t t = kInf;
    for (const auto& u : units_) {
      if (u->in_flight) {
        any_in_flight = true;
        t = std::min(t, u->busy_until_us);
        if (u->copy_until_us > clock_.now_us()) t = std::min(t, u->copy_until_us);
      }
    }
    if (next_arrival == n && !any_in_flight && pending_moves_.empty() && planned_migrations_.empty() && pending_restores_.empty() &&
        pending_shrinks_.empty() && pending_drops_.empty() && outstanding() == 0) {
      break;
    }
    if (next_arrival < n) t = std::min(t, trace.requests[next_arrival].arrival_us);
    for (const auto& r : pending_restores_) {
      if (r.ready_us > clock_.now_us()) t = std::min(t, r.ready_us);  // past: waits for a step end
    }
    for (const auto& r : pending_shrinks_) {
      if (r.ready_us > clock_.now_us()) t = std::min(t, r.ready_us);
    }
    for (const auto& m : pending_moves_) t = std::min(t, m.ready_us);
    if (!pending_drops_.empty() && drop_busy_until_us_ > clock_.now_us()) t = std::min(t, drop_busy_until_us_);  // the next drop starts
    for (const auto& u : units_) {
      if (!u->in_flight && u->resume_us > clock_.now_us() && u->scheduler->has_unfinished()) {
        t = std::min(t, u->resume_us);  // a split's stop-and-copy ends
      }
    }
    t = std::min(t, next_tick);
    ++events_handled_;
    if (t > config_.max_virtual_us) return deadline_exceeded("simulation passed max_virtual_us");
    clock_.set_us(std::max(t, clock_.now_us()));

    advance_contended_steps();
    for (auto& u : units_) {
      if (u->in_flight && u->busy_until_us <= clock_.now_us()) finish_step(*u);
    }
    for (auto it = pending_moves_.begin(); it != pending_moves_.end();) {
      if (it->ready_us > clock_.now_us()) {
        ++it;
        continue;
      }
      finish_migration(*it);
      it = pending_moves_.erase(it);
    }
    start_migrations();
    try_pending_transitions();
    while (next_arrival < n && trace.requests[next_arrival].arrival_us <= clock_.now_us()) {
      arrive(static_cast<std::int64_t>(next_arrival));
      ++next_arrival;
    }
    if (clock_.now_us() >= next_tick) {
      // The runtime's policy thread sleeps until its tick is due, then waits for a core like a
      // device thread woken by a step (the host's fixed time per wake-up at the devices computing,
      // GpuSpec::host_contention_us; 0 on a GPU profile), and re-arms from when it ran
      // (runtime::ClusterRuntime::policy_loop: next = now + period), so its ticks drift later
      // under load.
      const double wake_us = tick_woken ? 0.0 : cost_.gpu().contention_latency_us(std::max(1.0, devices_computing()));
      if (wake_us >= 1.0) {
        next_tick = clock_.now_us() + static_cast<std::int64_t>(std::llround(wake_us));
        tick_woken = true;
      } else {
        tick();
        try_pending_transitions();
        next_tick = clock_.now_us() + config_.timeline_period_us;
        tick_woken = false;
        idle_ticks = 0;
      }
    }
    start_steps();
    reprice_contended_steps();
    bool busy = false;
    for (const auto& u : units_) busy = busy || u->in_flight;
    if (!busy && next_arrival == n && pending_moves_.empty() && pending_restores_.empty() && pending_shrinks_.empty() &&
        pending_drops_.empty() && outstanding() > 0) {
      // Nothing can run and nothing will arrive: only a coordinator action can help.
      if (++idle_ticks > 4 * 120) return internal_error("simulation stuck: requests left that no instance can run");
    }
  }

  SimReport rep;
  for (const auto& u : units_) collect(*u);
  rep.records = records_;
  rep.steps = std::move(steps_);
  const std::string name = config_.label.empty() ? cluster::policy_name(config_.policy) : config_.label;
  rep.report = workload::build_report(records_, name, config_.slo);
  rep.stale_requests = stale_ids_;
  std::sort(rep.stale_requests.begin(), rep.stale_requests.end());
  if (config_.policy == cluster::Policy::kKunServe) rep.stale_kv = cluster::stale_kv_strategy_name(config_.stale_kv);
  rep.timeline = workload::build_timeline(records_, gauges_, 1'000'000);
  rep.counters = counters_;
  rep.events = events_;
  rep.transitions = transition_log_;
  rep.kv_blocks_per_instance = kv_blocks_per_instance_;
  rep.kv_tokens_per_instance = kv_blocks_per_instance_ / cost_.model().num_layers * config_.block_size_tokens;
  rep.end_us = clock_.now_us();
  rep.instants = events_handled_;
  rep.memory = memory_plan();
  return rep;
}

nlohmann::json SimReport::to_json() const {
  nlohmann::json j = workload::report_to_json(report);
  nlohmann::json c;
  c["steps"] = counters.steps;
  c["preemptions"] = counters.preemptions;
  c["preemptions_recompute"] = counters.preemptions_recompute;
  c["preemptions_swap"] = counters.preemptions_swap;
  c["recomputed_tokens"] = counters.recomputed_tokens;
  c["transition_recomputed_tokens"] = counters.transition_recomputed_tokens;
  const double stage_us = counters.fused_stage_busy_us + counters.fused_stage_idle_us;
  c["fused_stage_busy_s"] = counters.fused_stage_busy_us * 1e-6;
  c["bubble_fraction"] = stage_us > 0.0 ? counters.fused_stage_idle_us / stage_us : 0.0;
  c["drops"] = counters.drops;
  c["restores"] = counters.restores;
  c["shrinks"] = counters.shrinks;
  c["migrations"] = counters.migrations;
  c["migrations_planned"] = counters.migrations_planned;
  c["migrations_with_kv"] = counters.migrations_with_kv;
  c["migrations_skipped"] = counters.migrations_skipped;
  c["rejected"] = counters.rejected;
  c["clipped"] = counters.clipped;
  c["swap_bytes"] = counters.swap_bytes;
  c["activation_bytes"] = counters.activation_bytes;
  c["param_bytes_dropped"] = counters.param_bytes_dropped;
  c["weight_bytes_restored"] = counters.weight_bytes_restored;
  c["migration_bytes"] = counters.migration_bytes;
  c["stale_requests_recomputed"] = counters.stale_requests_recomputed;
  c["stale_tokens_recomputed"] = counters.stale_tokens_recomputed;
  c["stale_requests_kept_kv"] = counters.stale_requests_kept_kv;
  c["restore_requests_kept_kv"] = counters.restore_requests_kept_kv;
  c["kv_bytes_exchanged"] = counters.kv_bytes_exchanged;
  c["kv_bytes_gathered"] = counters.kv_bytes_gathered;
  c["kv_bytes_gathered_at_split"] = counters.kv_bytes_gathered_at_split;
  c["remote_attention_bytes"] = counters.remote_attention_bytes;
  c["remote_attention_ms"] = static_cast<double>(counters.remote_attention_us) / 1000.0;
  c["exchange_ms"] = counters.exchange_ms;
  c["drop_latency_ms"] = counters.drop_latency_ms;
  c["restore_latency_ms"] = counters.restore_latency_ms;
  j["sim"] = c;
  if (!stale_kv.empty()) {
    j["stale_kv"] = stale_kv;
    // Requests running at a drop (stale) against the rest, as the bench's in-process runs report.
    std::vector<workload::RequestRecord> stale, fresh;
    std::size_t next = 0;
    for (const auto& r : records) {
      const bool is_stale = next < stale_requests.size() && stale_requests[next] == r.index;
      if (is_stale) ++next;
      (is_stale ? stale : fresh).push_back(r);
    }
    // Only the two figures (a whole build_report sorted every token's ITL of both halves again).
    const auto summary = [&](const std::vector<workload::RequestRecord>& recs) {
      return nlohmann::json{{"requests", recs.size()},
                            {"ttft_p99_ms", workload::summarize(workload::ttft_values_ms(recs)).p99},
                            {"tpot_mean_ms", workload::summarize(workload::tpot_values_ms(recs)).mean}};
    };
    j["stale_requests"] = summary(stale);
    j["new_requests"] = summary(fresh);
  }
  j["events"] = events;  // "<virtual us> drop requested group 0: ...", as the bench's runtime.transitions
  j["kv_tokens_per_instance"] = kv_tokens_per_instance;
  j["memory"] = memory.to_json();
  j["instants"] = instants;
  j["end_s"] = static_cast<double>(end_us) / 1e6;
  return j;
}

StatusOr<SimReport> run_simulation(const SimConfig& config, const workload::Trace& trace) {
  auto sim = ClusterSim::create(config);
  if (!sim.ok()) return sim.status();
  return (*sim)->run(trace);
}

}  // namespace kun::sim

namespace kun::sim {

MemoryPlan ClusterSim::memory_plan() const {
  MemoryPlan p;
  const std::int64_t t = config_.tp;
  const std::int64_t page = config_.page_bytes;  // per instance (t GPU pages)
  const std::int64_t num_layers = cost_.model().num_layers;
  p.tp = t;
  p.num_layers = num_layers;
  auto gpu = gpu_spec(config_.gpu);
  p.gpu_memory_bytes = gpu.ok() ? gpu->memory_bytes : 0;
  p.usable_bytes_per_gpu = static_cast<std::int64_t>(static_cast<double>(p.gpu_memory_bytes) * config_.gpu_memory_utilization) -
                           config_.activation_reserve_bytes;
  p.layer_bytes_per_gpu = pages_per_layer_ * page / t;
  p.weight_bytes_per_gpu = (num_layers * pages_per_layer_ * page + cost_.non_layer_param_bytes()) / t;
  p.kv_bytes_per_gpu = kv_pages_per_instance_ * page / t;
  p.kv_bytes_per_token = num_layers * cost_.kv_bytes_per_token_per_layer() / t;
  p.kv_tokens_per_instance = kv_blocks_per_instance_ / num_layers * config_.block_size_tokens;
  for (std::int64_t g = 2; g <= std::min<std::int64_t>(8, config_.num_instances); g *= 2) {
    if (g > num_layers) break;
    // The member keeping the most layers grows least: the group's pool is bound by it.
    std::int64_t kept = 0;
    for (std::int64_t s = 0; s < g; ++s) kept = std::max(kept, cluster::layers_kept(s, g, num_layers));
    const std::int64_t pages = kv_pages_per_instance_ + (num_layers - kept) * pages_per_layer_;
    // Its pool holds `kept` layers' KV, so the group holds pages x blocks / kept tokens.
    const std::int64_t tokens = pages * blocks_per_page_ / kept * config_.block_size_tokens;
    p.growth.push_back({g, tokens, static_cast<double>(pages) / static_cast<double>(std::max<std::int64_t>(1, kv_pages_per_instance_))});
  }
  return p;
}

std::string MemoryPlan::to_text() const {
  std::ostringstream o;
  const auto gb = [](std::int64_t b) { return static_cast<double>(b) / 1e9; };
  o.setf(std::ios::fixed);
  o.precision(2);
  o << "memory per GPU (TP " << tp << "): " << gb(gpu_memory_bytes) << " GB, usable " << gb(usable_bytes_per_gpu)
    << " GB; weights " << gb(weight_bytes_per_gpu) << " GB (" << num_layers << " layers x " << gb(layer_bytes_per_gpu)
    << " GB + embeddings/head); KV pool " << gb(kv_bytes_per_gpu) << " GB = " << kv_tokens_per_instance
    << " tokens per instance (" << static_cast<double>(kv_bytes_per_token) / 1e6 << " MB per token per GPU)\n";
  for (const Growth& g : growth) {
    o << "  fused group of " << g.group_size << ": a member's KV pool grows x" << g.growth << "; the group holds "
      << g.kv_tokens << " tokens (" << g.group_size << " independent instances: " << g.group_size * kv_tokens_per_instance
      << ")\n";
  }
  return o.str();
}

nlohmann::json MemoryPlan::to_json() const {
  nlohmann::json j{{"tp", tp},
                   {"gpu_memory_bytes", gpu_memory_bytes},
                   {"usable_bytes_per_gpu", usable_bytes_per_gpu},
                   {"weight_bytes_per_gpu", weight_bytes_per_gpu},
                   {"layer_bytes_per_gpu", layer_bytes_per_gpu},
                   {"kv_bytes_per_gpu", kv_bytes_per_gpu},
                   {"kv_bytes_per_token_per_gpu", kv_bytes_per_token},
                   {"kv_tokens_per_instance", kv_tokens_per_instance}};
  nlohmann::json g = nlohmann::json::array();
  for (const Growth& x : growth) g.push_back({{"group_size", x.group_size}, {"member_kv_tokens", x.kv_tokens}, {"growth", x.growth}});
  j["kv_growth"] = g;
  return j;
}

}  // namespace kun::sim
