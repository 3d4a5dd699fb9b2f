// What cluster policy sees and decides (DESIGN.md 3.2-3.3, 3.7). Pure data: the runtime and the
// simulator fill snapshots from their engines and carry out the actions; the policy code (monitor,
// planner, coordinator, router, migration) is the same for both.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/ids.h"
#include "common/status.h"

namespace kun::cluster {

enum class GroupState { kInitial, kDropped, kRestoring };
const char* group_state_name(GroupState s);

enum class Policy { kRecompute, kSwap, kMigrate, kKunServe };
const char* policy_name(Policy p);
bool parse_policy(const std::string& s, Policy* out);

// What happens to a request already running on an instance when its instance joins a fused group
// (a stale request, DESIGN.md 3.5):
//   recompute        : its KV is freed and it is recomputed in the group;
//   remote-attention : its KV stays where it is; layers now run by another member reach it by
//                      remote attention (q/k/v there, output back) until the group splits;
//   exchange         : as remote-attention at first, while its KV moves to the members owning
//                      those layers one layer at a time between steps (live KV exchange).
enum class StaleKvStrategy { kRecompute, kRemoteAttention, kExchange };
const char* stale_kv_strategy_name(StaleKvStrategy s);
bool parse_stale_kv_strategy(const std::string& s, StaleKvStrategy* out);

// A policy as the bench and the simulator name the variants they run side by side: "recompute",
// "swap", "migrate", "kunserve", "kunserve/<stale-kv>" (the stale-request strategy) or
// "kunserve/<stale-kv>/no-lookahead" (fused groups without lookahead batch formation).
struct PolicyVariant {
  Policy policy = Policy::kKunServe;
  std::optional<StaleKvStrategy> stale_kv;  // unset: the caller's default
  bool lookahead = true;
};
StatusOr<PolicyVariant> parse_policy_variant(const std::string& name);

struct RequestSnapshot {
  RequestId id;
  bool running = false;          // false: queued (waiting or swapped)
  std::int64_t tokens = 0;       // prompt + generated so far
  std::int64_t blocks_held = 0;  // layer blocks it holds now
};

// One instance (data-parallel replica) at one moment. Blocks are layer blocks (the unit a
// device allocates); an independent instance's token block costs num_layers of them.
struct InstanceSnapshot {
  std::int64_t instance = 0;
  std::int64_t group = -1;       // fused group id, -1 while independent
  GroupState state = GroupState::kInitial;
  std::int64_t kv_blocks_total = 0;
  std::int64_t kv_blocks_free = 0;
  // Blocks needed by running + queued requests at their current lengths.
  std::int64_t blocks_demanded = 0;
  // Blocks wanted by requests not yet admitted (waiting + swapped).
  std::int64_t pending_blocks = 0;
  std::int64_t num_running = 0;
  std::int64_t num_queued = 0;
  std::vector<RequestSnapshot> requests;  // filled for policies that need it (migrate)
  double demand() const {
    return kv_blocks_total > 0 ? static_cast<double>(blocks_demanded) / static_cast<double>(kv_blocks_total) : 0.0;
  }
};

// Member k's (0-based) share of a count that a fused unit of g members keeps as a whole (its
// running and queued requests): split as evenly as integers allow, the remainder on the first
// members, so the shares sum to the unit's count. Every member reporting the whole count made a
// group of g look g times as loaded per member to the router.
constexpr std::int64_t member_count_share(std::int64_t count, std::int64_t g, std::int64_t k) {
  return count / g + (k < count % g ? 1 : 0);
}

// Static facts of the deployment that the planner's memory arithmetic needs.
struct ClusterShape {
  std::int64_t num_instances = 0;
  std::int64_t num_layers = 0;
  std::int64_t layer_param_bytes = 0;     // one decoder layer's parameters, rounded to pages
  std::int64_t layer_block_bytes = 0;     // one layer block (block_size tokens, one layer, K+V)
  std::int64_t block_size_tokens = 16;
  std::vector<std::int64_t> allowed_degrees = {2, 4, 8};  // group sizes the planner may form
};

struct DropAction {
  std::vector<std::int64_t> instances;  // the members, in pipeline stage order
  std::int64_t group = -1;              // id the coordinator assigns
  std::string reason;                   // the numbers that drove it, for the log
  // Growth: the fused groups (kDropped) this new group absorbs. Their members are among
  // `instances`, each at a stage whose layers it holds now (no weight pulls: a member only drops
  // more layers); their requests and KV join the new group, as an independent member's do.
  std::vector<std::int64_t> absorbs;
};
struct RestoreAction {
  std::int64_t group = -1;
  std::string reason;
};
// Partial restore: a dropped group of degree g >= 4 becomes two groups of degree g / 2 (its even
// and its odd stages, cluster::plan_shrink); each member pulls the layers its new stage adds.
struct ShrinkAction {
  std::int64_t group = -1;
  std::vector<std::vector<std::int64_t>> halves;  // instance ids of each new group, stage order
  std::vector<std::int64_t> new_groups;            // the ids the two halves get (on_shrink_done)
  std::string reason;
};
struct MigrateAction {
  RequestId request;
  std::int64_t from = 0;
  std::int64_t to = 0;
  bool live = true;  // running request (KV moves) vs queued request (only the request moves)
  std::string reason;
};

struct Actions {
  std::vector<DropAction> drops;
  std::vector<RestoreAction> restores;
  std::vector<ShrinkAction> shrinks;
  std::vector<MigrateAction> migrations;
  bool empty() const { return drops.empty() && restores.empty() && shrinks.empty() && migrations.empty(); }
};

}  // namespace kun::cluster
