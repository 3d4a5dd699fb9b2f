// ClusterSim: an event-driven simulation of N data-parallel instances on a virtual clock
// (DESIGN.md section 5, "Simulation"). Each instance runs the real engine::Scheduler over a real
// engine::KvManager (virtual page ids, no arena) and a SimExecutor; the real cluster::Router
// places arrivals and the real cluster::Coordinator decides drops, restores and migrations.
// Only time is simulated.
//
// Event loop: the next event is the earliest of (a unit's step end, an arrival, a monitor tick,
// a restore finishing). At one instant: step ends first (unit order), then restores, arrivals,
// the tick (snapshots -> coordinator -> actions; timeline gauges), then every idle unit with work
// starts its next step (busy until now + modelled duration). Deterministic: no wall clock, no
// hash-order iteration, ties broken by fixed order.
//
// Units: an independent instance is a unit of one device. Under `kunserve` a DropAction fuses
// its g members (at their next step boundary; drop latency = waiting for in-flight steps, no
// copy) into one unit: one Scheduler over a KvManager with g device allocators, layer l on device
// l / (L/g) (cluster::layers_kept), each device's pool grown by the pages of the layers it
// dropped, and a g-stage pipeline SimExecutor. Requests running at the drop (stale requests) are
// handled by SimConfig::stale_kv, as the runtime does (DESIGN.md 3.5):
//   recompute        : their KV is freed and they queue in the group (prompt + generated tokens);
//   remote-attention : they keep their KV on the member they ran on (KvManager::import_tables,
//                      every layer on that device); layers run by other stages pay remote
//                      attention in the executor (q/k/v out, output back over the link);
//   exchange         : as remote-attention, and each one's misplaced layers move to their owners
//                      once its bulk transfer has crossed the link (see "KV moves" below).
// A RestoreAction pulls the dropped layers' weights over each member's link while the group keeps
// serving; under remote-attention / exchange every running request also gets a home member (most
// room after the split, room reserved for its longest length, engine::assign_restore_homes, as the runtime) and
// its KV is gathered there by a live reverse exchange (remote attention after its layers moved).
// The group splits at a step boundary once the weights are back and the gather is done (or after
// restore_gather_timeout_us): running requests continue on their home (else the member with the
// most room; what is still elsewhere is copied stop-and-copy, the member resuming after that
// transfer), those that fit on no member recompute, queued ones go to the least outstanding.
// KV moves: bulk transfers (exchange: from the member holding the KV; gather: to the home) queue
// on that member's link after what it already carries, in rounds of exchange_requests_per_round
// requests, one message per layer; a round's requests are moved at the first step boundary after
// the round's last byte crossed. The transfers get the whole link: the activations they yield to
// are a small fraction of it (hidden state per token per step vs. the KV of whole contexts).
// Under `migrate`, a planned migration happens at its source's next step boundary (as the runtime,
// which pauses the engines between steps): a queued request moves at once; a running one is
// detached with its KV, which stays allocated on the source while it crosses the link; once it
// arrived the destination adopts it with its KV (no re-prefill, Scheduler::adopt with_kv, as the
// runtime) and the source frees it, or, when the destination has no room by then, it resumes on
// the source (the runtime's "stays where it is").
//
// Owned by one thread.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cluster/coordinator.h"
#include "cluster/router.h"
#include "cluster/transition_plan.h"
#include "common/clock.h"
#include "engine/kv_manager.h"
#include "engine/scheduler.h"
#include "kv/block_allocator.h"
#include "model/config.h"
#include "sim/cost_model.h"
#include "sim/device_profile.h"
#include "sim/sim_executor.h"
#include "workload/report.h"
#include "workload/trace.h"

namespace kun::sim {

struct SimConfig {
  std::string gpu = "a100-80gb";
  std::string link = "nvlink-a100";   // between instances (activations, weight pulls, migration)
  std::string host_link = "pcie4";    // device <-> host (swap)
  // Paced links (the runtime's --link-gbps / --host-link-gbps): > 0 replaces the named link's
  // bandwidth (GB/s) and latency.
  double link_gbps = 0.0;
  double link_latency_us = 0.0;
  double host_link_gbps = 0.0;
  double host_link_latency_us = 0.0;
  // Group sizes the planner may form (empty: cluster::ClusterShape's default).
  std::vector<std::int64_t> allowed_degrees;
  // > 0: the KV pool of an independent instance holds this many tokens (the runtime's
  // --kv-tokens-per-device) instead of what the memory leaves.
  std::int64_t kv_tokens_per_instance = 0;
  std::string model_name = "llama-2-7b";  // used when `model` is not set
  bool use_model = false;                 // true: `model` instead of model_name
  model::ModelConfig model;
  std::int64_t num_instances = 4;
  // Tensor-parallel degree inside an instance: an instance is `tp` GPUs (weights and KV heads
  // split t ways, see CostModel); a fused group of g instances is a g-stage pipeline of TP-t stages.
  std::int64_t tp = 1;
  cluster::Policy policy = cluster::Policy::kRecompute;
  // kunserve: what happens to requests running when their instance fuses (and at the split).
  cluster::StaleKvStrategy stale_kv = cluster::StaleKvStrategy::kExchange;
  std::int64_t exchange_requests_per_round = 8;       // the runtime's (DESIGN.md 3.5)
  std::int64_t restore_gather_timeout_us = 2'000'000;  // the runtime's: split without a full gather
  std::string label;  // the report's policy name (empty: the policy's name)
  engine::SchedulerConfig scheduler;      // preemption is set from the policy (swap -> kSwap)
  cluster::CoordinatorConfig coordinator;  // policy is set from `policy`
  cluster::RoutePolicy route = cluster::RoutePolicy::kLeastOutstanding;
  double gpu_memory_utilization = 0.9;      // fraction of device memory for params + KV
  std::int64_t activation_reserve_bytes = 2LL << 30;  // kept free for activations
  std::int64_t page_bytes = 2LL << 20;
  std::int64_t block_size_tokens = 16;
  std::int64_t host_swap_bytes = 64LL << 30;  // per instance, for the swap policy
  std::int64_t timeline_period_us = 500'000;  // gauge sampling (and coordinator tick) period
  std::uint64_t seed = 0;                      // prompt token ids and tie-free choices
  std::int64_t max_virtual_us = 24LL * 3600 * 1'000'000;  // safety stop
  workload::SloSpec slo;
  // Scripted transitions (tests; replaying a runtime scenario): at the first coordinator tick at
  // or after at_us, force a drop of `drop` (stage order) or, with `drop` empty, a restore of
  // `restore_group`; with grow_group set, a growth of that group with `grow_with` (g free
  // instances or another group's members, Coordinator::force_grow); with shrink_group set, a
  // shrink of that group. Entries in time order; kunserve only.
  struct ScriptedTransition {
    std::int64_t at_us = 0;
    std::vector<std::int64_t> drop;
    std::int64_t restore_group = -1;
    std::int64_t grow_group = -1;
    std::vector<std::int64_t> grow_with;
    std::int64_t shrink_group = -1;
  };
  std::vector<ScriptedTransition> script;
  // Scheduler + KV invariants after every n-th step of a unit (0: never; tests). Costly: the
  // KV integrity check walks every block.
  std::int64_t check_invariants_every_steps = 0;
  // Keep every step (SimReport::steps), as the runtime's ClusterOptions::record_steps.
  bool record_steps = false;
  // false (the runtime's behaviour): the router and the coordinator read each unit's stats as
  // its engine last published them, and arrivals during a step wait in its inbox until the step
  // ends (see Unit::published). true: they read the live schedulers and arrivals enter at once
  // (the simulator before session 9; an ideal router that counts what it routed).
  bool live_stats = false;
};

struct SimCounters {
  std::int64_t steps = 0;
  std::int64_t preemptions = 0;  // recompute + swap preemptions
  std::int64_t preemptions_recompute = 0;
  std::int64_t preemptions_swap = 0;
  std::int64_t recomputed_tokens = 0;
  std::int64_t transition_recomputed_tokens = 0;  // of those, after a drop/restore/migration lost KV
  std::int64_t drops = 0;
  std::int64_t grows = 0;  // fused groups grown to twice their degree (not counted in drops)
  std::int64_t restores = 0;
  std::int64_t shrinks = 0;  // partial restores: a group of g >= 4 became two of g / 2
  std::int64_t migrations = 0;            // carried out (arrived at the destination)
  std::int64_t migrations_planned = 0;    // MigrateActions from the coordinator
  std::int64_t migrations_with_kv = 0;    // of those carried out: running, KV copied (no recompute)
  std::int64_t migrations_skipped = 0;    // finished first, or the destination had no room (stays)
  std::int64_t rejected = 0;
  std::int64_t clipped = 0;  // requests whose lengths were clipped to max_model_len
  std::int64_t swap_bytes = 0;
  std::int64_t activation_bytes = 0;
  std::int64_t weight_bytes_restored = 0;
  std::int64_t param_bytes_dropped = 0;
  std::int64_t migration_bytes = 0;
  // Requests running at a drop or a split that lost their KV and recompute, and the KV tokens
  // they had (0 under remote-attention / exchange unless a request fits nowhere).
  std::int64_t stale_requests_recomputed = 0;
  std::int64_t stale_tokens_recomputed = 0;
  std::int64_t stale_requests_kept_kv = 0;    // running at a drop, kept their KV in the group
  std::int64_t restore_requests_kept_kv = 0;  // running at a split, continued on a member with their KV
  std::int64_t kv_bytes_exchanged = 0;        // live KV exchange after drops
  std::int64_t kv_bytes_gathered = 0;         // reverse exchange for restores (live + at the split)
  std::int64_t kv_bytes_gathered_at_split = 0;  // of which stop-and-copy at the split
  std::int64_t remote_attention_bytes = 0;
  std::int64_t remote_attention_us = 0;       // stage time waiting on remote attention
  double fused_stage_busy_us = 0.0;           // fused rounds: stage time on micro-batches
  double fused_stage_idle_us = 0.0;           // fused rounds: the pipeline bubble
  std::vector<double> exchange_ms;            // per drop: until the last stale layer moved (exchange)
  std::vector<double> drop_latency_ms;
  std::vector<double> restore_latency_ms;
};

// Memory arithmetic of one instance (per GPU unless named otherwise), as ClusterSim::create
// computed it.
struct MemoryPlan {
  std::int64_t tp = 1;
  std::int64_t gpu_memory_bytes = 0;
  std::int64_t usable_bytes_per_gpu = 0;      // memory x gpu_memory_utilization - activation reserve
  std::int64_t weight_bytes_per_gpu = 0;      // layers (page-rounded) + embeddings / LM head, / t
  std::int64_t layer_bytes_per_gpu = 0;       // one decoder layer, / t
  std::int64_t kv_bytes_per_gpu = 0;          // the KV pool
  std::int64_t kv_bytes_per_token = 0;        // every layer, per GPU
  std::int64_t kv_tokens_per_instance = 0;
  std::int64_t num_layers = 0;
  // A member of a fused group of g: its KV pool after dropping its other layers, against its own.
  struct Growth {
    std::int64_t group_size = 0;
    std::int64_t kv_tokens = 0;     // the group's capacity in tokens (bound by its largest stage)
    double growth = 0.0;            // a member's KV pool over an independent instance's
  };
  std::vector<Growth> growth;  // g = 2, 4, 8 (up to the instance count)
  std::string to_text() const;
  nlohmann::json to_json() const;
};

struct SimReport {
  workload::Report report;
  workload::Timeline timeline;
  std::vector<workload::RequestRecord> records;  // in trace order
  std::vector<RecordedStep> steps;  // SimConfig::record_steps: one per micro-batch, in end order
  SimCounters counters;
  std::vector<std::string> events;  // coordinator events, time-stamped
  std::vector<cluster::TransitionRecord> transitions;  // every transition plan carried out, in order
  std::vector<std::int64_t> stale_requests;  // trace indices of requests running at a drop
  std::string stale_kv;                      // the strategy, for kunserve ("" otherwise)
  std::int64_t kv_blocks_per_instance = 0;  // layer blocks of an independent instance
  std::int64_t kv_tokens_per_instance = 0;
  std::int64_t end_us = 0;  // virtual time of the last event
  std::int64_t instants = 0;  // event-loop iterations (distinct virtual instants handled)
  MemoryPlan memory;
  nlohmann::json to_json() const;
};

StatusOr<SimReport> run_simulation(const SimConfig& config, const workload::Trace& trace);

class ClusterSim {
 public:
  static StatusOr<std::unique_ptr<ClusterSim>> create(const SimConfig& config);
  ~ClusterSim();

  StatusOr<SimReport> run(const workload::Trace& trace);

  const CostModel& cost() const { return cost_; }
  MemoryPlan memory_plan() const;
  std::int64_t kv_blocks_per_instance() const { return kv_blocks_per_instance_; }

 private:
  struct Unit;
  ClusterSim(SimConfig config, CostModel cost, LinkSpec link, LinkSpec host_link);

  std::unique_ptr<Unit> make_unit(const std::vector<std::int64_t>& members, std::int64_t group);
  // What the coordinator and the router see: each unit's published stats (Unit::published), as
  // the runtime's snapshots_of. for_routing: without the per-request lists (migrate), which only
  // the coordinator reads.
  std::vector<cluster::InstanceSnapshot> snapshots(bool for_routing = false) const;
  void start_steps();
  // The engine's published stats (Unit::published) from its scheduler now.
  void publish(Unit& u) const;
  // Arrivals routed to a unit while its step was in flight enter its scheduler at the step's end.
  void drain_inbox(Unit& u);
  std::vector<std::int32_t> prompt_of(std::int64_t index) const;
  void finish_step(Unit& u);
  // Host contention (a CPU profile, GpuSpec::host_contention) as processor sharing: the steps in
  // flight progress at 1 / contention_factor(devices computing) of their uncontended speed, the
  // factor changing whenever a step starts or ends. advance_* charges the time since the last
  // event instant; reprice_* sets every step's end at the factor from now on.
  void advance_contended_steps();
  void reprice_contended_steps();
  // Devices computing now: in-flight steps past their swap copies (a fused round by its stages'
  // busy share).
  double devices_computing() const;
  void handle_events(Unit& u, const std::vector<engine::TokenEvent>& events);
  bool add_to_unit(Unit& u, std::int64_t index, std::vector<std::int32_t> prompt, std::int64_t max_tokens);
  void arrive(std::int64_t index);
  void tick();
  void apply(const cluster::Actions& actions);
  void try_pending_transitions();
  void run_script();  // SimConfig::script entries now due
  void block_next_drop();  // stops the front pending drop's sources once the drop before it is done
  // Carries out the drop at its step boundary; returns the layers its members freed (cluster::plan_drop).
  std::int64_t fuse(const cluster::DropAction& drop);
  cluster::TransitionGeometry transition_geometry() const;
  void record_plan(const std::string& kind, std::int64_t group, std::string plan);
  void split(std::int64_t unit_index);
  // Carries out cluster::plan_shrink at a step boundary (the weights are back): two half units.
  void shrink(std::int64_t unit_index, const cluster::ShrinkAction& action);
  void try_pending_shrinks();
  bool keeps_kv() const { return config_.stale_kv != cluster::StaleKvStrategy::kRecompute; }
  // Queues a request's bulk KV transfer of `layers` layer messages of `layer_bytes` each on
  // stage `link`'s link of a fused unit (see "KV moves").
  void queue_kv_move(Unit& u, std::int64_t index, std::int64_t link, std::int64_t layers, std::int64_t layer_bytes);
  void close_kv_round(Unit& u, std::int64_t link);
  // At a fused unit's step boundary: moves the misplaced layers of requests whose transfer has
  // crossed; while restoring, gives running requests without a home one and queues their gather.
  void advance_kv_moves(Unit& u, bool assign);
  void assign_homes(Unit& u);
  std::int64_t layer_block_bytes() const;
  // An instance-wide transfer over the link: its t GPUs each send their 1/t share in parallel.
  double link_us(std::int64_t bytes) const { return transfer_us(link_, (bytes + config_.tp - 1) / config_.tp); }
  std::int64_t least_outstanding(const std::vector<std::int64_t>& unit_indices) const;
  Unit* unit_of_instance(std::int64_t instance);
  std::int64_t outstanding() const;

  SimConfig config_;
  CostModel cost_;
  LinkSpec link_;
  LinkSpec host_link_;
  ManualClock clock_;
  std::unique_ptr<cluster::Coordinator> coordinator_;
  std::unique_ptr<cluster::Router> router_;
  std::int64_t kv_pages_per_instance_ = 0;
  std::int64_t pages_per_layer_ = 0;
  std::int64_t blocks_per_page_ = 0;
  std::int64_t kv_blocks_per_instance_ = 0;

  std::vector<std::unique_ptr<Unit>> units_;  // live units; index is not stable across fuse/split
  const workload::Trace* trace_ = nullptr;
  std::vector<workload::RequestRecord> records_;
  std::vector<RecordedStep> steps_;  // config_.record_steps
  std::vector<std::int64_t> generated_;        // output tokens so far per trace index
  // When the last step of a unit with this first instance ended (-1: none yet), for the host's
  // extra time on a step after an idle spell (GpuSpec::idle_wake_us, sim::idle_before).
  std::vector<std::int64_t> last_step_end_us_;
  std::vector<std::int32_t> max_tokens_;       // after clipping
  std::vector<std::int32_t> prompt_tokens_;    // after clipping
  std::vector<workload::GaugeSample> gauges_;
  std::vector<std::string> events_;
  std::vector<cluster::TransitionRecord> transition_log_;
  std::size_t next_script_ = 0;
  SimCounters counters_;
  std::int64_t events_handled_ = 0;
  std::int64_t contention_at_us_ = 0;  // host contention: the last event instant charged
  double contention_factor_ = 1.0;     // and the slowdown in effect since
  // Pending transitions and in-flight migrations.
  std::vector<cluster::DropAction> pending_drops_;  // in order; the front one runs (block_next_drop)
  std::int64_t drop_busy_until_us_ = 0;             // the drop in progress frees its layers until then
  struct PendingRestore {
    std::int64_t group = -1;
    std::int64_t ready_us = 0;  // weights pulled and KV gathered (or the gather timed out)
  };
  std::vector<PendingRestore> pending_restores_;
  struct PendingShrink {
    cluster::ShrinkAction action;
    std::int64_t ready_us = 0;  // its members' weight pulls have crossed their links
  };
  std::vector<PendingShrink> pending_shrinks_;
  // A migration taken out of its source at a step boundary: a running request's KV stays
  // allocated on the source (detach with keep_kv) while it crosses the link; a queued one moves
  // at once.
  struct PendingMove {
    engine::Request request;
    std::int64_t from = -1;      // instance
    std::int64_t to = -1;        // instance
    std::int64_t ready_us = 0;   // KV arrived
    bool with_kv = false;
  };
  std::vector<PendingMove> pending_moves_;
  // Migrations the coordinator planned whose source was mid-step: carried out at its next step
  // boundary (the runtime pauses the engines between steps to move a request).
  std::vector<cluster::MigrateAction> planned_migrations_;
  // Takes the planned migrations whose source unit is at a step boundary out of their source.
  void start_migrations();
  void finish_migration(PendingMove& m);
  std::vector<std::int64_t> stale_ids_;  // trace indices running at a drop (once each)
  std::vector<bool> is_stale_;
  std::map<std::int64_t, std::int64_t> drop_requested_us_;     // group -> time
  std::map<std::int64_t, std::int64_t> restore_requested_us_;  // group -> time
  // Adds a unit's scheduler and executor counters to counters_ (before it is destroyed).
  void collect(const Unit& u);
};

}  // namespace kun::sim
