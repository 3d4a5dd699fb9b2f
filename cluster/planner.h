// Planner: which independent instances fuse, and with which degree g (DESIGN.md 3.3). Pure.
//
// Memory arithmetic. Blocks in snapshots are layer blocks (block_size_tokens tokens x one layer).
// An independent instance holds every layer of a token, so its capacity is
//   floor(kv_blocks_total / L) token blocks.
// In a group of degree g, stage s keeps k_s = floor((s+1)L/g) - floor(sL/g) layers (L/g when g
// divides L), the pages of its other L - k_s layers become KV blocks:
//   extra_s = floor((L - k_s) x layer_param_bytes / layer_block_bytes) layer blocks,
// and a token costs only k_s layer blocks on that stage. A token of the group needs room on every
// stage, so the group's capacity is
//   min_s floor((kv_blocks_total_s + extra_s) / k_s) token blocks,
// which for identical members and g | L is g x (kv_bytes + (1-1/g) x L x layer_param_bytes) /
// (L x bytes per token-layer), i.e. the formula of DESIGN.md 3.3. It is compared with the members'
// combined demand, sum ceil(blocks_demanded / L) token blocks. Stale requests (whose KV still
// spans all L layers on their home device until exchanged) are not modelled: the exchange
// converts them to the fused layout.
//
// Demand is what the instances demand now plus, when the coordinator projects a trend
// (PlannerConfig::trend_horizon_samples > 0), the growth it expects over the horizon.
//
// Greedy, O(N log N): instances are sorted once by deficit (demand - target x capacity, tokens).
// Overloaded instances are served largest deficit first; each tries g in allowed_degrees
// ascending with the g-1 least-loaded still-unassigned instances as partners (their spare capacity
// also absorbs the deficit) and takes the first g whose group covers the combined demand
// (demand <= target_utilization x capacity). If none covers, it takes the largest g for which
// enough partners remain and says so. Instances not picked stay independent. Partners are taken
// from the front of a linked list over the sorted array (O(1) removal), so the loop after the sort
// is O(N x |degrees| x g).
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "cluster/policy_types.h"

namespace kun::cluster {

struct PlannerConfig {
  // A plan covers a group when its demand is at most this fraction of its capacity; 0.95 keeps
  // the fused group just under the drop threshold.
  double target_utilization = 0.95;
  // Largest group the planner forms or grows to (0: the shape's allowed degrees only). 2 is the
  // behaviour before groups could grow.
  std::int64_t max_degree = 0;
  // An overloaded fused group of degree g grows to 2g (when 2g is allowed) by taking g free
  // instances or merging with another group of degree g.
  bool grow_groups = true;
  // A dropped group of degree g >= 4 whose demand fits its two halves shrinks to two groups of
  // g / 2 (partial restore, step by step: 8 -> 4 -> 2 -> 1); false: groups restore whole.
  bool shrink_groups = true;
  // Demand trend (DemandMonitor windows): the coordinator projects each instance's (and each
  // dropped group's) demand this many samples ahead at its growth over the newest trend_samples
  // samples (recent_growth_per_sample; only growth counts), and the planner sizes a new group for
  // the projected demand instead of the demand now, so a burst that is still arriving gets a group
  // large enough at the drop rather than g = 2 first and growth only after the next vote. 0: off
  // (the artifact's sizing: the smallest group that covers the demand now).
  double trend_horizon_samples = 8.0;
  std::int64_t trend_samples = 4;
  // With a trend horizon: a dropped group whose projected demand exceeds target_utilization x its
  // fused capacity grows at once, without waiting for its load window's drop vote.
  bool grow_on_trend = true;
};

// A fused group as the growth planner sees it.
struct GroupView {
  std::int64_t id = -1;
  std::vector<const InstanceSnapshot*> members;  // stage order
  bool overloaded = false;                       // its monitor votes for more memory (or its trend)
  std::int64_t growth_tokens = 0;                // demand growth expected over the trend horizon
};

struct PlannedGrowth {
  std::int64_t group = -1;                 // the overloaded group
  std::vector<std::int64_t> absorbs;       // groups replaced by the new one (group first)
  std::vector<std::int64_t> instances;     // new stage order: old stage j at 2j, partners at 2j + 1
  std::int64_t degree = 0;
  std::int64_t demand_tokens = 0;
  std::int64_t growth_tokens = 0;           // projected growth of the absorbed groups (not in demand_tokens)
  std::int64_t capacity_before_tokens = 0;  // the groups' and instances' capacities now
  std::int64_t capacity_after_tokens = 0;
  bool covers = false;
  std::string reason;
};

struct PlannedShrink {
  std::int64_t group = -1;
  std::vector<std::vector<std::int64_t>> halves;  // even stages, odd stages (stage order)
  std::int64_t demand_tokens = 0;
  std::int64_t capacity_before_tokens = 0;  // the group's now
  std::int64_t capacity_after_tokens = 0;   // the two halves together
  bool covers = false;                      // demand <= target_utilization x capacity after
  std::string reason;
};

struct PlannedGroup {
  std::vector<std::int64_t> instances;  // members in pipeline stage order (ascending id)
  std::int64_t degree = 0;
  std::int64_t leader = -1;              // the overloaded instance it was formed for
  std::int64_t demand_tokens = 0;        // members' combined demand
  std::int64_t growth_tokens = 0;        // of which projected growth over the trend horizon (not yet demanded)
  std::int64_t capacity_before_tokens = 0;  // sum of members' independent capacities
  std::int64_t capacity_after_tokens = 0;   // the fused group's capacity
  bool covers = false;
  std::string reason;
};

struct Plan {
  std::vector<PlannedGroup> groups;
  std::vector<std::string> notes;  // overloaded instances left without a group, and why
};

// Layers stage `stage` of a degree-g group keeps.
std::int64_t layers_kept(std::int64_t stage, std::int64_t degree, std::int64_t num_layers);
std::int64_t independent_capacity_tokens(const InstanceSnapshot& s, const ClusterShape& shape);
std::int64_t demand_tokens(const InstanceSnapshot& s, const ClusterShape& shape);
// Capacity of the group formed by `members` in stage order (degree = members.size()).
std::int64_t fused_capacity_tokens(const std::vector<const InstanceSnapshot*>& members,
                                   const ClusterShape& shape);

class Planner {
 public:
  explicit Planner(PlannerConfig config = {});
  const PlannerConfig& config() const { return config_; }

  // `independent`: snapshots of every instance free to fuse. `overloaded`: the ids (subset of
  // independent) that need memory, e.g. those the monitor votes to drop. Ids not in
  // `independent` are reported in notes and skipped. `growth_tokens`: per instance id, the demand
  // growth (tokens) its trend projects over the horizon; a group covers when its members' demand
  // plus their growth fits (ids absent: no growth).
  Plan plan(const std::vector<InstanceSnapshot>& independent, const std::vector<std::int64_t>& overloaded,
            const ClusterShape& shape, const std::unordered_map<std::int64_t, std::int64_t>& growth_tokens = {}) const;

  // Growth, O(N log N): overloaded groups, largest deficit first, each grow from g to 2g (if
  // allowed) with the g least-loaded `free` instances, else by merging with the least-loaded
  // group of degree g that is not overloaded. Partners interleave (old stage j at 2j, partner
  // stage j at 2j + 1) so every member keeps a subset of the layers it holds now.
  std::vector<PlannedGrowth> plan_growth(const std::vector<GroupView>& groups, const std::vector<InstanceSnapshot>& free,
                                         const ClusterShape& shape) const;
  // Partial restore of a dropped group of even degree g >= 4: its even and its odd stages become
  // two groups of g / 2 (the inverse of growth's interleave); O(g).
  PlannedShrink plan_shrink(const GroupView& group, const ClusterShape& shape) const;
  // Capacity (tokens) of a fused group now, from its members' pools (lent pages included).
  static std::int64_t group_capacity_tokens(const std::vector<const InstanceSnapshot*>& members, const ClusterShape& shape);
  static std::int64_t group_demand_tokens(const std::vector<const InstanceSnapshot*>& members, const ClusterShape& shape);
  bool degree_allowed(std::int64_t g, const ClusterShape& shape) const;

 private:
  PlannerConfig config_;
};

}  // namespace kun::cluster
