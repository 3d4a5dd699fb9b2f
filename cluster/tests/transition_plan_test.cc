// Transition plans (cluster/transition_plan.h) by hand: a drop's layers, lent pages and stale-KV
// moves; a restore's weight pulls and room; a split's placement (home, most room, blocks free
// now) and the landing of queued requests; growth layouts where members hold part of the layers.
#include "cluster/transition_plan.h"

#include <gtest/gtest.h>

namespace kun::cluster {
namespace {

TransitionGeometry geo8() {
  TransitionGeometry g;
  g.num_layers = 8;
  g.block_size_tokens = 16;
  g.blocks_per_page = 4;
  g.pages_per_layer = 2;
  return g;
}

TransitionRequest running_on(std::int64_t id, std::int64_t tokens, std::vector<std::int32_t> layer_member) {
  TransitionRequest r;
  r.id = RequestId(id);
  r.running = true;
  r.started = true;
  r.tokens_held = tokens;
  r.layer_member = std::move(layer_member);
  return r;
}

TransitionRequest waiting(std::int64_t id, bool started) {
  TransitionRequest r;
  r.id = RequestId(id);
  r.started = started;
  return r;
}

std::vector<std::int32_t> all_on(std::int32_t m) { return std::vector<std::int32_t>(8, m); }

DropInput two_instances(StaleKvStrategy strategy) {
  DropInput in;
  in.group = 7;
  in.members = {3, 5};
  in.held_begin = {0, 0};
  in.held_end = {8, 8};
  in.strategy = strategy;
  in.requests = {running_on(1, 40, all_on(0)), waiting(2, true), waiting(3, false), running_on(4, 20, all_on(1))};
  return in;
}

TEST(TransitionPlan, DropKeepsStageLayersLendsTheRestAndMovesStaleKv) {
  const DropPlan p = plan_drop(two_instances(StaleKvStrategy::kExchange), geo8());
  ASSERT_EQ(p.members.size(), 2u);
  EXPECT_EQ(p.members[0].instance, 3);
  EXPECT_EQ(p.members[0].layer_begin, 0);
  EXPECT_EQ(p.members[0].layer_end, 4);
  EXPECT_EQ(p.members[0].layers_dropped, (std::vector<std::int64_t>{4, 5, 6, 7}));
  EXPECT_EQ(p.members[0].pages_to_kv, 8);   // 4 layers x 2 pages
  EXPECT_EQ(p.members[0].blocks_to_kv, 32);  // x 4 blocks per page
  EXPECT_EQ(p.members[1].layers_dropped, (std::vector<std::int64_t>{0, 1, 2, 3}));
  ASSERT_EQ(p.keep_kv.size(), 2u);
  EXPECT_EQ(p.keep_kv[0].id, RequestId(1));
  EXPECT_EQ(p.keep_kv[0].tokens, 40);
  ASSERT_EQ(p.keep_kv[0].moves.size(), 4u);  // layers 4..7 belong to stage 1 now
  EXPECT_EQ(p.keep_kv[0].moves[0].layer, 4);
  EXPECT_EQ(p.keep_kv[0].moves[0].from, 0);
  EXPECT_EQ(p.keep_kv[0].moves[0].to, 1);
  EXPECT_EQ(p.keep_kv[1].moves.front().layer, 0);
  EXPECT_EQ(p.keep_kv[1].moves.front().to, 0);
  EXPECT_TRUE(p.lose_kv.empty());
  EXPECT_EQ(p.queue, (std::vector<RequestId>{RequestId(2), RequestId(3)}));
  EXPECT_EQ(p.stage_of_layer(5), 1);
}

TEST(TransitionPlan, DropUnderRecomputeQueuesStartedRequestsFirst) {
  const DropPlan p = plan_drop(two_instances(StaleKvStrategy::kRecompute), geo8());
  EXPECT_TRUE(p.keep_kv.empty());
  EXPECT_EQ(p.lose_kv, (std::vector<RequestId>{RequestId(1), RequestId(4)}));
  EXPECT_EQ(p.queue, (std::vector<RequestId>{RequestId(1), RequestId(2), RequestId(4), RequestId(3)}));
}

TEST(TransitionPlan, GrowthDropsMoreLayersAndMovesOnlyWhatChangesOwner) {
  // Group {0,1} (g=2: member 0 holds [0,4), member 1 [4,8)) grows to 4 with free instance 9 and
  // 8, interleaved: stages {0, 9, 1, 8} keep [0,2) [2,4) [4,6) [6,8).
  DropInput in;
  in.group = 3;
  in.members = {0, 9, 1, 8};
  in.held_begin = {0, 0, 4, 0};
  in.held_end = {4, 8, 8, 8};
  in.requests = {running_on(1, 16, {0, 0, 0, 0, 2, 2, 2, 2}), running_on(2, 16, all_on(1))};
  const DropPlan p = plan_drop(in, geo8());
  EXPECT_EQ(p.members[0].layers_dropped, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(p.members[1].layers_dropped.size(), 6u);
  EXPECT_EQ(p.members[2].layers_dropped, (std::vector<std::int64_t>{6, 7}));
  ASSERT_EQ(p.keep_kv[0].moves.size(), 4u);  // layers 2,3 to stage 1; 6,7 to stage 3
  EXPECT_EQ(p.keep_kv[0].moves[0].layer, 2);
  EXPECT_EQ(p.keep_kv[0].moves[0].to, 1);
  EXPECT_EQ(p.keep_kv[0].moves[3].layer, 7);
  EXPECT_EQ(p.keep_kv[0].moves[3].from, 2);
  EXPECT_EQ(p.keep_kv[0].moves[3].to, 3);
  EXPECT_EQ(p.keep_kv[1].moves.size(), 6u);  // the free instance keeps [2,4) of its own
}

TEST(TransitionPlanDeathTest, DropRefusesALayoutThatNeedsWeights) {
  DropInput in;
  in.members = {0, 1};
  in.held_begin = {4, 0};  // member 0 holds [4,8) but stage 0 keeps [0,4)
  in.held_end = {8, 8};
  EXPECT_DEATH(plan_drop(in, geo8()), "keeps");
}

TEST(TransitionPlan, RestorePullsEveryDroppedLayerFromItsStage) {
  RestoreInput in;
  in.group = 2;
  in.members = {4, 6};
  in.kv_blocks_total = {132, 140};
  const RestorePlan p = plan_restore(in, geo8());
  ASSERT_EQ(p.pulls.size(), 8u);
  EXPECT_EQ(p.pulls[0].member, 0);
  EXPECT_EQ(p.pulls[0].layer, 4);
  EXPECT_EQ(p.pulls[0].from, 1);
  EXPECT_EQ(p.pulls[4].member, 1);
  EXPECT_EQ(p.pulls[4].layer, 0);
  EXPECT_EQ(p.pulls[4].from, 0);
  EXPECT_EQ(p.pages_reclaimed, (std::vector<std::int64_t>{8, 8}));
  EXPECT_EQ(p.split_room_blocks, (std::vector<std::int64_t>{100, 108}));  // 132 - 8 x 4, 140 - 32
  EXPECT_TRUE(p.gather);
}

TEST(TransitionPlan, SplitPrefersHomeThenMostRoomAndLandsQueuedOnTheLeastLoaded) {
  SplitInput in;
  in.group = 1;
  in.members = {10, 11};
  in.split_room_blocks = {100, 60};
  in.free_blocks_now = {200, 200};
  const std::vector<std::int32_t> split = {0, 0, 0, 0, 1, 1, 1, 1};
  TransitionRequest a = running_on(1, 32, split);  // 2 token blocks -> 16 layer blocks
  a.home = 1;
  TransitionRequest b = running_on(2, 80, split);  // 5 -> 40: no home, most room = member 0
  TransitionRequest c = running_on(3, 160, split);  // 10 -> 80: fits nowhere after b
  in.requests = {a, b, c, waiting(4, false), waiting(5, true)};
  const SplitPlan p = plan_split(in, geo8());
  ASSERT_EQ(p.keep_kv.size(), 2u);
  EXPECT_EQ(p.keep_kv[0].id, RequestId(1));
  EXPECT_EQ(p.keep_kv[0].member, 1);
  ASSERT_EQ(p.keep_kv[0].moves.size(), 4u);
  EXPECT_EQ(p.keep_kv[0].moves[0].layer, 0);
  EXPECT_EQ(p.keep_kv[0].moves[0].from, 0);
  EXPECT_EQ(p.keep_kv[1].member, 0);
  ASSERT_EQ(p.queued.size(), 3u);
  EXPECT_EQ(p.queued[0].id, RequestId(3));  // lost its KV: queues first
  EXPECT_TRUE(p.queued[0].lost_kv);
  EXPECT_EQ(p.queued[0].member, 0);  // 1 landed on each: lowest stage
  EXPECT_EQ(p.queued[1].member, 1);
  EXPECT_EQ(p.queued[2].member, 0);
}

TEST(TransitionPlan, SplitNeedsTheBlocksFreeNow) {
  SplitInput in;
  in.members = {0, 1};
  in.split_room_blocks = {100, 100};
  in.free_blocks_now = {5, 3};
  // Each needs 16 layer blocks with 8 already on each member, so 8 free on the destination now.
  // The first goes nowhere (member 0 has 5 free) and its blocks are freed: 13 and 11 free; the
  // second then fits on member 0. The lost one lands on member 1, which has none yet.
  in.requests = {running_on(1, 32, {0, 0, 0, 0, 1, 1, 1, 1}), running_on(2, 32, {0, 0, 0, 0, 1, 1, 1, 1})};
  const SplitPlan p = plan_split(in, geo8());
  ASSERT_EQ(p.keep_kv.size(), 1u);
  EXPECT_EQ(p.keep_kv[0].id, RequestId(2));
  EXPECT_EQ(p.keep_kv[0].member, 0);
  ASSERT_EQ(p.queued.size(), 1u);
  EXPECT_EQ(p.queued[0].id, RequestId(1));
  EXPECT_TRUE(p.queued[0].lost_kv);
  EXPECT_EQ(p.queued[0].member, 1);
}

TEST(TransitionPlan, SplitUnderRecomputeKeepsNothing) {
  SplitInput in;
  in.members = {0, 1};
  in.split_room_blocks = {100, 100};
  in.free_blocks_now = {100, 100};
  in.strategy = StaleKvStrategy::kRecompute;
  in.requests = {running_on(1, 32, {0, 0, 0, 0, 1, 1, 1, 1}), waiting(2, false), running_on(3, 16, all_on(0))};
  const SplitPlan p = plan_split(in, geo8());
  EXPECT_TRUE(p.keep_kv.empty());
  ASSERT_EQ(p.queued.size(), 3u);
  EXPECT_EQ(p.queued[0].id, RequestId(1));
  EXPECT_EQ(p.queued[1].id, RequestId(3));
  EXPECT_EQ(p.queued[2].id, RequestId(2));
  EXPECT_FALSE(p.queued[2].lost_kv);
  EXPECT_EQ(p.queued[0].member, 0);
  EXPECT_EQ(p.queued[1].member, 1);
}

TEST(TransitionPlan, StageRuleHoldsForLayerCountsNotDividedByTheDegree) {
  // Stage k holds [k L / g, (k + 1) L / g): every layer in exactly one stage, the one named.
  for (std::int64_t L : {3, 5, 7, 8, 24, 30}) {
    for (std::int64_t g : {1, 2, 3, 4, 8}) {
      if (g > L) continue;
      EXPECT_EQ(stage_layer_begin(0, g, L), 0);
      EXPECT_EQ(stage_layer_begin(g, g, L), L);
      for (std::int64_t l = 0; l < L; ++l) {
        const std::int64_t k = stage_holding_layer(l, g, L);
        EXPECT_LE(stage_layer_begin(k, g, L), l) << "L " << L << " g " << g << " layer " << l;
        EXPECT_LT(l, stage_layer_begin(k + 1, g, L)) << "L " << L << " g " << g << " layer " << l;
      }
    }
  }
  EXPECT_EQ(stage_holding_layer(1, 2, 3), 1);  // stage 1 of 2 over 3 layers starts at layer 1
}

TEST(TransitionPlan, ShrinkSplitsEvenAndOddStagesPullsFromTheNeighbourAndPlacesByRoom) {
  ShrinkInput in;
  in.group = 7;
  in.members = {10, 11, 12, 13};  // stage s holds layers [2s, 2s + 2)
  in.base_kv_blocks = {8, 8, 8, 8};
  const std::vector<std::int32_t> spread = {0, 0, 1, 1, 2, 2, 3, 3};
  in.requests = {running_on(1, 32, spread), running_on(2, 32, spread), running_on(3, 400, spread), waiting(4, false)};
  const ShrinkPlan p = plan_shrink(in, geo8());
  EXPECT_EQ(p.halves[0], (std::vector<std::int64_t>{10, 12}));
  EXPECT_EQ(p.halves[1], (std::vector<std::int64_t>{11, 13}));
  // Each member keeps 4 layers (2 new, pulled from its neighbour): 2 layers x 2 pages back.
  ASSERT_EQ(p.pulls.size(), 8u);
  EXPECT_EQ(p.pulls[0].member, 0);
  EXPECT_EQ(p.pulls[0].layer, 2);
  EXPECT_EQ(p.pulls[0].from, 1);
  EXPECT_EQ(p.pulls[2].member, 1);
  EXPECT_EQ(p.pulls[2].layer, 0);
  EXPECT_EQ(p.pulls[2].from, 0);
  EXPECT_EQ(p.pages_reclaimed, (std::vector<std::int64_t>{4, 4, 4, 4}));
  EXPECT_EQ(p.room_blocks, (std::vector<std::int64_t>{40, 40, 40, 40}));  // 8 + 4 layers x 2 pages x 4
  // Each half's layers run on its stages: half 0 = members 0 (layers 0-3) and 2 (4-7).
  EXPECT_EQ(p.layer_owners[0], (std::vector<std::int32_t>{0, 0, 0, 0, 2, 2, 2, 2}));
  EXPECT_EQ(p.layer_owners[1], (std::vector<std::int32_t>{1, 1, 1, 1, 3, 3, 3, 3}));
  // r1 and r2 (2 token blocks x 4 layers per member) go to the half with most room: 0, then 1.
  ASSERT_EQ(p.keep_kv.size(), 2u);
  EXPECT_EQ(p.keep_kv[0].member, 0);
  EXPECT_EQ(p.keep_kv[1].member, 1);
  ASSERT_EQ(p.keep_kv[0].moves.size(), 4u);  // layers 2, 3 from member 1 to 0; 6, 7 from 3 to 2
  EXPECT_EQ(p.keep_kv[0].moves[0].layer, 2);
  EXPECT_EQ(p.keep_kv[0].moves[0].from, 1);
  EXPECT_EQ(p.keep_kv[0].moves[0].to, 0);
  EXPECT_EQ(p.keep_kv[1].moves[0].layer, 0);
  EXPECT_EQ(p.keep_kv[1].moves[0].to, 1);
  // r3 (25 token blocks x 4 = 100 > 40) fits nowhere: it recomputes, landing first; then r4.
  ASSERT_EQ(p.queued.size(), 2u);
  EXPECT_EQ(p.queued[0].id, RequestId(3));
  EXPECT_TRUE(p.queued[0].lost_kv);
  EXPECT_EQ(p.queued[0].member, 0);
  EXPECT_EQ(p.queued[1].id, RequestId(4));
  EXPECT_EQ(p.queued[1].member, 1);
  EXPECT_NE(p.to_string().find("shrink group 7"), std::string::npos);
  // Under recompute nothing keeps its KV.
  in.strategy = StaleKvStrategy::kRecompute;
  const ShrinkPlan r = plan_shrink(in, geo8());
  EXPECT_TRUE(r.keep_kv.empty());
  EXPECT_EQ(r.queued.size(), 4u);
}

// A live shrink's gather heads each request to a half (TransitionRequest::home): the plan keeps it
// there while it fits, even against the most-room rule, and moves only what is still away; a
// request whose home half has no room left goes by the rule.
TEST(TransitionPlan, ShrinkKeepsARequestOnItsHomeHalfWhileItFits) {
  ShrinkInput in;
  in.group = 7;
  in.members = {10, 11, 12, 13};
  in.base_kv_blocks = {8, 8, 8, 8};  // room 40 per member
  // r1 gathered onto half 1 already (layers 0-3 on member 1, 4-7 on member 3); r2 and r3 homed to
  // half 1 too, at their stages still. r3 (9 token blocks x 4 layers = 36) no longer fits there.
  TransitionRequest r1 = running_on(1, 32, {1, 1, 1, 1, 3, 3, 3, 3});
  r1.home = 1;
  TransitionRequest r2 = running_on(2, 32, {0, 0, 1, 1, 2, 2, 3, 3});
  r2.home = 1;
  TransitionRequest r3 = running_on(3, 144, {0, 0, 1, 1, 2, 2, 3, 3});
  r3.home = 1;
  in.requests = {r1, r2, r3};
  const ShrinkPlan p = plan_shrink(in, geo8());
  ASSERT_EQ(p.keep_kv.size(), 3u);
  EXPECT_EQ(p.keep_kv[0].member, 1);
  EXPECT_TRUE(p.keep_kv[0].moves.empty()) << "r1 is home already";
  EXPECT_EQ(p.keep_kv[1].member, 1) << "most room would say half 0";
  ASSERT_EQ(p.keep_kv[1].moves.size(), 4u);  // layers 0, 1 from 0 to 1; 4, 5 from 2 to 3
  EXPECT_EQ(p.keep_kv[1].moves[0].from, 0);
  EXPECT_EQ(p.keep_kv[1].moves[0].to, 1);
  EXPECT_EQ(p.keep_kv[2].member, 0) << "its home half is short: 40 - 8 - 8 < 36";
  // Without homes the same requests go by room alone: r1 to half 0, moving all 8 layers.
  for (TransitionRequest& r : in.requests) r.home = -1;
  const ShrinkPlan q = plan_shrink(in, geo8());
  EXPECT_EQ(q.keep_kv[0].member, 0);
  EXPECT_EQ(q.keep_kv[0].moves.size(), 8u);
}

TEST(TransitionPlan, CanonicalFormRenumbersRequests) {
  std::vector<TransitionRecord> a = {{"drop", 0, "drop group 0 keep r7:3t[] queue r9 r7"}};
  std::vector<TransitionRecord> b = {{"drop", 0, "drop group 0 keep r1:3t[] queue r2 r1"}};
  EXPECT_EQ(canonical_transitions(a), canonical_transitions(b));
  std::vector<TransitionRecord> c = {{"drop", 0, "drop group 0 keep r1:3t[] queue r1 r2"}};
  EXPECT_NE(canonical_transitions(a), canonical_transitions(c));
}

}  // namespace
}  // namespace kun::cluster
