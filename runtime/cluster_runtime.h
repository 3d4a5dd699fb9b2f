// ClusterRuntime: the in-process runtime of a data-parallel deployment (DESIGN.md 3, 5): N virtual
// devices, one per instance, each holding the whole model at start. It is the cluster's front
// door (routing submits to instances or fused groups) and carries out the cluster policy's
// actions at step boundaries:
//  * drop: g instances fuse into one pipeline. Member k keeps layers [k L/g, (k+1) L/g); its other
//    layers' pages become KV pages without a copy. Their queued requests join the group; running
//    (stale) requests keep their KV: the layers now owned by other members move there through the
//    Transport (stop-and-copy exchange at the step boundary; recompute with exchange off or when
//    the destination is short of blocks);
//  * restore, in two phases. Gather: each member reclaims its dropped layers' pages from its KV
//    pool (repacking live blocks inside the device) and a background thread pulls those layers'
//    weights from the peers that kept them; each running request gets a home, the member with the
//    most room after the split, and between steps its layers held by the other members move
//    there one at a time (live reverse exchange; remote attention serves a layer whose KV is not
//    yet home); requests that start meanwhile get a home too. The group keeps decoding on its
//    stage layers throughout. Split, once the weights are back and every request is home (or the
//    gather times out): at a step boundary whatever is still away is gathered stop-and-copy, a
//    request that fits on no member recomputes, layers whose pages could not be spared earlier
//    are reclaimed and pulled now, and the group splits into g instances;
//  * grow (g -> 2g, absorbing fused groups: the drop path over the layers members hold now) and
//    shrink (2g -> g + g, live like restore: the weights each half misses are pulled and each
//    request's KV gathered onto its half while the group decodes, then a short switch publishes
//    the two groups): runtime/cluster_regroup.cc;
//  * migrate (Llumnix-style baseline): a running request's KV blocks move to another instance
//    through the Transport and it continues there without recompute; queued requests move as is.
//
// Threads: every instance or group is an engine::Engine with its own thread; a policy thread
// samples them every monitor period and runs the cluster::Coordinator (pure policy). Transitions
// pause only the engines involved, at a step boundary. A transition reserves its units under
// transition_mu_ (Unit::in_transition) and carries out its messages and transfers with the lock
// released, so no lock is held across a copy, a transfer or a join, and transitions on disjoint
// units overlap; a transfer that fails past the commit point completes the transition without it
// or rolls it back (runtime/README.md "Failures"). The control path never waits for a transition: submit, cancel and stats read an
// immutable routing snapshot (Routing, published by pointer swap) and take only the target
// unit's admission gate, a short lock that is never held across a copy, a transfer or a join.
// A unit under transition has its gate closed: requests routed to it wait in the gate and are
// handed over, in order, to whichever unit holds their instance when the transition ends (or
// back to the same unit when it fails and rolls back).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "cluster/coordinator.h"
#include "cluster/router.h"
#include "cluster/transition_plan.h"
#include "cluster/transition_snapshot.h"
#include "common/clock.h"
#include "engine/engine.h"
#include "kv/block_allocator.h"
#include "model/weight_source.h"
#include "runtime/device_fleet.h"
#include "runtime/pipeline_executor.h"
#include "runtime/transport.h"
#include "runtime/virtual_device.h"

namespace kun::runtime {

// Test hook: called at a transition's commit point (kind "drop", "grow", "shrink" or "split", after its plan is
// computed and before any request or page moves). A non-OK status makes the transition fail there
// as a real failure would (no room, a transfer error): it rolls back, is reported as a
// "<kind>_failed" event and counted in transition_failures(), and the process goes on.
using TransitionFaultFn = std::function<Status(const std::string& kind, std::int64_t group)>;

struct ClusterOptions {
  std::int64_t num_instances = 4;
  DeviceOptions device;                 // per device (capacity, threads, block size, dtype)
  engine::SchedulerConfig scheduler;    // per instance; vocab/eos/max_model_len come from the model
  std::int64_t host_swap_blocks = 0;    // per device, layer blocks
  std::string model_name = "kunserve-model";
  LinkModel link;                       // device <-> device; off by default
  LinkModel host_link;                  // device <-> host swap space; off by default
  cluster::CoordinatorConfig coordinator;
  cluster::RouterConfig router;
  std::vector<std::int64_t> allowed_degrees = {2, 4};  // group sizes the planner may form
  bool run_policy_thread = true;        // false: transitions only when called (tests)
  // Stale requests on drop (cluster/policy_types.h): recompute, remote attention, or remote
  // attention while their KV moves layer by layer (live exchange, at most
  // exchange_requests_per_round requests each round). Restore gathers KV back unless recompute.
  cluster::StaleKvStrategy stale_kv = cluster::StaleKvStrategy::kExchange;
  std::int64_t exchange_requests_per_round = 8;
  // A restore's live gather phase lasts at most this long; what is not home by then is gathered
  // stop-and-copy at the split.
  std::int64_t restore_gather_timeout_us = 2'000'000;
  // How long the front end waits for an agent's answer to a transition's op (a drop_layer, a KV
  // move, a weight pull) before it counts as failed. A pull not answered in time is cancelled on
  // the puller (AgentClient::pull_layer), so its weights never land in pages given back meanwhile.
  std::int64_t agent_reply_timeout_ms = 10'000;
  TransitionFaultFn transition_fault;  // tests only; empty in production
  // Tests only: a transfer error injected at the device agents (FleetOptions::agent_fault: called
  // per agent op with its device index and layer). In-process fleets only; empty in production.
  std::function<Status(AgentOp op, int device, std::int64_t layer)> agent_fault;
  // Builds the devices (empty: InProcessFleet::create). The MPI runtime passes one that has the
  // device ranks build theirs (runtime/mpi/mpi_fleet.h, MpiFleetFactory).
  std::function<StatusOr<std::unique_ptr<DeviceFleet>>(const FleetOptions&, const model::WeightSource&)> make_fleet;
  // Keep a StepRecord of every engine step (ClusterRuntime::step_records; `kunserve bench
  // --out-dir` writes them): the simulator's validation compares its cost model with them.
  bool record_steps = false;
};

// One engine step (one micro-batch of a fused group), as the engine thread saw it complete.
struct StepRecord {
  std::int64_t end_us = 0;        // runtime clock
  std::int64_t duration_us = 0;   // the executor's, from submit to result (every stage of a group)
  std::int32_t unit_devices = 1;  // devices of the unit that ran it (g of a fused group)
  std::int64_t first_instance = -1;
  std::int32_t sequences = 0;
  std::int64_t new_tokens = 0;
  std::int32_t sampled = 0;
  std::int64_t attended_pairs = 0;  // (query, key) pairs, causal: n x context + n (n + 1) / 2 per sequence
  std::int32_t swap_blocks = 0;     // swap-in and swap-out layer blocks
};

// The fleet factory a ClusterRuntime uses when ClusterOptions::make_fleet is empty (unset: the
// in-process fleet). For test binaries that run the in-process scenarios over MPI device ranks
// (runtime/mpi/tests): set once, before the first runtime, on the thread that creates them.
void set_default_fleet_factory(
    std::function<StatusOr<std::unique_ptr<DeviceFleet>>(const FleetOptions&, const model::WeightSource&)> factory);

struct ClusterEvent {
  std::int64_t time_us = 0;
  std::string kind;  // drop | grow | shrink | restore | migrate
  std::int64_t group = -1;
  std::vector<std::int64_t> instances;
  std::int64_t bytes = 0;        // dropped param bytes (drop), weights pulled (restore), KV moved (migrate)
  double latency_ms = 0;         // drop: until the group's first step; restore: the split's pause
  double gather_ms = 0;          // restore, shrink: the live gather phase, while the group kept decoding
  double begin_pause_ms = 0;     // restore, shrink: the group's pause at the start of the gather phase
  double quiesce_ms = 0;         // drop: until its sources' steps in flight had ended (part of latency_ms)
  std::int64_t layers_dropped = 0;  // drop: drop_layer calls that freed a layer (over all members)
  std::int64_t requests_moved = 0;
  std::int64_t kv_blocks_exchanged = 0;  // drop: stale KV spread out; restore: gathered stop-and-copy
  std::int64_t kv_blocks_gathered_live = 0;  // restore, shrink: gathered while decoding, before the switch
  std::int64_t requests_recomputed = 0;  // running requests that lost their KV in the transition
  std::int64_t blocks_repacked = 0;      // restore: live blocks moved inside a device to free pages
  std::vector<RequestId> stale_requests; // drop: the requests running at it (stale requests)
  std::string reason;
};

class ClusterRuntime final : public engine::FrontDoor {
 public:
  static StatusOr<std::unique_ptr<ClusterRuntime>> create(const ClusterOptions& options,
                                                          const model::WeightSource& weights, const Clock* clock);
  // Over devices someone else started (MpiFleet: device ranks): `fleet` has num_instances devices,
  // each holding every layer of `config`. The fleet's options (device, links, host swap) are its own.
  static StatusOr<std::unique_ptr<ClusterRuntime>> create_with_fleet(const ClusterOptions& options,
                                                                     const model::ModelConfig& config,
                                                                     std::unique_ptr<DeviceFleet> fleet, const Clock* clock);
  ~ClusterRuntime() override;

  void start();
  void stop();

  // FrontDoor
  const engine::ModelInfo& model_info() const override { return model_info_; }
  StatusOr<RequestId> submit(engine::RequestSpec spec, engine::TokenCallback on_event) override;
  void cancel(RequestId id) override;
  engine::ServingStats stats() const override;

  // Transitions; the policy thread calls them, and tests call them directly.
  StatusOr<std::int64_t> drop(const std::vector<std::int64_t>& instances);  // returns the group id
  // Restores a group: starts the gather phase unless it is running, then splits at once
  // (stop-and-copy for what is not home yet).
  Status restore(std::int64_t group);
  // Starts the gather phase only; the policy thread (or restore()) splits the group later.
  Status begin_restore(std::int64_t group);
  // Whether a restoring group is ready to split (or a shrinking group to switch to its halves)
  // without moving anything: its running requests' KV is all home and its members' weights are back.
  bool ready_to_split(std::int64_t group) const;
  Status migrate(RequestId request, std::int64_t to_instance);
  // Growth (runtime/cluster_regroup.cc): fused group `group` of degree g becomes one of degree 2g
  // with `partners`, g independent instances or every member of another fused group of degree g
  // in its stage order; old stage j goes to stage 2j and partner j to 2j + 1, so each member
  // keeps a part of the layers it holds (cluster::plan_drop over the members' held layers).
  // Returns the new group's id.
  StatusOr<std::int64_t> grow(std::int64_t group, const std::vector<std::int64_t>& partners);
  // Partial restore: fused group `group` of even degree >= 4 becomes two groups of degree g / 2,
  // its even and its odd stages (cluster::plan_shrink). Starts the live phase unless it is running
  // (begin_shrink), waits for the weights, then switches at once (stop-and-copy for the KV not on
  // its half yet). Returns the two ids.
  StatusOr<std::vector<std::int64_t>> shrink(std::int64_t group);
  // The live phase only: each member reclaims the pages of the layers its new stage adds and a
  // background thread pulls them from their holders while the group keeps decoding; each running
  // request's KV is gathered onto the half it continues on between steps. The policy thread (or
  // shrink()) switches once ready_to_split(group). Returns the ids the two halves will get.
  StatusOr<std::vector<std::int64_t>> begin_shrink(std::int64_t group);

  // Runs one step on every unit that has work (for tests without threads); false if all idle.
  bool run_step_all();
  // One round of the policy loop now: a coordinator tick on the units' snapshots, its actions
  // carried out, gathered restores split (tests without the policy thread, with run_step_all).
  void run_policy_round();
  // Pages balance on every device, every block is owned once, every group holds each layer
  // exactly once, and no request is in two places. Aborts with context otherwise. Pauses units.
  void check_integrity();
  // The newest options.coordinator.event_history transitions, oldest first (bounded: a long
  // run's history does not grow); events_total() counts every one recorded.
  std::vector<ClusterEvent> events() const;
  // Every step completed so far (options.record_steps; empty otherwise), in completion order.
  std::vector<StepRecord> step_records() const;
  std::uint64_t events_total() const;
  // The newest options.coordinator.event_history transition plans carried out (drop, restore,
  // split), in order.
  std::vector<cluster::TransitionRecord> transition_log() const;
  TransferStats transfer_stats() const { return fleet_->transfer_stats(); }
  // The device agents' counters (remote attention done for other stages, stages run, blocks).
  StatusOr<AgentCounters> device_counters(std::int64_t instance) const { return fleet_->counters(static_cast<int>(instance)); }
  std::int64_t num_units() const;
  // Transitions, or steps of one, that failed, by kind: drop | grow | shrink | restore | split
  // (rolled back); drop_layer (a member kept a layer, the drop or growth completed without
  // dropping it); weight_pull (every holder refused, retried at the split); kv_move (a stale
  // request's KV move at a split or shrink failed: it recomputes); exchange (a live exchange move
  // failed: the layer stays, served by remote attention); repack (begin_restore's repack copy
  // failed: those layers wait for the split); migrate (the request stays where it was). The
  // counter behind kunserve_transition_failures_total{kind}.
  std::map<std::string, std::int64_t> transition_failures() const;
  // The admission history (recent prompt lengths) of the scheduler serving `instance` (tests: it is
  // carried across drops and splits).
  std::vector<std::int64_t> admission_history(std::int64_t instance) const;
  std::int64_t group_of(std::int64_t instance) const;
  cluster::Policy policy() const { return options_.coordinator.policy; }

 private:
  // A request that reached a unit while its gate was closed (the unit is under transition).
  struct PendingSubmit {
    RequestId id;
    engine::RequestSpec spec;
    engine::TokenCallback callback;
  };
  // A unit's admission gate. Open: submits and cancels go straight to the engine's inbox. Closed
  // (a transition owns the unit): they queue here in arrival order. Retired (the unit is gone):
  // callers reload the routing snapshot and retry. `mu` is held only for these few steps.
  struct Gate {
    std::mutex mu;
    bool closed = false;
    bool retired = false;
    std::vector<PendingSubmit> submits;  // guarded by mu
    std::vector<RequestId> cancels;      // guarded by mu; after the submits they may refer to
  };
  struct Unit {
    Gate gate;
    // A transition owns the unit (reserved under transition_mu_, which guards this flag): the
    // transition works on it with transition_mu_ released; everyone else waits on transition_cv_
    // or, the policy loop, skips it.
    bool in_transition = false;
    std::vector<std::int64_t> instances;  // stage order
    std::int64_t group = -1;
    std::unique_ptr<engine::KvManager> kv;
    std::unique_ptr<PipelineExecutor> executor;
    std::unique_ptr<engine::Engine> engine;
    std::atomic<std::int64_t> first_step_us{-1};
    // Restore's gather phase. `restoring` and `split_room` are set by begin_restore_locked while
    // the engine is paused; the engine thread's exchange rounds read them and set `gathered`.
    std::atomic<bool> restoring{false};
    std::atomic<bool> gathered{false};  // the live gather (a restore's or a shrink's) is done
    // A live shrink (cluster_regroup.cc), set by begin_shrink_locked while the engine is paused:
    // the weights come back on `weight_pull` and the exchange rounds gather each homed request
    // onto its half (KvManager home layouts) while the group decodes; the switch publishes the
    // halves. The gather-phase fields below (restore_began, weight_pull, weights_back,
    // failed_pulls, live_gathered_blocks, ...) serve a restore and a shrink alike.
    std::atomic<bool> shrinking{false};
    cluster::ShrinkAction shrink_action;
    double begin_pause_ms = 0;  // the pause of begin_restore / begin_shrink
    // Restoring (gather phase or gathered), as the coordinator sees it; a shrinking group is not.
    bool in_restore() const { return !shrinking.load() && (restoring.load() || gathered.load()); }
    std::vector<std::int64_t> split_room;  // layer blocks each member keeps after the split
    cluster::RestorePlan restore_plan;     // from begin_restore_locked
    std::atomic<std::int64_t> live_gathered_blocks{0};
    std::chrono::steady_clock::time_point restore_began;
    std::string restore_reason;
    // The dropped layers' weights, pulled back by `weight_pull` while the group decodes.
    std::thread weight_pull;
    std::atomic<bool> weights_back{false};
    std::int64_t restore_repacked_blocks = 0;  // at begin_restore
    std::int64_t restore_pulled_bytes = 0;     // by weight_pull
    // Pulls weight_pull could not complete from any holder (written before weights_back is set):
    // their pages go back to the KV pool at the split, which pulls those layers again.
    struct FailedPull {
      std::int64_t instance, layer;
      std::vector<memory::PageId> pages;
      bool pages_may_be_written = false;  // the pull was never answered: reserved, never pooled
    };
    std::vector<FailedPull> failed_pulls;
    // (instance, layer) a member still holds although the drop's plan dropped it (its drop_layer
    // failed): the group holds that layer twice, and the restore does not pull it.
    std::vector<std::pair<std::int64_t, std::int64_t>> kept_layers;
    ~Unit() {
      if (weight_pull.joinable()) weight_pull.join();
    }
  };
  // An immutable routing snapshot: every instance's unit. Published whole by publish_routing();
  // readers keep the units alive while they use them.
  struct Routing {
    std::vector<std::shared_ptr<Unit>> units;
    std::vector<Unit*> unit_of_instance;  // by instance
  };
  ClusterRuntime(ClusterOptions options, const Clock* clock);
  std::shared_ptr<const Routing> routing() const;
  std::shared_ptr<const Routing> build_routing_locked() const;
  void publish_routing(std::shared_ptr<const Routing> routing);
  // Gate operations: admit_* returns false when the gate is retired (reload routing and retry).
  bool admit_submit(Unit& unit, PendingSubmit& p, Status* status);
  bool admit_cancel(Unit& unit, RequestId id);
  void close_gate(Unit& unit);
  // Opens the gate again (a failed transition, a migration): what queued goes to the unit that now
  // holds each request's instance under `routing`.
  void reopen_gate(Unit& unit, const Routing& routing);
  // The unit is gone: what queued is handed over under `next` (not yet published), then callers
  // retry on the new snapshot.
  void retire_gate(Unit& unit, const Routing& next);
  void deliver_pending_locked(Unit& unit, const Routing& routing);
  std::int64_t instance_of(RequestId id) const;
  void record_failure(const std::string& kind, std::int64_t group, const std::vector<std::int64_t>& instances,
                      const Status& status, const std::string& outcome = "rolled back");
  // Transitions reserve their units under transition_mu_ and carry out their messages, copies and
  // transfers with it released (TransitionLock unlocked), re-taking it to publish or roll back.
  using TransitionLock = std::unique_lock<std::mutex>;
  bool any_in_transition_locked() const;
  // Waits (transition_cv_) until no unit is in transition, then reserves every unit.
  std::vector<std::shared_ptr<Unit>> reserve_all_locked(TransitionLock& lock);
  void release_locked(const std::vector<std::shared_ptr<Unit>>& units) const;
  // Waits until the units holding `instances` (or the group) are not in transition.
  void wait_instances_free_locked(TransitionLock& lock, const std::vector<std::int64_t>& instances) const;
  void wait_group_free_locked(TransitionLock& lock, std::int64_t group) const;
  std::shared_ptr<Unit> group_unit_locked(std::int64_t group) const;
  // Device `instance` pulls `layer` into `pages` from `preferred`, else from any other device the
  // mirror says holds it (`*source`: the one that sent it); the last error when none could. When
  // `instance` answered neither a pull nor its cancel (AgentClient::pull_layer), it stops there
  // and sets *pages_may_be_written: those pages stay reserved for this layer (a late landing then
  // writes the same weights into them) and never go back to the KV pool.
  Status pull_layer_from_any(std::int64_t instance, std::int64_t layer, std::int64_t preferred,
                             std::span<const std::int64_t> pages, std::int64_t* source,
                             bool* pages_may_be_written = nullptr);
  // A unit's engine starts only in launch(), after the requests it inherits are adopted (adopting
  // is engine-thread work that must not race the engine's own thread).
  std::shared_ptr<Unit> make_unit(const std::vector<std::int64_t>& instances, std::int64_t group);
  void launch(Unit& unit);
  // An independent instance's scheduler limits (before fused_scheduler_config).
  engine::SchedulerConfig instance_scheduler_config() const;
  void exchange_round(Unit& unit, const std::function<bool(RequestId)>& in_flight);
  Status begin_restore_locked(TransitionLock& lock, std::int64_t group, const std::string& reason);
  // A gather phase's weight pull: device `to` pulls `layer` from `from` (or any other holder) into
  // `pages`, KV pages it took back from its pool.
  struct LayerPull {
    std::int64_t from, to, layer;
    std::vector<std::int64_t> pages;
  };
  // The start of a gather phase (restore or shrink; the group paused, transition_mu_ released):
  // for each planned pull (member indices of `unit`) of a layer the member does not hold, the
  // member takes the layer's pages back from its KV pool (reclaim_layer_pages, remapping the
  // group's tables). A member whose pool cannot spare the next layer, or whose repack copy fails
  // (a `repack` failure), leaves it and its later layers to the switch.
  std::vector<LayerPull> reclaim_pages_for_pulls(Unit& unit, const std::vector<cluster::WeightPull>& pulls);
  // Starts `unit.weight_pull` (transition_mu_ held: check_integrity reads it), which carries out
  // `pulls` while the group decodes, recording a pull no holder could serve as a `weight_pull`
  // failure retried at `switch_kind` (its pages in unit.failed_pulls); sets weights_back when done
  // (at once when there is nothing to pull).
  void start_weight_pull_locked(Unit& unit, std::vector<LayerPull> pulls, const std::string& switch_kind);
  // At a switch (split or shrink, the group paused): the pages of gather-phase pulls that failed
  // go back to the KV pool, except those of pulls never answered (a late landing may write them),
  // which are returned by (instance, layer) to be pulled into again. unit.failed_pulls is emptied.
  std::map<std::pair<std::int64_t, std::int64_t>, std::vector<memory::PageId>> take_failed_pulls(Unit& unit);
  // At a switch: each planned pull (member indices of `instances`) of a layer its member does not
  // hold yet (its gather-phase pull failed or was left to the switch) is carried out now, into the
  // reserved pages of an unanswered pull (unless it landed meanwhile) or pages reclaimed from the
  // pool (`remap(member, moves)` rewrites the tables holding repacked blocks). Stops at the first
  // failure and returns it; a pull never answered keeps its pages in `*unanswered`.
  Status pull_missing_layers(const std::vector<std::int64_t>& instances, const std::vector<cluster::WeightPull>& pulls,
                             const std::function<std::int64_t(std::int32_t, std::span<const kv::BlockMove>)>& remap,
                             std::map<std::pair<std::int64_t, std::int64_t>, std::vector<memory::PageId>>& reserved_pages,
                             std::vector<Unit::FailedPull>* unanswered, std::int64_t* repacked, std::int64_t* pulled_bytes);
  cluster::TransitionGeometry transition_geometry() const;
  void record_plan(const std::string& kind, std::int64_t group, std::string plan);
  // Device `instance`'s transport endpoint, and a client on the front end's endpoint.
  int endpoint(std::int64_t instance) const { return fleet_->endpoint_of(static_cast<int>(instance)); }
  AgentClient client() const { return AgentClient(fleet_->front_end(), std::chrono::milliseconds(options_.agent_reply_timeout_ms)); }
  // Device `src` sends layer blocks `from` to device `dst`, which writes them as `to` (one
  // message); adds the bytes moved to `*bytes`. A transfer error is returned (nothing is freed).
  Status move_kv(std::int64_t src, std::span<const kv::BlockId> from, std::int64_t dst, std::span<const kv::BlockId> to,
                 TransferKind kind, std::int64_t* bytes = nullptr) const;
  bool mirror_has_layer(std::int64_t instance, std::int64_t layer) const;
  std::int64_t dropped_param_bytes(std::int64_t instance) const;
  void mirror_set_layer(std::int64_t instance, std::int64_t layer, bool resident);
  // Takes one layer's worth of pages back from device `inst`'s KV pool, repacking live blocks
  // inside the device first (a kMoveBlocks message); `remap` rewrites the block tables holding them and returns how
  // many entries it changed. kResourceExhausted (nothing changes) when the pool cannot spare them;
  // a failed repack copy cancels that round (the tables keep the old blocks) and returns the error.
  StatusOr<std::vector<memory::PageId>> reclaim_layer_pages(std::int64_t inst,
                                                            const std::function<std::int64_t(std::span<const kv::BlockMove>)>& remap,
                                                            std::int64_t* repacked);
  // Publishes `successors` (built, not launched) in place of `old_units` (reserved by the caller,
  // transition_mu_ held): launches them, retires the old gates handing what queued to them, swaps
  // the routing and releases the reservation; then joins the old engines with the lock released.
  // Returns with `lock` released.
  void publish_successors_locked(TransitionLock& lock, std::vector<std::shared_ptr<Unit>> old_units,
                                 const std::vector<std::shared_ptr<Unit>>& successors);
  // Wakes the policy thread: a restore's gather or weight pull finished.
  void notify_restore_progress();
  // Splits restoring groups whose gather finished or timed out (policy thread).
  void finish_gathered_restores(TransitionLock& lock);
  Unit* unit_of_instance(std::int64_t instance) const;
  std::vector<cluster::InstanceSnapshot> snapshots_of(const std::vector<std::shared_ptr<Unit>>& units) const;
  void policy_loop();
  void run_actions(TransitionLock& lock, const cluster::Actions& actions);
  // A drop failed and rolled back: the coordinator's group for it dissolves.
  void abandon_drop_locked(std::int64_t group);
  // Each takes transition_mu_ held (the caller made sure its units are not in transition),
  // releases it while it works, and returns with it held.
  // A drop, or a growth (action.absorbs set: fused groups whose members keep a part of their
  // stage; runtime/cluster_regroup.cc describes it): one code path, cluster::plan_drop over the
  // layers each member holds now. Returns the new group's id.
  StatusOr<std::int64_t> drop_locked(TransitionLock& lock, const cluster::DropAction& action);
  Status restore_locked(TransitionLock& lock, std::int64_t group);  // the split; begin_restore_locked came first
  Status migrate_locked(TransitionLock& lock, RequestId request, std::int64_t to_instance, const std::string& reason);
  // ---- regroup (runtime/cluster_regroup.cc) ----
  // A ShrinkAction (cluster::plan_shrink) in two phases. begin_shrink_locked: the live phase
  // (pages reclaimed, homes set, weight pull started; the group resumes); a failure at its commit
  // point leaves the group whole. shrink_switch_locked: at a step boundary, what is still away
  // from its half is copied, pulls that failed are retried, and the halves are published; a
  // weight pull no holder can serve (or a refused repack, a member not answering) rolls back to
  // the whole group, a KV move that fails makes its request recompute.
  Status begin_shrink_locked(TransitionLock& lock, const cluster::ShrinkAction& action);
  Status shrink_switch_locked(TransitionLock& lock, std::int64_t group);
  // The plan input of a group about to shrink (paused), its members' pools counting `reserved`
  // pages (of unanswered pulls) as KV.
  cluster::ShrinkInput shrink_input(Unit& unit,
                                    const std::map<std::pair<std::int64_t, std::int64_t>, std::vector<memory::PageId>>& reserved) const;
  // A shrink that did not happen: no request keeps a home, the layouts go, the group is whole.
  void end_shrink_phase(Unit& unit);
  // Carry a growth or a shrink's phase out and tell the coordinator how it went. Failures are
  // recorded (event, metric) and returned, and the coordinator gets the groups back as they were.
  // The units must not be in transition.
  Status run_growth_locked(TransitionLock& lock, const cluster::DropAction& action);
  Status run_shrink_locked(TransitionLock& lock, const cluster::ShrinkAction& action);  // the live phase
  Status finish_shrink_locked(TransitionLock& lock, std::int64_t group);              // the switch
  // (instance, layer) pairs a member of `instances` (stage order) holds outside its stage, by the
  // mirror: layers a failed drop_layer or a rolled-back shrink left in place (Unit::kept_layers).
  std::vector<std::pair<std::int64_t, std::int64_t>> layers_outside_stages(const std::vector<std::int64_t>& instances) const;
  // The absorbed groups `ids` as they are now (their members), for Coordinator::abandon_growth.
  std::vector<cluster::Coordinator::AbsorbedGroup> absorbed_groups_locked(const std::vector<std::int64_t>& ids) const;
  // Moves one layer of a request's KV between members of `instances` (tables keyed by member
  // index): allocates it on `to`, copies, frees the source, adds the blocks moved to `*blocks`.
  // A transfer error is returned with the source still holding the layer.
  Status move_request_layer(const std::vector<std::int64_t>& instances, std::map<std::int32_t, kv::BlockTable>& tables,
                            const cluster::LayerMove& move, std::int64_t* blocks);
  // The members' admission histories interleaved, aligned at their newest entries.
  static std::vector<std::int64_t> merged_admission_history(const std::vector<std::vector<std::int64_t>>& histories);
  void retire(const std::shared_ptr<Unit>& unit);
  void record(ClusterEvent ev);
  // A completed transition's event: its time, kind, units, bytes moved, wall latency since
  // `began` and the requests it moved. The caller adds its own fields and records it.
  ClusterEvent transition_event(const std::string& kind, std::int64_t group, std::vector<std::int64_t> instances,
                                std::chrono::steady_clock::time_point began, std::int64_t bytes, std::int64_t moved) const;
  // The event of a group that splits (restore) or shrinks: what both fill the same way, with the
  // KV blocks they gathered added to kv_blocks_moved_. The caller adds its own fields and records it.
  ClusterEvent split_event(const std::string& kind, std::int64_t group, const std::vector<std::int64_t>& instances,
                           std::chrono::steady_clock::time_point began, std::int64_t pulled_bytes, std::int64_t moved,
                           std::int64_t exchanged_blocks, std::int64_t recomputed, std::int64_t repacked_blocks);
  engine::TokenCallback wrap_callback(engine::TokenCallback cb);

  ClusterOptions options_;
  const Clock* clock_;
  engine::ModelInfo model_info_;
  engine::SchedulerConfig admission_config_;  // an independent instance's, for validating submits
  model::ModelConfig config_;
  // The devices, behind their agents: this front end only sends them messages. Their KV blocks'
  // bookkeeping (allocators_) and a mirror of what each holds are kept here, updated from replies.
  std::unique_ptr<DeviceFleet> fleet_;
  std::vector<std::unique_ptr<kv::KvBlockAllocator>> allocators_;
  mutable std::mutex mirror_mu_;
  std::vector<std::vector<char>> resident_;  // guarded by mirror_mu_: [instance][layer] held on the device

  // Guards units_ (and each Unit::in_transition), coordinator_, started_. Held only for short
  // bookkeeping: never while waiting for an agent, a transfer, a step or a join. A transition
  // reserves its units under it and works with it released; transition_cv_ wakes whoever waits
  // for a unit to be released. submit, cancel and stats never take it.
  mutable std::mutex transition_mu_;
  mutable std::condition_variable transition_cv_;
  std::vector<std::shared_ptr<Unit>> units_;
  std::unique_ptr<cluster::Coordinator> coordinator_;
  bool started_ = false;
  mutable std::mutex routing_mu_;  // guards the pointer routing_ only (a pointer copy or swap)
  std::shared_ptr<const Routing> routing_;
  mutable std::mutex router_mu_;  // guards router_ (its round-robin state)
  mutable cluster::Router router_;

  mutable std::mutex requests_mu_;  // guards request_instance_, next_id_
  std::map<RequestId, std::int64_t> request_instance_;  // live request -> an instance of its unit
  std::int64_t next_id_ = 1;

  mutable std::mutex events_mu_;
  mutable std::mutex steps_mu_;
  std::vector<StepRecord> step_records_;  // guarded by steps_mu_ (options_.record_steps)
  BoundedRing<ClusterEvent> events_;                       // guarded by events_mu_
  BoundedRing<cluster::TransitionRecord> transition_log_;  // guarded by events_mu_
  std::int64_t drops_ = 0, restores_ = 0, kv_blocks_moved_ = 0;  // guarded by events_mu_
  std::int64_t grows_ = 0, shrinks_ = 0;                          // guarded by events_mu_
  std::vector<double> drop_latency_ms_, restore_latency_ms_;      // guarded by events_mu_
  std::vector<double> drop_quiesce_ms_;                            // guarded by events_mu_
  std::vector<std::int64_t> drop_layers_;                          // guarded by events_mu_
  std::map<std::string, std::int64_t> transition_failures_;        // guarded by events_mu_
  PipelineExecutor::StageTime retired_pipeline_time_;             // guarded by events_mu_
  engine::ServingStats retired_counters_;  // guarded by events_mu_: counters of retired units

  std::mutex policy_mu_;
  std::condition_variable policy_cv_;
  bool stopping_ = false;  // guarded by policy_mu_
  bool restore_progress_ = false;  // guarded by policy_mu_: a gather or weight pull finished
  std::thread policy_thread_;
};

}  // namespace kun::runtime
