#include "cluster/planner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include <time.h>

#include "cluster/tests/test_util.h"

namespace kun::cluster {
namespace {

// CPU seconds this thread has run: the scaling tests compare work, and wall time on a loaded
// 2-core host also counts the time slices other processes took (a 4 ms plan preempted once
// measured 19 ms against the smaller size's 0.9 ms).
double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

using testing::snap;
using testing::test_shape;

// Hand arithmetic for test_shape() (L=32, P=10000 B, layer block 100 B, 16 tokens/block) and
// members with 3200 layer blocks each:
//   independent: 3200/32 = 100 token blocks = 1600 tokens
//   g=2: stage keeps 16 layers, frees 16*10000/100 = 1600 blocks; (3200+1600)/16 = 300 -> 4800 tokens
//   g=4: stage keeps  8 layers, frees 24*10000/100 = 2400 blocks; (3200+2400)/8  = 700 -> 11200 tokens
// (DESIGN formula: g*(kv + (1-1/g)*L*P)/(L*bytes/token-layer) = 2*(320000+160000)/200 = 4800.)

TEST(Planner, LayersKept) {
  EXPECT_EQ(layers_kept(0, 2, 32), 16);
  EXPECT_EQ(layers_kept(1, 2, 32), 16);
  std::int64_t sum = 0;
  for (int s = 0; s < 4; ++s) sum += layers_kept(s, 4, 10);
  EXPECT_EQ(sum, 10);
  EXPECT_EQ(layers_kept(0, 4, 10), 2);
  EXPECT_EQ(layers_kept(1, 4, 10), 3);
}

TEST(Planner, CapacityArithmeticByHand) {
  const ClusterShape shape = test_shape();
  InstanceSnapshot a = snap(0, 0.5), b = snap(1, 0.5), c = snap(2, 0.5), d = snap(3, 0.5);
  EXPECT_EQ(independent_capacity_tokens(a, shape), 1600);
  EXPECT_EQ(fused_capacity_tokens({&a, &b}, shape), 4800);
  EXPECT_EQ(fused_capacity_tokens({&a, &b, &c, &d}, shape), 11200);
  // DESIGN.md formula, in bytes, for g = 2.
  const double kv_bytes = 3200.0 * 100.0;
  const double per_token_all_layers = 32.0 * 100.0 / 16.0;
  EXPECT_DOUBLE_EQ(2.0 * (kv_bytes + 0.5 * 32.0 * 10000.0) / per_token_all_layers, 4800.0);
  // Demand: 1600 layer blocks = 50 token blocks = 800 tokens; a partial token block rounds up.
  EXPECT_EQ(demand_tokens(a, shape), 800);
  a.blocks_demanded = 1601;
  EXPECT_EQ(demand_tokens(a, shape), 816);
  // The smallest member bounds the group.
  b.kv_blocks_total = 1600;  // (1600+1600)/16 = 200 token blocks
  EXPECT_EQ(fused_capacity_tokens({&a, &b}, shape), 3200);
}

TEST(Planner, PicksTwoWhenItSuffices) {
  const ClusterShape shape = test_shape();
  // Leader: 3200 tokens (6400 layer blocks) vs 1600 capacity. Partner at 800 tokens.
  // g=2: 3200 + 800 = 4000 <= 0.95 * 4800 = 4560 -> covers.
  std::vector<InstanceSnapshot> xs = {snap(0, 2.0), snap(1, 0.5), snap(2, 0.6), snap(3, 0.7)};
  Plan p = Planner().plan(xs, {0}, shape);
  ASSERT_EQ(p.groups.size(), 1u);
  const PlannedGroup& g = p.groups[0];
  EXPECT_EQ(g.degree, 2);
  EXPECT_EQ(g.instances, (std::vector<std::int64_t>{0, 1}));  // least-loaded partner
  EXPECT_EQ(g.leader, 0);
  EXPECT_EQ(g.demand_tokens, 4000);
  EXPECT_EQ(g.capacity_before_tokens, 3200);
  EXPECT_EQ(g.capacity_after_tokens, 4800);
  EXPECT_TRUE(g.covers);
  EXPECT_NE(g.reason.find("4800"), std::string::npos) << g.reason;
  EXPECT_NE(g.reason.find("covers"), std::string::npos) << g.reason;
}

TEST(Planner, PicksFourWhenTwoIsShort) {
  const ClusterShape shape = test_shape();
  // Leader at 5000 tokens: 5000/16 = 312.5 -> 313 token blocks = 10016 layer blocks -> 5008 tokens.
  // g=2 with a 800-token partner: 5808 > 4560. g=4 with three at 800/960/1120: 5008+2880 = 7888
  // <= 0.95 * 11200 = 10640 -> covers.
  InstanceSnapshot lead = snap(5, 1.0);
  lead.blocks_demanded = 10016;
  std::vector<InstanceSnapshot> xs = {snap(1, 0.5), snap(2, 0.6), snap(3, 0.7), lead, snap(4, 0.9)};
  Plan p = Planner().plan(xs, {5}, shape);
  ASSERT_EQ(p.groups.size(), 1u);
  const PlannedGroup& g = p.groups[0];
  EXPECT_EQ(g.degree, 4);
  EXPECT_EQ(g.instances, (std::vector<std::int64_t>{1, 2, 3, 5}));
  EXPECT_EQ(g.demand_tokens, 5008 + 800 + 960 + 1120);
  EXPECT_EQ(g.capacity_before_tokens, 4 * 1600);
  EXPECT_EQ(g.capacity_after_tokens, 11200);
  EXPECT_TRUE(g.covers);
  EXPECT_NE(g.reason.find("g=2"), std::string::npos) << g.reason;  // says why 2 was not enough
  EXPECT_NE(g.reason.find("g=4"), std::string::npos) << g.reason;
}

// With a demand trend the group is sized for demand + projected growth (the leader's and its
// partners'), not for the demand now.
TEST(Planner, TrendSizesTheGroupForTheProjectedDemand) {
  const ClusterShape shape = test_shape();
  const std::vector<InstanceSnapshot> xs = {snap(0, 2.0), snap(1, 0.5), snap(2, 0.6), snap(3, 0.7)};
  // Now g=2 covers (3200 + 800 = 4000 <= 4560, PicksTwoWhenItSuffices). Growing by 1000 (leader)
  // and 200 (partner 1): 5200 > 4560, so g=4: 3200 + 800 + 960 + 1120 = 6080, + 1200 = 7280 <= 10640.
  const Plan p = Planner().plan(xs, {0}, shape, {{0, 1000}, {1, 200}, {3, 0}});
  ASSERT_EQ(p.groups.size(), 1u);
  EXPECT_EQ(p.groups[0].degree, 4);
  EXPECT_EQ(p.groups[0].demand_tokens, 6080);
  EXPECT_EQ(p.groups[0].growth_tokens, 1200);
  EXPECT_TRUE(p.groups[0].covers);
  EXPECT_NE(p.groups[0].reason.find("1200 projected"), std::string::npos) << p.groups[0].reason;
  EXPECT_NE(p.groups[0].reason.find("short by"), std::string::npos) << p.groups[0].reason;  // why not 2
  // A falling trend is no growth: the same as none.
  const Plan falling = Planner().plan(xs, {0}, shape, {{0, -3000}});
  ASSERT_EQ(falling.groups.size(), 1u);
  EXPECT_EQ(falling.groups[0].degree, 2);
  EXPECT_EQ(falling.groups[0].growth_tokens, 0);
  // The growth reorders the leaders: 1 grows past 0's deficit and is served first.
  const std::vector<InstanceSnapshot> two = {snap(0, 1.5), snap(1, 1.2), snap(2, 0.1), snap(3, 0.1), snap(4, 0.1)};
  const Plan order = Planner().plan(two, {0, 1}, shape, {{1, 2000}});
  ASSERT_EQ(order.groups.size(), 2u);
  EXPECT_EQ(order.groups[0].leader, 1);
}

TEST(Planner, HealthyInstancesStayIndependent) {
  const ClusterShape shape = test_shape();
  std::vector<InstanceSnapshot> xs;
  for (int i = 0; i < 8; ++i) xs.push_back(snap(i, 0.3 + 0.05 * i));
  EXPECT_TRUE(Planner().plan(xs, {}, shape).groups.empty());
  // One overloaded among eight: exactly one pair, the other six untouched.
  xs[6] = snap(6, 2.0);
  Plan p = Planner().plan(xs, {6}, shape);
  ASSERT_EQ(p.groups.size(), 1u);
  EXPECT_EQ(p.groups[0].instances, (std::vector<std::int64_t>{0, 6}));
}

TEST(Planner, LargestDeficitFirstAndNoInstanceTwice) {
  const ClusterShape shape = test_shape();
  // Two overloaded, two idle: the bigger deficit (1) gets the least-loaded partner (3).
  std::vector<InstanceSnapshot> xs = {snap(0, 1.8), snap(1, 2.2), snap(2, 0.4), snap(3, 0.1)};
  Plan p = Planner().plan(xs, {0, 1}, shape);
  ASSERT_EQ(p.groups.size(), 2u);
  EXPECT_EQ(p.groups[0].leader, 1);
  EXPECT_EQ(p.groups[0].instances, (std::vector<std::int64_t>{1, 3}));
  EXPECT_EQ(p.groups[1].leader, 0);
  EXPECT_EQ(p.groups[1].instances, (std::vector<std::int64_t>{0, 2}));
}

TEST(Planner, NoCoverTakesLargestDegreeAndSaysSo) {
  const ClusterShape shape = test_shape();
  // Leader at 20000 tokens: even g=4 (11200 * 0.95 = 10640) is short.
  InstanceSnapshot lead = snap(0, 1.0);
  lead.blocks_demanded = 40000;  // 1250 token blocks = 20000 tokens
  std::vector<InstanceSnapshot> xs = {lead, snap(1, 0.1), snap(2, 0.1), snap(3, 0.1), snap(4, 0.1)};
  Plan p = Planner().plan(xs, {0}, shape);
  ASSERT_EQ(p.groups.size(), 1u);
  EXPECT_EQ(p.groups[0].degree, 4);
  EXPECT_FALSE(p.groups[0].covers);
  EXPECT_NE(p.groups[0].reason.find("no allowed degree covers"), std::string::npos) << p.groups[0].reason;
  // With only two partners left, g=4 is impossible: g=2, still short, still said.
  xs.resize(3);
  p = Planner().plan(xs, {0}, shape);
  ASSERT_EQ(p.groups.size(), 1u);
  EXPECT_EQ(p.groups[0].degree, 2);
  EXPECT_FALSE(p.groups[0].covers);
}

TEST(Planner, AloneStaysIndependentWithANote) {
  const ClusterShape shape = test_shape();
  Plan p = Planner().plan({snap(0, 2.0)}, {0}, shape);
  EXPECT_TRUE(p.groups.empty());
  ASSERT_EQ(p.notes.size(), 1u);
  EXPECT_NE(p.notes[0].find("no partner"), std::string::npos);
  // An id that is not among the independent instances is reported, not planned.
  p = Planner().plan({snap(0, 0.2), snap(1, 0.2)}, {9}, shape);
  EXPECT_TRUE(p.groups.empty());
  EXPECT_EQ(p.notes.size(), 1u);
}

TEST(Planner, OverloadedPairMayFuseWhenNothingElseIsLeft) {
  const ClusterShape shape = test_shape();
  // Two instances at 2000 tokens each: 4000 <= 4560, so fusing the two overloaded ones covers both.
  std::vector<InstanceSnapshot> xs = {snap(0, 1.25), snap(1, 1.25)};
  Plan p = Planner().plan(xs, {0, 1}, shape);
  ASSERT_EQ(p.groups.size(), 1u);
  EXPECT_EQ(p.groups[0].instances, (std::vector<std::int64_t>{0, 1}));
  EXPECT_TRUE(p.groups[0].covers);
}

TEST(Planner, ThousandInstancesSanity) {
  const ClusterShape shape = test_shape(1000);
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> load(0.05, 0.9);
  std::vector<InstanceSnapshot> xs;
  std::vector<std::int64_t> over;
  for (int i = 0; i < 1000; ++i) {
    if (i % 10 == 3) {
      xs.push_back(snap(i, 1.2 + 0.01 * (i % 37)));
      over.push_back(i);
    } else {
      xs.push_back(snap(i, load(rng)));
    }
  }
  std::shuffle(xs.begin(), xs.end(), rng);
  Plan p = Planner().plan(xs, over, shape);
  EXPECT_EQ(p.groups.size(), over.size());  // plenty of partners: every leader gets a group
  std::set<std::int64_t> seen;
  for (const PlannedGroup& g : p.groups) {
    EXPECT_EQ(g.degree, 2) << g.reason;  // each leader is covered by one light partner
    EXPECT_TRUE(g.covers) << g.reason;
    EXPECT_TRUE(std::is_sorted(g.instances.begin(), g.instances.end()));
    for (std::int64_t m : g.instances) EXPECT_TRUE(seen.insert(m).second) << "instance " << m << " twice";
  }
  // Partners are the lightest instances: every partner is no heavier than any untouched instance.
  std::int64_t max_partner = 0, min_untouched = 1 << 30;
  for (const InstanceSnapshot& s : xs) {
    const bool leader = std::find(over.begin(), over.end(), s.instance) != over.end();
    if (leader) continue;
    if (seen.count(s.instance)) {
      max_partner = std::max(max_partner, demand_tokens(s, shape));
    } else {
      min_untouched = std::min(min_untouched, demand_tokens(s, shape));
    }
  }
  EXPECT_LE(max_partner, min_untouched);
}

// CPU seconds for one plan over n instances, half of them overloaded (best of `reps`).
double plan_seconds(std::int64_t n, int reps, std::size_t* groups) {
  const ClusterShape shape = test_shape(n);
  std::vector<InstanceSnapshot> xs;
  std::vector<std::int64_t> over;
  xs.reserve(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const bool o = i % 2 == 0;
    const double jitter = 1e-6 * static_cast<double>(i);
    xs.push_back(o ? snap(i, 1.1 + jitter) : snap(i, 0.2 + jitter));
    if (o) over.push_back(i);
  }
  double best = 1e9;
  for (int r = 0; r < reps; ++r) {
    const double t0 = thread_cpu_seconds();
    Plan p = Planner().plan(xs, over, shape);
    best = std::min(best, thread_cpu_seconds() - t0);
    *groups = p.groups.size();
  }
  return best;
}

TEST(Planner, ScalesNLogN) {
  // 4x the instances: N log N work grows ~4.6x, quadratic work 16x. Best of five runs each to
  // damp noise from a shared machine; the bound (10x) sits between the two.
  // The two sizes are measured alternately, so a slow spell of the host hits both.
  std::size_t groups = 0;
  double small = 1e9;
  double large = 1e9;
  for (int round = 0; round < 5; ++round) {
    small = std::min(small, plan_seconds(5'000, 1, &groups));
    EXPECT_EQ(groups, 2'500u);
    large = std::min(large, plan_seconds(20'000, 1, &groups));
    EXPECT_EQ(groups, 10'000u);
  }
  EXPECT_LT(large, 10.0 * small) << "5k: " << small << " s, 20k: " << large << " s";
}

// A member of a fused group of degree g at stage s: its pool holds the lent pages (test_shape:
// 3200 + (32 - 32/g) x 100 blocks) and its share of the group's demand.
InstanceSnapshot fused_member(std::int64_t id, std::int64_t g, double demand_of_pool) {
  InstanceSnapshot s;
  s.instance = id;
  s.kv_blocks_total = testing::kTotalBlocks + (32 - 32 / g) * 100;
  s.blocks_demanded = static_cast<std::int64_t>(demand_of_pool * static_cast<double>(s.kv_blocks_total));
  s.kv_blocks_free = 0;
  s.pending_blocks = 64;
  s.num_queued = 1;
  return s;
}

TEST(PlannerGrowth, GrowsWithFreeInstancesInterleaved) {
  const ClusterShape shape = test_shape(4);
  const InstanceSnapshot m0 = fused_member(0, 2, 1.1), m1 = fused_member(1, 2, 1.1);
  EXPECT_EQ(Planner::group_capacity_tokens({&m0, &m1}, shape), 4800);
  const std::vector<InstanceSnapshot> free = {snap(3, 0.1), snap(2, 0.1)};
  const std::vector<PlannedGrowth> out = Planner().plan_growth({GroupView{0, {&m0, &m1}, true}}, free, shape);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].degree, 4);
  EXPECT_EQ(out[0].absorbs, (std::vector<std::int64_t>{0}));
  EXPECT_EQ(out[0].instances, (std::vector<std::int64_t>{0, 2, 1, 3}));  // old stage j at 2j
  EXPECT_EQ(out[0].capacity_before_tokens, 4800 + 1600 + 1600);
  EXPECT_EQ(out[0].capacity_after_tokens, 11200);  // g=4 over the members' base pools
  EXPECT_TRUE(out[0].covers);  // 2 x 5280 x 16 / 32 + 2 x 320 x 16 / 32 = 5600 tokens <= 0.95 x 11200
}

TEST(PlannerGrowth, ProjectedGrowthCountsAgainstTheNewCapacity) {
  const ClusterShape shape = test_shape(4);
  const InstanceSnapshot m0 = fused_member(0, 2, 1.1), m1 = fused_member(1, 2, 1.1);
  const std::vector<InstanceSnapshot> free = {snap(3, 0.1), snap(2, 0.1)};
  GroupView v{0, {&m0, &m1}, true};
  v.growth_tokens = 6000;  // 5600 + 6000 > 0.95 x 11200 = 10640
  const std::vector<PlannedGrowth> out = Planner().plan_growth({v}, free, shape);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].degree, 4);
  EXPECT_EQ(out[0].growth_tokens, 6000);
  EXPECT_FALSE(out[0].covers);
  EXPECT_NE(out[0].reason.find("6000 projected"), std::string::npos) << out[0].reason;
}

TEST(PlannerGrowth, MergesWithALightGroupWhenNoInstanceIsFree) {
  const ClusterShape shape = test_shape(4);
  const InstanceSnapshot a0 = fused_member(0, 2, 1.1), a1 = fused_member(1, 2, 1.1);
  const InstanceSnapshot b0 = fused_member(5, 2, 0.2), b1 = fused_member(4, 2, 0.2);
  const std::vector<PlannedGrowth> out =
      Planner().plan_growth({GroupView{1, {&b0, &b1}, false}, GroupView{0, {&a0, &a1}, true}}, {}, shape);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].absorbs, (std::vector<std::int64_t>{0, 1}));
  EXPECT_EQ(out[0].instances, (std::vector<std::int64_t>{0, 5, 1, 4}));  // b's stage j at 2j + 1
  EXPECT_EQ(out[0].capacity_after_tokens, 11200);
}

TEST(PlannerGrowth, RespectsTheDegreeCapAndOverloadedPartners) {
  ClusterShape shape = test_shape(8);
  shape.allowed_degrees = {2, 4, 8};
  const InstanceSnapshot a0 = fused_member(0, 2, 1.1), a1 = fused_member(1, 2, 1.1);
  const InstanceSnapshot b0 = fused_member(2, 2, 1.1), b1 = fused_member(3, 2, 1.1);
  PlannerConfig capped;
  capped.max_degree = 2;
  EXPECT_TRUE(Planner(capped).plan_growth({GroupView{0, {&a0, &a1}, true}}, {snap(4, 0.1), snap(5, 0.1)}, shape).empty());
  PlannerConfig off;
  off.grow_groups = false;
  EXPECT_TRUE(Planner(off).plan_growth({GroupView{0, {&a0, &a1}, true}}, {snap(4, 0.1), snap(5, 0.1)}, shape).empty());
  // Two overloaded groups and no free instance: neither absorbs the other when the merged group
  // would not hold both (2 x 6240 tokens > 0.95 x 11200)...
  const InstanceSnapshot c0 = fused_member(0, 2, 1.3), c1 = fused_member(1, 2, 1.3);
  const InstanceSnapshot d0 = fused_member(2, 2, 1.3), d1 = fused_member(3, 2, 1.3);
  EXPECT_TRUE(Planner().plan_growth({GroupView{0, {&c0, &c1}, true}, GroupView{1, {&d0, &d1}, true}}, {}, shape).empty());
  // ... but they merge when it does: 2 x 5280 = 10560 <= 10640 (a member of 4 lends 24 layers'
  // pages, one of 2 only 16), and then only once.
  const std::vector<PlannedGrowth> both =
      Planner().plan_growth({GroupView{0, {&a0, &a1}, true}, GroupView{1, {&b0, &b1}, true}}, {}, shape);
  ASSERT_EQ(both.size(), 1u);
  EXPECT_EQ(both[0].absorbs.size(), 2u);
  EXPECT_EQ(both[0].capacity_after_tokens, 11200);
  EXPECT_TRUE(both[0].covers);
  EXPECT_NE(both[0].reason.find("holds both"), std::string::npos) << both[0].reason;
  // Their projected growth does not block it: the merge adds capacity now, and the merged group
  // grows again if the projection comes true. (Counting it left two pairs of the H100 13B sweep
  // at 23.8 req/s queueing on memory for 3 s: p99 TTFT 2.19 s against 0.46 s.)
  GroupView ga{0, {&a0, &a1}, true}, gb{1, {&b0, &b1}, true};
  ga.growth_tokens = gb.growth_tokens = 100;
  const std::vector<PlannedGrowth> growing = Planner().plan_growth({ga, gb}, {}, shape);
  ASSERT_EQ(growing.size(), 1u);
  EXPECT_EQ(growing[0].absorbs.size(), 2u);
}

TEST(PlannerGrowth, FourGrowsToEight) {
  ClusterShape shape = test_shape(8);
  shape.allowed_degrees = {2, 4, 8};
  std::vector<InstanceSnapshot> members;
  for (std::int64_t i = 0; i < 4; ++i) members.push_back(fused_member(i, 4, 1.2));
  std::vector<const InstanceSnapshot*> ptrs;
  for (const auto& m : members) ptrs.push_back(&m);
  const std::vector<InstanceSnapshot> free = {snap(4, 0.1), snap(5, 0.2), snap(6, 0.3), snap(7, 0.05)};
  const std::vector<PlannedGrowth> out = Planner().plan_growth({GroupView{9, ptrs, true}}, free, shape);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].degree, 8);
  EXPECT_EQ(out[0].instances, (std::vector<std::int64_t>{0, 7, 1, 4, 2, 5, 3, 6}));  // least loaded first
  // g=8 over base pools: stage keeps 4 layers, frees 28 x 100: (3200 + 2800) / 4 = 1500 -> 24000.
  EXPECT_EQ(out[0].capacity_after_tokens, 24000);
  // A group of 8 cannot grow further.
  std::vector<InstanceSnapshot> eight;
  for (std::int64_t i = 0; i < 8; ++i) eight.push_back(fused_member(i, 8, 1.2));
  std::vector<const InstanceSnapshot*> eptrs;
  for (const auto& m : eight) eptrs.push_back(&m);
  EXPECT_TRUE(Planner().plan_growth({GroupView{1, eptrs, true}}, {}, shape).empty());
}

TEST(PlannerGrowth, GrowthPlanningScalesNLogN) {
  // 4096 groups of 2, half overloaded, and 4096 free instances: one pass, each group grows once.
  ClusterShape shape = test_shape(4096 * 3);
  std::vector<InstanceSnapshot> members;
  members.reserve(8192);
  for (std::int64_t i = 0; i < 8192; ++i) members.push_back(fused_member(i, 2, (i / 2) % 2 ? 1.1 : 0.2));
  std::vector<GroupView> views;
  for (std::int64_t gi = 0; gi < 4096; ++gi) {
    views.push_back(GroupView{gi, {&members[static_cast<std::size_t>(2 * gi)], &members[static_cast<std::size_t>(2 * gi + 1)]}, gi % 2 == 1});
  }
  std::vector<InstanceSnapshot> free;
  for (std::int64_t i = 0; i < 4096; ++i) free.push_back(snap(8192 + i, 0.1));
  const std::vector<PlannedGrowth> out = Planner().plan_growth(views, free, shape);
  EXPECT_EQ(out.size(), 2048u);
  std::set<std::int64_t> used;
  for (const PlannedGrowth& pg : out) {
    for (std::int64_t m : pg.instances) EXPECT_TRUE(used.insert(m).second) << "instance " << m << " twice";
  }
}

TEST(PlannerGrowth, OverloadedMergesPairUpOnceEach) {
  // 4096 overloaded groups of 2 and no free instance: each merge takes two of them (the merged
  // group holds both, 2 x 5280 <= 10640), so 2048 growths, every instance once, in one pass.
  ClusterShape shape = test_shape(8192);
  shape.allowed_degrees = {2, 4};
  std::vector<InstanceSnapshot> members;
  members.reserve(8192);
  for (std::int64_t i = 0; i < 8192; ++i) members.push_back(fused_member(i, 2, 1.1));
  std::vector<GroupView> views;
  for (std::int64_t gi = 0; gi < 4096; ++gi) {
    views.push_back(GroupView{gi, {&members[static_cast<std::size_t>(2 * gi)], &members[static_cast<std::size_t>(2 * gi + 1)]}, true});
  }
  const std::vector<PlannedGrowth> out = Planner().plan_growth(views, {}, shape);
  EXPECT_EQ(out.size(), 2048u);
  std::set<std::int64_t> used;
  for (const PlannedGrowth& pg : out) {
    EXPECT_EQ(pg.absorbs.size(), 2u);
    EXPECT_TRUE(pg.covers);
    for (std::int64_t m : pg.instances) EXPECT_TRUE(used.insert(m).second) << "instance " << m << " twice";
  }
}

TEST(PlannerShrink, HalvesAreTheEvenAndTheOddStages) {
  ClusterShape shape = test_shape(8);
  shape.allowed_degrees = {2, 4, 8};
  std::vector<InstanceSnapshot> members;
  for (std::int64_t i : {5, 2, 7, 0}) members.push_back(fused_member(i, 4, 0.1));
  std::vector<const InstanceSnapshot*> ptrs;
  for (const auto& m : members) ptrs.push_back(&m);
  const PlannedShrink p = Planner().plan_shrink(GroupView{3, ptrs, false}, shape);
  EXPECT_EQ(p.group, 3);
  ASSERT_EQ(p.halves.size(), 2u);
  EXPECT_EQ(p.halves[0], (std::vector<std::int64_t>{5, 7}));
  EXPECT_EQ(p.halves[1], (std::vector<std::int64_t>{2, 0}));
  EXPECT_EQ(p.capacity_before_tokens, 11200);
  EXPECT_EQ(p.capacity_after_tokens, 2 * 4800);  // two groups of 2 over the base pools
  EXPECT_TRUE(p.covers);
  // A load that fills the group of 4 does not fit its halves.
  std::vector<InstanceSnapshot> full;
  for (std::int64_t i = 0; i < 4; ++i) full.push_back(fused_member(i, 4, 0.9));
  std::vector<const InstanceSnapshot*> fptrs;
  for (const auto& m : full) fptrs.push_back(&m);
  const PlannedShrink q = Planner().plan_shrink(GroupView{4, fptrs, false}, shape);
  EXPECT_FALSE(q.covers);
  EXPECT_NE(q.reason.find("does not cover"), std::string::npos) << q.reason;
  // Eight shrinks to two groups of four: capacity 2 x 11200.
  std::vector<InstanceSnapshot> eight;
  for (std::int64_t i = 0; i < 8; ++i) eight.push_back(fused_member(i, 8, 0.1));
  std::vector<const InstanceSnapshot*> eptrs;
  for (const auto& m : eight) eptrs.push_back(&m);
  const PlannedShrink e = Planner().plan_shrink(GroupView{5, eptrs, false}, shape);
  EXPECT_EQ(e.halves[0], (std::vector<std::int64_t>{0, 2, 4, 6}));
  EXPECT_EQ(e.capacity_after_tokens, 2 * 11200);
}

// Property: any sequence of growths (2 -> 4 -> 8) and shrinks (8 -> 4 -> 2) over N instances keeps
// every instance in exactly one unit (a group or alone), no group larger than N or than 8, every
// degree a power of two, and a shrink undoes the growth's interleave (its halves are the groups
// that grew into it, stage order kept).
TEST(PlannerShrink, GrowAndShrinkKeepEveryInstanceInExactlyOneUnit) {
  for (std::uint32_t seed = 1; seed <= 20; ++seed) {
    std::mt19937 rng(seed);
    const std::int64_t n = 8 + static_cast<std::int64_t>(rng() % 9);  // 8..16 instances
    ClusterShape shape = test_shape(n);
    shape.allowed_degrees = {2, 4, 8};
    std::vector<std::vector<std::int64_t>> groups;
    std::vector<std::int64_t> alone;
    for (std::int64_t i = 0; i < n; ++i) alone.push_back(i);
    std::int64_t next_id = 0;
    std::vector<std::int64_t> ids;
    std::map<std::int64_t, std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>>> grown_from;
    for (int round = 0; round < 60; ++round) {
      const int what = static_cast<int>(rng() % 3);
      if (what == 0 && alone.size() >= 2) {  // a fresh group of 2 from two free instances
        groups.push_back({alone[alone.size() - 2], alone[alone.size() - 1]});
        alone.resize(alone.size() - 2);
        ids.push_back(next_id++);
      } else if (what == 1 && !groups.empty()) {  // grow one overloaded group
        const std::size_t gi = rng() % groups.size();
        std::vector<InstanceSnapshot> members, free;
        for (std::int64_t m : groups[gi]) members.push_back(fused_member(m, static_cast<std::int64_t>(groups[gi].size()), 1.2));
        std::vector<const InstanceSnapshot*> ptrs;
        for (const auto& m : members) ptrs.push_back(&m);
        for (std::int64_t a : alone) free.push_back(snap(a, 0.1));
        std::vector<GroupView> views = {GroupView{ids[gi], ptrs, true}};
        const std::vector<PlannedGrowth> out = Planner().plan_growth(views, free, shape);
        if (out.empty()) continue;
        ASSERT_EQ(out.size(), 1u);
        const PlannedGrowth& pg = out[0];
        ASSERT_EQ(pg.absorbs, (std::vector<std::int64_t>{ids[gi]}));
        std::vector<std::int64_t> partners;
        for (std::size_t k = 1; k < pg.instances.size(); k += 2) partners.push_back(pg.instances[k]);
        for (std::int64_t p : partners) {
          auto it = std::find(alone.begin(), alone.end(), p);
          ASSERT_NE(it, alone.end()) << "partner " << p << " was not free";
          alone.erase(it);
        }
        grown_from[next_id] = {groups[gi], partners};
        groups[gi] = pg.instances;
        ids[gi] = next_id++;
      } else if (!groups.empty()) {  // shrink a group of 4 or more, or restore a group of 2
        const std::size_t gi = rng() % groups.size();
        const auto g = static_cast<std::int64_t>(groups[gi].size());
        if (g == 2) {
          alone.insert(alone.end(), groups[gi].begin(), groups[gi].end());
          groups.erase(groups.begin() + static_cast<std::ptrdiff_t>(gi));
          ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(gi));
        } else {
          std::vector<InstanceSnapshot> members;
          for (std::int64_t m : groups[gi]) members.push_back(fused_member(m, g, 0.05));
          std::vector<const InstanceSnapshot*> ptrs;
          for (const auto& m : members) ptrs.push_back(&m);
          const PlannedShrink ps = Planner().plan_shrink(GroupView{ids[gi], ptrs, false}, shape);
          ASSERT_TRUE(ps.covers) << ps.reason;
          ASSERT_EQ(ps.halves.size(), 2u);
          ASSERT_EQ(static_cast<std::int64_t>(ps.halves[0].size()), g / 2);
          ASSERT_EQ(static_cast<std::int64_t>(ps.halves[1].size()), g / 2);
          if (auto it = grown_from.find(ids[gi]); it != grown_from.end()) {
            EXPECT_EQ(ps.halves[0], it->second.first) << "shrink does not undo the growth";
            EXPECT_EQ(ps.halves[1], it->second.second);
          }
          groups[gi] = ps.halves[0];
          ids[gi] = next_id++;
          groups.push_back(ps.halves[1]);
          ids.push_back(next_id++);
        }
      }
      // Every instance in exactly one unit; degrees in {2, 4, 8}, never more than n.
      std::vector<int> seen(static_cast<std::size_t>(n), 0);
      for (std::int64_t a : alone) ++seen[static_cast<std::size_t>(a)];
      for (const auto& gr : groups) {
        const auto g = static_cast<std::int64_t>(gr.size());
        ASSERT_TRUE(g == 2 || g == 4 || g == 8) << "degree " << g;
        ASSERT_LE(g, n);
        for (std::int64_t m : gr) ++seen[static_cast<std::size_t>(m)];
      }
      for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[static_cast<std::size_t>(i)], 1) << "instance " << i << " seed " << seed;
    }
  }
}

TEST(PlannerShrink, ShrinkPlanningIsLinearInTheMembers) {
  // plan_shrink is O(g) per group: planning every group of a cluster is O(N).
  ClusterShape shape = test_shape(1 << 16);
  shape.allowed_degrees = {2, 4, 8};
  const auto seconds = [&](std::int64_t groups) {
    std::vector<InstanceSnapshot> members;
    members.reserve(static_cast<std::size_t>(groups * 8));
    for (std::int64_t i = 0; i < groups * 8; ++i) members.push_back(fused_member(i, 8, 0.1));
    const double t0 = thread_cpu_seconds();
    std::int64_t covering = 0;
    for (std::int64_t gi = 0; gi < groups; ++gi) {
      std::vector<const InstanceSnapshot*> ptrs;
      for (std::int64_t k = 0; k < 8; ++k) ptrs.push_back(&members[static_cast<std::size_t>(gi * 8 + k)]);
      covering += Planner().plan_shrink(GroupView{gi, ptrs, false}, shape).covers ? 1 : 0;
    }
    EXPECT_EQ(covering, groups);
    return thread_cpu_seconds() - t0;
  };
  // Best of 5 each, alternating sizes: a shared host's stalls only make a run slower, and a slow
  // spell hits both sizes.
  double small = 1e9;
  double large = 1e9;
  for (int round = 0; round < 5; ++round) {
    small = std::min(small, seconds(1024));
    large = std::min(large, seconds(4096));
  }
  EXPECT_LT(large, 10.0 * small) << "1k groups: " << small << " s, 4k: " << large << " s";
}

}  // namespace
}  // namespace kun::cluster
