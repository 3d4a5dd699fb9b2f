// Transition plans (DESIGN.md section 4, "Transitions are plans"): pure functions that say what a
// drop (fuse), the start of a restore and a split do, computed from a snapshot of the units
// involved. The runtime carries a plan out with real transfers, the simulator with modelled
// times; neither decides any of it itself. No threads, no clock, no I/O.
//
// Members are addressed by their index in the plan's member list (pipeline stage order); a
// `TransitionRequest` says on which member each layer of a request's KV lives now, so the same
// drop plan serves a fuse of independent instances (every layer on the member it ran on) and the
// growth of a fused group (layers spread over the old group's members).
//
// Rules (one rule each, for both executors):
//  * drop: stage s keeps layers [s L / g, (s + 1) L / g) (it must hold them now); the pages of
//    the layers it held and no longer keeps become KV pages. A request running with KV keeps it
//    (unless the strategy is recompute); each layer held away from its new owner is a LayerMove
//    (carried out by the live exchange, or served by remote attention). Requests without KV (or
//    losing it) queue in the group: those that had started first, then the fresh ones, each in
//    the order given.
//  * restore (gather phase): each member pulls every layer it does not hold from the stage that
//    kept it, taking pages_per_layer pages per layer back from its KV pool; after the split a
//    member has `split_room_blocks` layer blocks of KV (its pool minus those pages), which is the
//    room engine::assign_restore_homes hands out as homes during the gather.
//  * split: a running request (unless recompute) continues on its home when its whole KV
//    (token_blocks x L) fits in the home's room left, else on the member with the most room left
//    that fits (lowest stage on ties); the destination must also have the blocks free now for
//    the layers it gathers. Its layers elsewhere are LayerMoves to it. A request placed nowhere
//    loses its KV and queues first; queued requests go one by one to the member with the fewest
//    requests landed so far (lowest stage on ties).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cluster/policy_types.h"
#include "common/ids.h"

namespace kun::cluster {

// The stage rule of every fused group, for every executor: stage k of a g-way group over L layers
// holds layers [stage_layer_begin(k, g, L), stage_layer_begin(k + 1, g, L)) = [k L / g, (k + 1) L / g).
std::int64_t stage_layer_begin(std::int64_t stage, std::int64_t g, std::int64_t num_layers);
// The stage of a g-way group that holds `layer`.
std::int64_t stage_holding_layer(std::int64_t layer, std::int64_t g, std::int64_t num_layers);

struct TransitionGeometry {
  std::int64_t num_layers = 0;
  std::int64_t block_size_tokens = 16;
  std::int64_t blocks_per_page = 1;  // layer blocks per page
  std::int64_t pages_per_layer = 0;  // pages of one decoder layer's parameters
  std::int64_t token_blocks(std::int64_t tokens) const {
    return tokens <= 0 ? 0 : (tokens + block_size_tokens - 1) / block_size_tokens;
  }
};

// A request of a unit taking part in a transition, in that unit's queue order.
struct TransitionRequest {
  RequestId id;
  bool running = false;  // running and holding KV
  bool started = false;  // computed tokens before (it recomputes when it queues again)
  std::int64_t tokens_held = 0;
  // Per layer: the member (index in the plan's member list) holding that layer's KV; empty when
  // it holds none.
  std::vector<std::int32_t> layer_member;
  std::int32_t home = -1;  // the home its gather was heading to (-1: none): split a member, shrink a half
};

struct LayerMove {
  std::int64_t layer = 0;
  std::int32_t from = 0;  // member indices
  std::int32_t to = 0;
};

struct MemberLayout {
  std::int64_t instance = 0;
  std::int64_t layer_begin = 0;  // layers kept [begin, end)
  std::int64_t layer_end = 0;
  std::vector<std::int64_t> layers_dropped;  // held before, not kept: their pages become KV
  std::int64_t pages_to_kv = 0;
  std::int64_t blocks_to_kv = 0;
};

// ---- drop ------------------------------------------------------------------------------------
struct DropInput {
  std::int64_t group = -1;
  std::vector<std::int64_t> members;  // stage order
  // Per member: the layers it holds now, [begin, end) (an independent instance: [0, L)).
  std::vector<std::int64_t> held_begin, held_end;
  std::vector<TransitionRequest> requests;  // every request of every member, member by member
  StaleKvStrategy strategy = StaleKvStrategy::kExchange;
};

struct StaleKvPlan {
  RequestId id;
  std::int64_t tokens = 0;
  std::vector<LayerMove> moves;  // layers away from their owner stage (exchange moves them)
};

struct DropPlan {
  std::int64_t group = -1;
  StaleKvStrategy strategy = StaleKvStrategy::kExchange;
  std::vector<MemberLayout> members;
  std::vector<StaleKvPlan> keep_kv;   // adopted with their KV where it is, in this order
  std::vector<RequestId> lose_kv;     // running requests whose KV is freed (they recompute)
  std::vector<RequestId> queue;       // adopted without KV after keep_kv, in this order
  std::int64_t stage_of_layer(std::int64_t layer) const;
  std::string to_string() const;
};

DropPlan plan_drop(const DropInput& in, const TransitionGeometry& geo);

// ---- restore (gather phase) ------------------------------------------------------------------
struct RestoreInput {
  std::int64_t group = -1;
  std::vector<std::int64_t> members;              // stage order
  std::vector<std::int64_t> kv_blocks_total;      // per member, its pool now (with lent pages)
  StaleKvStrategy strategy = StaleKvStrategy::kExchange;
  // Per member (empty: none anywhere): layers outside its stage it still holds because dropping
  // them failed (the runtime's drop completes without them). Not pulled; no pages lent for them.
  std::vector<std::vector<std::int64_t>> layers_kept;
};

struct WeightPull {
  std::int32_t member = 0;  // pulls layer `layer` ...
  std::int64_t layer = 0;
  std::int32_t from = 0;    // ... from the member whose stage kept it
};

struct RestorePlan {
  std::int64_t group = -1;
  std::vector<std::int64_t> members;
  std::vector<WeightPull> pulls;              // member by member, layers ascending
  std::vector<std::int64_t> pages_reclaimed;  // per member
  std::vector<std::int64_t> split_room_blocks;  // per member: KV layer blocks after the split
  bool gather = true;                         // false under recompute: the split recomputes
  std::string to_string() const;
};

RestorePlan plan_restore(const RestoreInput& in, const TransitionGeometry& geo);

// ---- split -------------------------------------------------------------------------------------
struct SplitInput {
  std::int64_t group = -1;
  std::vector<std::int64_t> members;            // stage order
  std::vector<std::int64_t> split_room_blocks;  // per member (RestorePlan::split_room_blocks)
  std::vector<std::int64_t> free_blocks_now;    // per member, in the still-fused pool
  std::vector<TransitionRequest> requests;      // the group's queue order
  StaleKvStrategy strategy = StaleKvStrategy::kExchange;
};

struct Placement {
  RequestId id;
  std::int32_t member = 0;
  std::int64_t tokens = 0;
  std::vector<LayerMove> moves;  // layers gathered to `member` at the split
};

struct Landing {
  RequestId id;
  std::int32_t member = 0;
  bool lost_kv = false;  // was running: it recomputes
};

struct SplitPlan {
  std::int64_t group = -1;
  std::vector<std::int64_t> members;
  std::vector<Placement> keep_kv;  // in queue order
  std::vector<Landing> queued;     // in adoption order
  std::string to_string() const;
};

SplitPlan plan_split(const SplitInput& in, const TransitionGeometry& geo);

// ---- shrink (partial restore) ------------------------------------------------------------------
// A fused group of degree g >= 4 splits into two groups of degree g / 2: the even stages (old
// stage 2j becomes stage j of half 0) and the odd stages (2j + 1 -> stage j of half 1), the
// inverse of growth's interleave. New stage j of a half keeps layers [j L / h, (j + 1) L / h)
// (h = g / 2), which contains the layers its member holds now; each member pulls the rest from
// the old stage that kept them (its neighbour in the other half) and takes those pages back
// from its KV pool. A running request (unless recompute) lands with its KV on its home half
// (TransitionRequest::home: 0 or 1, the half a live shrink's gather was heading to) when it fits
// there, else on the half with the most room left that fits it (token_blocks x layers kept on
// every member of the half; half 0 on ties); its layers held away from the member of its half
// that keeps them are LayerMoves (old member indices) copied at the shrink. A request placed nowhere loses its KV and queues first; queued requests go one by one
// to the half with the fewest requests landed.
struct ShrinkInput {
  std::int64_t group = -1;
  std::vector<std::int64_t> members;          // stage order, degree g (even, >= 4)
  std::vector<std::int64_t> base_kv_blocks;   // per member: its pool as an independent instance
  std::vector<TransitionRequest> requests;    // the group's queue order
  StaleKvStrategy strategy = StaleKvStrategy::kExchange;
};

struct ShrinkPlan {
  std::int64_t group = -1;
  std::vector<std::int64_t> members;                // the old stage order
  std::vector<std::vector<std::int64_t>> halves;    // instance ids of each half, stage order
  std::vector<std::vector<std::int32_t>> half_members;  // the same as old member indices
  // Per half, per layer: the old member index whose stage in that half runs the layer (where a
  // request continuing on the half keeps the layer's KV).
  std::vector<std::vector<std::int32_t>> layer_owners;
  std::vector<WeightPull> pulls;                    // member by member, layers ascending
  std::vector<std::int64_t> pages_reclaimed;        // per old member
  std::vector<std::int64_t> room_blocks;            // per old member: its KV pool in its half
  std::vector<Placement> keep_kv;                   // member = the half (0 or 1)
  std::vector<Landing> queued;                      // member = the half
  std::string to_string() const;
};

ShrinkPlan plan_shrink(const ShrinkInput& in, const TransitionGeometry& geo);

// What an executor records of a transition it carried out (tests compare the sequences of two
// executors).
struct TransitionRecord {
  std::string kind;  // drop | grow | restore | split | shrink
  std::int64_t group = -1;
  std::string plan;  // the plan's to_string()
};

// A canonical form of a record sequence where request ids are renumbered by first appearance
// (two executors number requests differently).
std::string canonical_transitions(const std::vector<TransitionRecord>& records);

}  // namespace kun::cluster
