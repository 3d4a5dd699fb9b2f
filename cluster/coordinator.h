// Coordinator: the cluster policy front (DESIGN.md 3.2-3.3, 3.6-3.7). Pure: no threads, no wall
// time, no I/O; the runtime (or simulator) calls tick() with snapshots and carries out the
// returned Actions, then reports completions through on_* calls.
//
// Group lifecycle (one record per group id; ids are assigned 0, 1, 2, ... and never reused):
//   created by a DropAction          state kInitial, drop pending
//   on_drop_done                     kInitial  -> kDropped
//   RestoreAction emitted            kDropped, restore pending
//   on_restore_started               kDropped  -> kRestoring   (requires a pending restore)
//   on_restore_done                  kRestoring -> kInitial, the group dissolves and its members
//                                    are independent again
//   growth (DropAction.absorbs)      a kDropped group (and a group it merges with) is replaced by a
//                                    new group of twice the degree, which starts as above
//   ShrinkAction emitted             kDropped (degree g >= 4), shrink pending (partial restore)
//   on_shrink_done                   the group is replaced by two kDropped groups of degree g / 2
//                                    (its even and its odd stages) with the ids the action named
// Any other transition is a bug in the caller and aborts (KUN_CHECK). A group is *in transition*
// from its DropAction to on_drop_done and from its RestoreAction to on_restore_done.
//
// Invariants: an instance belongs to at most one live group; no new drop is planned while any
// group is in transition (the plan would use members whose layout is changing); the coordinator's
// own membership is authoritative (snapshot.group/state may lag and are not trusted).
//
// Policies: kKunServe runs monitor + planner (+ restores); kMigrate runs MigrationPolicy; kRecompute
// and kSwap emit nothing (preemption is the engine's business).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "cluster/demand_monitor.h"
#include "cluster/migration.h"
#include "cluster/planner.h"
#include "cluster/policy_types.h"
#include "common/bounded_ring.h"
#include "common/status.h"

namespace kun::cluster {

struct CoordinatorConfig {
  Policy policy = Policy::kKunServe;
  DemandMonitorConfig monitor;
  PlannerConfig planner;
  MigrationConfig migration;
  bool enable_restore = true;  // artifact's enable_restore
  // Transition events kept (newest last); older ones are dropped so a long run's history stays
  // bounded. Must be >= 1.
  std::size_t event_history = 4096;
};

bool is_legal_transition(GroupState from, GroupState to);

enum class EventKind { kDropRequested, kDropDone, kRestoreRequested, kRestoreStarted, kRestoreDone, kShrinkRequested, kShrinkDone };
const char* event_kind_name(EventKind k);

struct Event {
  std::int64_t time_us = 0;
  std::int64_t group = -1;
  EventKind kind = EventKind::kDropRequested;
  GroupState from = GroupState::kInitial;
  GroupState to = GroupState::kInitial;
  std::vector<std::int64_t> members;
  std::int64_t latency_us = -1;  // kDropDone: since the drop request; kRestoreDone: since the restore request
  bool forced = false;
  std::string detail;
  std::string to_string() const;
};

struct GroupInfo {
  std::int64_t id = -1;
  std::vector<std::int64_t> members;  // stage order
  GroupState state = GroupState::kInitial;
  bool drop_pending = false;
  bool restore_pending = false;  // from the RestoreAction until on_restore_done
  bool shrink_pending = false;   // from the ShrinkAction until on_shrink_done
  std::vector<std::int64_t> shrink_into;  // the ids its halves get
  std::int64_t drop_requested_us = 0;
  std::int64_t dropped_us = 0;
  std::int64_t restore_requested_us = 0;
  bool in_transition() const { return drop_pending || restore_pending || shrink_pending; }
};

class Coordinator {
 public:
  Coordinator(CoordinatorConfig config, ClusterShape shape);

  const CoordinatorConfig& config() const { return config_; }
  const ClusterShape& shape() const { return shape_; }

  // One policy round. Snapshots may list instances in any order; each instance at most once.
  Actions tick(std::int64_t now_us, const std::vector<InstanceSnapshot>& snapshots);

  void on_drop_done(std::int64_t group, std::int64_t now_us);
  void on_restore_started(std::int64_t group, std::int64_t now_us);
  void on_restore_done(std::int64_t group, std::int64_t now_us);
  // A ShrinkAction was carried out: the group is replaced by its two halves, each a kDropped group
  // with the id the action named.
  void on_shrink_done(std::int64_t group, std::int64_t now_us);
  void on_migration_done(RequestId request) { migration_.on_done(request); }

  // Forced transitions (tests, scripted runs). force_drop validates like tick does: each instance
  // independent, distinct, and the count one of shape.allowed_degrees; failures are Status.
  StatusOr<DropAction> force_drop(const std::vector<std::int64_t>& instances, std::int64_t now_us);
  // Requires the group to be kDropped and not in transition.
  StatusOr<RestoreAction> force_restore(std::int64_t group, std::int64_t now_us);
  // Forced growth: kDropped group `group` of degree g (not in transition) grows to 2g (an allowed
  // degree) with `partners`, either g independent instances or every member of another kDropped
  // group of degree g in its stage order (a merge). The new stage order interleaves (old stage j
  // at 2j, partner j at 2j + 1), as Planner::plan_growth's; the groups absorbed end here and the
  // returned DropAction (absorbs set) creates the new one.
  StatusOr<DropAction> force_grow(std::int64_t group, const std::vector<std::int64_t>& partners, std::int64_t now_us);
  // Forced partial restore: kDropped group `group` of even degree >= 4 (not in transition) splits
  // into its even and its odd stages.
  StatusOr<ShrinkAction> force_shrink(std::int64_t group, std::int64_t now_us);
  // A growth the executor could not carry out (it failed before anything moved): the new group's
  // record ends and the groups it absorbed come back as they were (kDropped, same ids and members).
  struct AbsorbedGroup {
    std::int64_t id = -1;
    std::vector<std::int64_t> members;  // stage order
  };
  void abandon_growth(std::int64_t group, const std::vector<AbsorbedGroup>& absorbed, std::int64_t now_us);
  // A shrink the executor could not carry out: the group stays as it was (kDropped, no shrink pending).
  void abandon_shrink(std::int64_t group, std::int64_t now_us);

  // Queries.
  std::int64_t group_of(std::int64_t instance) const;  // -1 when independent
  const GroupInfo* group(std::int64_t id) const;
  const std::map<std::int64_t, GroupInfo>& groups() const { return groups_; }  // live groups
  bool any_in_transition() const;
  // The newest config.event_history events, oldest first; events().dropped() were discarded.
  const BoundedRing<Event>& events() const { return events_; }
  const DemandMonitor& monitor() const { return monitor_; }
  const MigrationPolicy& migration() const { return migration_; }

 private:
  GroupInfo& live_group(std::int64_t id);
  // Registers a fused group of `members` as dropped at now_us (a shrink's half, a growth's
  // abandoned absorbee): its members point at it and its monitor starts fresh.
  void add_dropped_group(std::int64_t id, const std::vector<std::int64_t>& members, std::int64_t now_us);
  void transition(GroupInfo& g, GroupState to);
  DropAction create_group(std::vector<std::int64_t> members, std::int64_t now_us, std::string reason, bool forced);
  // A kDropped group a growing group replaces: its record ends here (its members join the new one).
  void dissolve_absorbed(std::int64_t group_id, std::int64_t now_us);
  RestoreAction request_restore(GroupInfo& g, std::int64_t now_us, std::string reason, bool forced);
  ShrinkAction request_shrink(GroupInfo& g, const PlannedShrink& plan, std::int64_t now_us, std::string reason);
  void record(std::int64_t now_us, const GroupInfo& g, EventKind kind, GroupState from, GroupState to,
              std::int64_t latency_us, bool forced, std::string detail);
  Actions tick_kunserve(std::int64_t now_us, const std::vector<InstanceSnapshot>& snapshots);

  CoordinatorConfig config_;
  ClusterShape shape_;
  DemandMonitor monitor_;
  Planner planner_;
  MigrationPolicy migration_;
  std::int64_t next_group_id_ = 0;
  bool replan_due_ = false;  // a transition finished: plan at the next tick even without a sample
  std::map<std::int64_t, GroupInfo> groups_;
  std::unordered_map<std::int64_t, std::int64_t> group_of_;  // instance -> live group
  BoundedRing<Event> events_;
};

}  // namespace kun::cluster
