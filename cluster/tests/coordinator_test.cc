#include "cluster/coordinator.h"

#include <algorithm>

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

#include "cluster/tests/test_util.h"
#include "common/log.h"

namespace kun::cluster {
namespace {

using testing::overloaded_snap;
using testing::snap;
using testing::test_shape;

constexpr std::int64_t kPeriod = 500'000;

Coordinator make(Policy policy = Policy::kKunServe, std::int64_t n = 4) {
  CoordinatorConfig c;
  c.policy = policy;
  return Coordinator(c, test_shape(n));
}

// The transition history is a bounded ring: a long run keeps only the newest events and counts
// the rest (it used to grow with every transition, forever).
TEST(Coordinator, EventHistoryIsBounded) {
  CoordinatorConfig cfg;
  cfg.policy = Policy::kKunServe;
  cfg.event_history = 7;
  Coordinator c(cfg, test_shape(4));
  constexpr int kCycles = 100;  // 5 events each: drop requested/done, restore requested/started/done
  std::int64_t t = 0;
  for (int i = 0; i < kCycles; ++i) {
    auto drop = c.force_drop({0, 1}, t += 10);
    ASSERT_TRUE(drop.ok()) << drop.status().to_string();
    c.on_drop_done(drop->group, t += 10);
    ASSERT_TRUE(c.force_restore(drop->group, t += 10).ok());
    c.on_restore_started(drop->group, t += 10);
    c.on_restore_done(drop->group, t += 10);
  }
  const auto& ev = c.events();
  EXPECT_EQ(ev.size(), 7u);
  EXPECT_EQ(ev.capacity(), 7u);
  EXPECT_EQ(ev.total_pushed(), 5u * kCycles);
  EXPECT_EQ(ev.dropped(), 5u * kCycles - 7u);
  // Newest last, in order: the last cycle's five events end the history.
  EXPECT_EQ(ev.back().kind, EventKind::kRestoreDone);
  EXPECT_EQ(ev.back().group, kCycles - 1);
  EXPECT_EQ(ev[ev.size() - 5].kind, EventKind::kDropRequested);
  for (std::size_t i = 1; i < ev.size(); ++i) EXPECT_LT(ev[i - 1].time_us, ev[i].time_us);
}

TEST(Coordinator, LegalTransitions) {
  using S = GroupState;
  EXPECT_TRUE(is_legal_transition(S::kInitial, S::kDropped));
  EXPECT_TRUE(is_legal_transition(S::kDropped, S::kRestoring));
  EXPECT_TRUE(is_legal_transition(S::kRestoring, S::kInitial));
  EXPECT_FALSE(is_legal_transition(S::kInitial, S::kRestoring));
  EXPECT_FALSE(is_legal_transition(S::kDropped, S::kInitial));
  EXPECT_FALSE(is_legal_transition(S::kRestoring, S::kDropped));
  for (S s : {S::kInitial, S::kDropped, S::kRestoring}) EXPECT_FALSE(is_legal_transition(s, s));
}

TEST(Coordinator, PolicyNames) {
  Policy p = Policy::kRecompute;
  for (Policy q : {Policy::kRecompute, Policy::kSwap, Policy::kMigrate, Policy::kKunServe}) {
    ASSERT_TRUE(parse_policy(policy_name(q), &p));
    EXPECT_EQ(p, q);
  }
  EXPECT_FALSE(parse_policy("llumnix", &p));
  EXPECT_STREQ(group_state_name(GroupState::kDropped), "dropped");
}

TEST(Coordinator, PolicyVariantNames) {
  auto plain = parse_policy_variant("swap");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->policy, Policy::kSwap);
  EXPECT_FALSE(plain->stale_kv.has_value());
  EXPECT_TRUE(plain->lookahead);
  auto remote = parse_policy_variant("kunserve/remote-attention");
  ASSERT_TRUE(remote.ok());
  EXPECT_EQ(remote->policy, Policy::kKunServe);
  EXPECT_EQ(remote->stale_kv, StaleKvStrategy::kRemoteAttention);
  EXPECT_TRUE(remote->lookahead);
  auto no_lookahead = parse_policy_variant("kunserve/exchange/no-lookahead");
  ASSERT_TRUE(no_lookahead.ok());
  EXPECT_EQ(no_lookahead->stale_kv, StaleKvStrategy::kExchange);
  EXPECT_FALSE(no_lookahead->lookahead);
  for (const char* bad : {"", "kunserve/", "kunserve/swap", "recompute/exchange", "kunserve/exchange/fast",
                          "kunserve/exchange/no-lookahead/x", "vllm"}) {
    auto v = parse_policy_variant(bad);
    EXPECT_FALSE(v.ok()) << bad;
    if (!v.ok()) {
      EXPECT_NE(v.status().message().find("unknown policy"), std::string::npos) << bad;
    }
  }
}

TEST(Coordinator, ForcedLifecycleWithEventsAndLatencies) {
  Coordinator c = make();
  auto drop = c.force_drop({2, 3}, 1000);
  ASSERT_TRUE(drop.ok()) << drop.status().to_string();
  EXPECT_EQ(drop->group, 0);
  EXPECT_EQ(drop->instances, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(c.group_of(2), 0);
  EXPECT_EQ(c.group_of(3), 0);
  EXPECT_EQ(c.group_of(0), -1);
  EXPECT_TRUE(c.any_in_transition());
  EXPECT_EQ(c.group(0)->state, GroupState::kInitial);

  // Not droppable again, not restorable yet.
  EXPECT_EQ(c.force_drop({3, 0}, 1100).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(c.force_restore(0, 1100).status().code(), StatusCode::kFailedPrecondition);

  c.on_drop_done(0, 1500);
  EXPECT_EQ(c.group(0)->state, GroupState::kDropped);
  EXPECT_FALSE(c.any_in_transition());

  auto restore = c.force_restore(0, 10'000);
  ASSERT_TRUE(restore.ok());
  EXPECT_EQ(restore->group, 0);
  EXPECT_EQ(c.force_restore(0, 10'001).status().code(), StatusCode::kFailedPrecondition);
  c.on_restore_started(0, 10'200);
  EXPECT_EQ(c.group(0)->state, GroupState::kRestoring);
  c.on_restore_done(0, 13'000);
  EXPECT_EQ(c.group(0), nullptr);
  EXPECT_EQ(c.group_of(2), -1);
  EXPECT_TRUE(c.groups().empty());

  const auto& ev = c.events();
  ASSERT_EQ(ev.size(), 5u);
  EXPECT_EQ(ev[0].kind, EventKind::kDropRequested);
  EXPECT_TRUE(ev[0].forced);
  EXPECT_EQ(ev[1].kind, EventKind::kDropDone);
  EXPECT_EQ(ev[1].latency_us, 500);
  EXPECT_EQ(ev[1].from, GroupState::kInitial);
  EXPECT_EQ(ev[1].to, GroupState::kDropped);
  EXPECT_EQ(ev[2].kind, EventKind::kRestoreRequested);
  EXPECT_EQ(ev[3].kind, EventKind::kRestoreStarted);
  EXPECT_EQ(ev[4].kind, EventKind::kRestoreDone);
  EXPECT_EQ(ev[4].latency_us, 3000);
  EXPECT_EQ(ev[4].to, GroupState::kInitial);
  EXPECT_EQ(ev[4].members, (std::vector<std::int64_t>{2, 3}));
  EXPECT_NE(ev[4].to_string().find("latency 3000us"), std::string::npos) << ev[4].to_string();

  // Group ids are never reused.
  auto again = c.force_drop({2, 3}, 20'000);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->group, 1);
}

TEST(Coordinator, ForceDropValidates) {
  Coordinator c = make(Policy::kKunServe, 8);
  EXPECT_EQ(c.force_drop({0, 1, 2}, 0).status().code(), StatusCode::kInvalidArgument);  // g=3 not allowed
  EXPECT_EQ(c.force_drop({0, 0}, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c.force_drop({0, 9}, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c.force_restore(5, 0).status().code(), StatusCode::kNotFound);
  auto four = c.force_drop({4, 5, 6, 7}, 0);
  ASSERT_TRUE(four.ok());
  EXPECT_EQ(four->instances.size(), 4u);
}

using CoordinatorDeathTest = ::testing::Test;

TEST(CoordinatorDeathTest, IllegalTransitionsAbort) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        Coordinator c = make();
        (void)c.force_drop({0, 1}, 0);
        c.on_drop_done(0, 1);
        c.on_drop_done(0, 2);  // DROPPED -> DROPPED
      },
      "drop done without a pending drop");
  EXPECT_DEATH(
      {
        Coordinator c = make();
        (void)c.force_drop({0, 1}, 0);
        c.on_restore_started(0, 1);  // restore while the drop is still pending
      },
      "restore started without a restore request");
  EXPECT_DEATH(
      {
        Coordinator c = make();
        (void)c.force_drop({0, 1}, 0);
        c.on_drop_done(0, 1);
        (void)c.force_restore(0, 2);
        c.on_restore_done(0, 3);  // DROPPED -> INITIAL skips RESTORING
      },
      "illegal transition dropped -> initial");
  EXPECT_DEATH(
      {
        Coordinator c = make();
        c.on_drop_done(7, 1);
      },
      "unknown or dissolved group 7");
  EXPECT_DEATH(
      {
        Coordinator c = make();
        (void)c.force_drop({0, 1}, 0);
        c.on_drop_done(0, 1);
        (void)c.force_restore(0, 2);
        c.on_restore_started(0, 3);
        c.on_restore_done(0, 4);
        c.on_restore_done(0, 5);  // dissolved
      },
      "unknown or dissolved group 0");
}

TEST(Coordinator, TickDropsOnSustainedOverloadOnly) {
  Coordinator c = make();
  auto cluster = [](bool over) {
    return std::vector<InstanceSnapshot>{over ? overloaded_snap(0) : snap(0, 0.8), snap(1, 0.6), snap(2, 0.2),
                                         snap(3, 0.5)};
  };
  EXPECT_TRUE(c.tick(0, cluster(false)).empty());
  EXPECT_TRUE(c.tick(kPeriod, cluster(true)).empty());  // one sample: not yet
  EXPECT_TRUE(c.tick(kPeriod + 100'000, cluster(true)).empty());  // same period
  Actions a = c.tick(2 * kPeriod, cluster(true));
  ASSERT_EQ(a.drops.size(), 1u);
  EXPECT_EQ(a.drops[0].instances, (std::vector<std::int64_t>{0, 2}));  // least-loaded partner
  EXPECT_EQ(a.drops[0].group, 0);
  EXPECT_FALSE(a.drops[0].reason.empty());
  EXPECT_EQ(c.group_of(0), 0);

  // While the drop is pending, another overloaded instance waits.
  std::vector<InstanceSnapshot> now = {overloaded_snap(0), snap(1, 0.6), snap(2, 0.3), overloaded_snap(3)};
  EXPECT_TRUE(c.tick(3 * kPeriod, now).drops.empty());
  EXPECT_TRUE(c.tick(4 * kPeriod, now).drops.empty());
  c.on_drop_done(0, 4 * kPeriod + 1);
  // Now 3 may fuse, with 1 (the only independent one left).
  a = c.tick(4 * kPeriod + 2, now);
  ASSERT_EQ(a.drops.size(), 1u);
  EXPECT_EQ(a.drops[0].instances, (std::vector<std::int64_t>{1, 3}));
}

// A member of a dropped g = 2 group of test_shape(): its pool holds its own kTotalBlocks plus the
// 16 dropped layers' pages (16 x 10000 / 100 = 1600 blocks); `split_demand` is the demand against
// the capacity it will have once split.
InstanceSnapshot fused_snap(std::int64_t id, double split_demand) {
  InstanceSnapshot s = snap(id, split_demand);
  s.kv_blocks_total = testing::kTotalBlocks + 1600;
  s.kv_blocks_free = s.kv_blocks_total - s.blocks_demanded;
  return s;
}

TEST(Coordinator, TickRestoresWhenGroupDemandFalls) {
  Coordinator c = make();
  ASSERT_TRUE(c.force_drop({0, 1}, 0).ok());
  c.on_drop_done(0, 10);
  // Group demand (against the split capacity) falls 0.9 -> 0.1 and stays there, nothing queued.
  std::int64_t t = kPeriod;
  Actions a;
  int restores_at = -1;
  for (int i = 0; i < 32; ++i, t += kPeriod) {
    const double d = std::max(0.1, 0.9 - 0.1 * i);
    a = c.tick(t, {fused_snap(0, d), fused_snap(1, d), snap(2, 0.5), snap(3, 0.5)});
    EXPECT_TRUE(a.drops.empty());
    if (!a.restores.empty() && restores_at < 0) restores_at = i;
  }
  // Demand is low enough from i = 4, but a trend needs a full window (30 samples, i = 29); two
  // votes needed.
  EXPECT_EQ(restores_at, 30);
  EXPECT_EQ(c.group(0)->restore_pending, true);
  // No second restore action while pending.
  a = c.tick(t, {snap(0, 0.1), snap(1, 0.1), snap(2, 0.5), snap(3, 0.5)});
  EXPECT_TRUE(a.restores.empty());
  c.on_restore_started(0, t + 1);
  c.on_restore_done(0, t + 2);
  EXPECT_EQ(c.group_of(0), -1);
}

TEST(Coordinator, NoRestoreWhileTheRequestsWouldNotFitAfterTheSplit) {
  Coordinator c = make();
  ASSERT_TRUE(c.force_drop({0, 1}, 0).ok());
  c.on_drop_done(0, 10);
  // Against the enlarged fused pool (4800 blocks each) demand falls 0.53 -> 0.4, but against the
  // 3200 each member keeps after a split it is 0.8 -> 0.6: no restore.
  std::int64_t t = kPeriod;
  for (int i = 0; i < 10; ++i, t += kPeriod) {
    const double d = 0.8 - 0.02 * i;
    const Actions a = c.tick(t, {fused_snap(0, d), fused_snap(1, d), snap(2, 0.5), snap(3, 0.5)});
    EXPECT_TRUE(a.restores.empty()) << "sample " << i;
  }
  EXPECT_EQ(c.group_of(0), 0);
}

TEST(Coordinator, AnOverloadedGroupGrowsWithFreeInstances) {
  Coordinator c = make();
  ASSERT_TRUE(c.force_drop({0, 1}, 0).ok());
  c.on_drop_done(0, 0);
  // The group's load against its fused pool (4800 blocks each) is 110 % with a queue; instances
  // 2 and 3 are light.
  InstanceSnapshot hot0 = fused_snap(0, 0.1), hot1 = fused_snap(1, 0.1);
  for (InstanceSnapshot* h : {&hot0, &hot1}) {
    h->blocks_demanded = h->kv_blocks_total * 11 / 10;
    h->kv_blocks_free = 0;
    h->pending_blocks = 64;
    h->num_queued = 2;
  }
  Actions a;
  std::int64_t t = 0;
  for (int i = 0; i < 3 && a.drops.empty(); ++i) {
    t += kPeriod;
    a = c.tick(t, {hot0, hot1, snap(2, 0.1), snap(3, 0.1)});
  }
  ASSERT_EQ(a.drops.size(), 1u);
  EXPECT_EQ(a.drops[0].absorbs, (std::vector<std::int64_t>{0}));
  EXPECT_EQ(a.drops[0].instances, (std::vector<std::int64_t>{0, 2, 1, 3}));
  EXPECT_EQ(c.group(0), nullptr);  // replaced by the new group
  EXPECT_EQ(c.group_of(2), a.drops[0].group);
  c.on_drop_done(a.drops[0].group, t);
  EXPECT_EQ(c.group(a.drops[0].group)->state, GroupState::kDropped);
  // With growth off the same load leaves the group alone.
  CoordinatorConfig cfg;
  cfg.planner.grow_groups = false;
  Coordinator off(cfg, testing::test_shape(4));
  ASSERT_TRUE(off.force_drop({0, 1}, 0).ok());
  off.on_drop_done(0, 0);
  for (int i = 1; i <= 6; ++i) EXPECT_TRUE(off.tick(i * kPeriod, {hot0, hot1, snap(2, 0.1), snap(3, 0.1)}).drops.empty());
}

// Demand trend at the drop: an instance whose demand climbs 0.3 of its pool per sample gets a
// group sized for the demand 8 samples ahead (g = 4), where the artifact's sizing forms g = 2.
TEST(Coordinator, TrendSizesTheDropForARisingDemand) {
  const auto run = [](double horizon) {
    CoordinatorConfig cfg;
    cfg.planner.trend_horizon_samples = horizon;
    Coordinator c(cfg, test_shape(4));
    const double demand[] = {0.5, 0.8, 1.1, 1.4};
    Actions a;
    for (int i = 0; i < 4; ++i) {
      // Overloaded (demand >= 0.95, pending >= free) on the last two samples: the drop vote.
      const InstanceSnapshot lead = demand[i] >= 0.95 ? overloaded_snap(0, demand[i]) : snap(0, demand[i]);
      a = c.tick(i * kPeriod, {lead, snap(1, 0.3), snap(2, 0.2), snap(3, 0.25)});
      if (i < 3) {
        EXPECT_TRUE(a.drops.empty()) << "sample " << i;
      }
    }
    EXPECT_EQ(a.drops.size(), 1u);
    return a.drops.empty() ? std::vector<std::int64_t>{} : a.drops[0].instances;
  };
  // Demand now 2240 + 320 = 2560 tokens <= 0.95 x 4800: g = 2 covers.
  EXPECT_EQ(run(0.0), (std::vector<std::int64_t>{0, 2}));
  // Growth (1.4 - 0.5) / 3 = 0.3 per sample x 8 samples x 1600 tokens = 3840 more: g = 2 is short,
  // g = 4 holds 2240 + 480 + 320 + 400 + 3840 = 7280 <= 0.95 x 11200.
  EXPECT_EQ(run(8.0), (std::vector<std::int64_t>{0, 1, 2, 3}));
}

// A dropped group whose load climbs towards its fused capacity grows once its projection is short,
// before its load window votes (which needs 95 % and pending >= free on two samples).
TEST(Coordinator, TrendGrowsAGroupBeforeItsVote) {
  const auto first_growth = [](double horizon, bool grow_on_trend) {
    CoordinatorConfig cfg;
    cfg.planner.trend_horizon_samples = horizon;
    cfg.planner.grow_on_trend = grow_on_trend;
    Coordinator c(cfg, test_shape(4));
    EXPECT_TRUE(c.force_drop({0, 1}, 0).ok());
    c.on_drop_done(0, 0);
    for (int i = 1; i <= 8; ++i) {
      // Load against the fused pool (4800 blocks each): 0.5, 0.55, ... 0.85, nothing queued.
      InstanceSnapshot m0 = fused_snap(0, 0.1), m1 = fused_snap(1, 0.1);
      for (InstanceSnapshot* m : {&m0, &m1}) {
        m->blocks_demanded = m->kv_blocks_total * (50 + 5 * (i - 1)) / 100;
        m->kv_blocks_free = m->kv_blocks_total - m->blocks_demanded;
      }
      const Actions a = c.tick(i * kPeriod, {m0, m1, snap(2, 0.1), snap(3, 0.1)});
      if (!a.drops.empty()) {
        EXPECT_EQ(a.drops[0].absorbs, (std::vector<std::int64_t>{0}));
        EXPECT_EQ(a.drops[0].instances, (std::vector<std::int64_t>{0, 2, 1, 3}));
        return i;
      }
    }
    return -1;
  };
  // 0.05 per sample over the newest 4 samples x 8 samples = +0.4: 0.65 + 0.4 > 0.95 at sample 4.
  EXPECT_EQ(first_growth(8.0, true), 4);
  EXPECT_EQ(first_growth(8.0, false), -1);  // waits for the vote (never at 85 %)
  EXPECT_EQ(first_growth(0.0, true), -1);   // no trend: the artifact's behaviour
  // A shorter horizon grows later: +0.125 x 9600 blocks = 600 tokens; 3840 (0.8) + 600 <= 4560,
  // 4080 (0.85, sample 8) + 600 > 4560.
  EXPECT_EQ(first_growth(2.5, true), 8);
}

// Forced growth and shrink (tests, the simulator's script, ClusterRuntime::grow / shrink), and
// giving the absorbed groups back when an executor cannot carry a growth out.
TEST(Coordinator, ForcedGrowthShrinkAndTheirRollbacks) {
  Coordinator c = make(Policy::kKunServe, 8);
  auto a = c.force_drop({0, 1}, 10);
  auto b = c.force_drop({2, 3}, 10);
  ASSERT_TRUE(a.ok() && b.ok());
  c.on_drop_done(a->group, 20);
  c.on_drop_done(b->group, 20);
  EXPECT_EQ(c.force_grow(99, {4, 5}, 30).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(c.force_grow(a->group, {4}, 30).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c.force_grow(a->group, {4, 4}, 30).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c.force_grow(a->group, {2, 4}, 30).status().code(), StatusCode::kFailedPrecondition);  // half a group
  EXPECT_EQ(c.force_grow(a->group, {3, 2}, 30).status().code(), StatusCode::kFailedPrecondition);  // not its stage order
  EXPECT_EQ(c.force_shrink(a->group, 30).status().code(), StatusCode::kFailedPrecondition);       // degree 2
  // Merging with group b: interleaved stage order, both absorbed.
  auto merged = c.force_grow(a->group, {2, 3}, 30);
  ASSERT_TRUE(merged.ok()) << merged.status().to_string();
  EXPECT_EQ(merged->instances, (std::vector<std::int64_t>{0, 2, 1, 3}));
  EXPECT_EQ(merged->absorbs, (std::vector<std::int64_t>{a->group, b->group}));
  EXPECT_EQ(c.group(a->group), nullptr);
  EXPECT_EQ(c.group_of(2), merged->group);
  // The executor failed before anything moved: a and b come back as they were.
  c.abandon_growth(merged->group, {{a->group, {0, 1}}, {b->group, {2, 3}}}, 40);
  EXPECT_EQ(c.group(merged->group), nullptr);
  ASSERT_NE(c.group(a->group), nullptr);
  EXPECT_EQ(c.group(a->group)->state, GroupState::kDropped);
  EXPECT_EQ(c.group_of(3), b->group);
  EXPECT_FALSE(c.any_in_transition());
  // Growth with free instances, then a shrink that fails, then one that succeeds.
  auto grown = c.force_grow(a->group, {4, 5}, 50);
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  EXPECT_EQ(grown->instances, (std::vector<std::int64_t>{0, 4, 1, 5}));
  EXPECT_EQ(grown->absorbs, (std::vector<std::int64_t>{a->group}));
  c.on_drop_done(grown->group, 60);
  auto shrink = c.force_shrink(grown->group, 70);
  ASSERT_TRUE(shrink.ok()) << shrink.status().to_string();
  EXPECT_EQ(shrink->halves, (std::vector<std::vector<std::int64_t>>{{0, 1}, {4, 5}}));
  EXPECT_TRUE(c.any_in_transition());
  c.abandon_shrink(grown->group, 80);
  EXPECT_FALSE(c.any_in_transition());
  EXPECT_EQ(c.group(grown->group)->members.size(), 4u);
  auto again = c.force_shrink(grown->group, 90);
  ASSERT_TRUE(again.ok());
  c.on_shrink_done(grown->group, 100);
  EXPECT_EQ(c.group_of(0), again->new_groups[0]);
  EXPECT_EQ(c.group_of(5), again->new_groups[1]);
  EXPECT_EQ(c.group(again->new_groups[1])->members, (std::vector<std::int64_t>{4, 5}));
}

TEST(Coordinator, RestoreCanBeDisabled) {
  CoordinatorConfig cfg;
  cfg.enable_restore = false;
  Coordinator c(cfg, test_shape(2));
  ASSERT_TRUE(c.force_drop({0, 1}, 0).ok());
  c.on_drop_done(0, 0);
  for (int i = 1; i < 20; ++i) {
    const double d = 0.5 - 0.02 * i;
    EXPECT_TRUE(c.tick(i * kPeriod, {snap(0, d), snap(1, d)}).restores.empty());
  }
}

TEST(Coordinator, BaselinesEmitNoGroupActions) {
  for (Policy p : {Policy::kRecompute, Policy::kSwap}) {
    Coordinator c = make(p);
    for (int i = 0; i < 5; ++i) {
      EXPECT_TRUE(c.tick(i * kPeriod, {overloaded_snap(0), snap(1, 0.1), snap(2, 0.1), snap(3, 0.1)}).empty());
    }
  }
}

TEST(Coordinator, MigratePolicyEmitsMigrations) {
  Coordinator c = make(Policy::kMigrate);
  InstanceSnapshot hot = overloaded_snap(0);
  hot.requests.push_back({RequestId(11), true, 100, 128});
  hot.requests.push_back({RequestId(12), true, 200, 224});
  Actions a = c.tick(0, {hot, snap(1, 0.2), snap(2, 0.5), snap(3, 0.5)});
  EXPECT_TRUE(a.drops.empty());
  ASSERT_FALSE(a.migrations.empty());
  EXPECT_EQ(a.migrations[0].request, RequestId(12));
  EXPECT_EQ(a.migrations[0].to, 1);
  EXPECT_TRUE(c.migration().in_flight(RequestId(12)));
  c.on_migration_done(RequestId(12));
  EXPECT_FALSE(c.migration().in_flight(RequestId(12)));
}

// Property: under random load and random completion of transitions, no instance is ever in two
// groups, every drop names only independent instances with an allowed degree, and the state
// machine is only driven through legal transitions (an illegal one would abort the test).
TEST(Coordinator, RandomizedTicksKeepGroupsDisjoint) {
  std::int64_t planned_drops = 0, restores_done = 0, grows = 0;
  const LogLevel saved_level = log_level();
  set_log_level(LogLevel::kWarn);  // thousands of decision lines otherwise
  for (std::uint64_t seed = 1; seed <= 20; ++seed) {
    std::mt19937_64 rng(seed);
    const std::int64_t n = 4 + static_cast<std::int64_t>(rng() % 13);
    CoordinatorConfig cfg;
    cfg.monitor.drop_votes_needed = 1 + static_cast<std::int64_t>(rng() % 2);
    Coordinator c(cfg, test_shape(n));
    std::vector<double> level(static_cast<std::size_t>(n), 0.5);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    std::int64_t t = 0;
    for (int step = 0; step < 400; ++step) {
      t += 100'000 + static_cast<std::int64_t>(rng() % 400'000);
      std::vector<InstanceSnapshot> snaps;
      for (std::int64_t i = 0; i < n; ++i) {
        double& l = level[static_cast<std::size_t>(i)];
        l = std::clamp(l + (u(rng) - 0.5) * 0.3, 0.0, 1.6);
        snaps.push_back(l >= 1.0 ? overloaded_snap(i, l) : snap(i, l));
      }
      std::shuffle(snaps.begin(), snaps.end(), rng);
      const std::map<std::int64_t, GroupInfo> before = c.groups();
      Actions a = c.tick(t, snaps);
      for (const DropAction& d : a.drops) {
        EXPECT_TRUE(d.instances.size() == 2 || d.instances.size() == 4 || d.instances.size() == 8);
        // A member is independent, or in a dropped group the new one absorbs (growth).
        for (std::int64_t m : d.instances) {
          for (const auto& [id, g] : before) {
            if (std::count(g.members.begin(), g.members.end(), m) == 0) continue;
            EXPECT_EQ(std::count(d.absorbs.begin(), d.absorbs.end(), id), 1)
                << "seed " << seed << ": instance " << m << " dropped while in group " << id;
            EXPECT_EQ(g.state, GroupState::kDropped);
          }
        }
        for (std::int64_t id : d.absorbs) {
          ASSERT_TRUE(before.count(id) != 0);
          EXPECT_EQ(before.at(id).members.size() * 2, d.instances.size()) << "growth doubles the degree";
          EXPECT_EQ(c.group(id), nullptr) << "an absorbed group is gone";
          ++grows;
        }
        EXPECT_FALSE(std::any_of(before.begin(), before.end(),
                                 [](const auto& kv) { return kv.second.in_transition(); }))
            << "drop planned while a group was in transition";
      }
      // Disjointness of live groups.
      std::set<std::int64_t> members;
      for (const auto& [id, g] : c.groups()) {
        for (std::int64_t m : g.members) {
          EXPECT_TRUE(members.insert(m).second) << "seed " << seed << ": instance " << m << " in two groups";
          EXPECT_EQ(c.group_of(m), id);
        }
      }
      // Randomly complete transitions (and sometimes force one).
      std::vector<std::int64_t> ids;
      for (const auto& [id, g] : c.groups()) ids.push_back(id);
      for (std::int64_t id : ids) {
        const GroupInfo* g = c.group(id);
        if (u(rng) < 0.5) continue;
        if (g->drop_pending) {
          c.on_drop_done(id, t);
        } else if (g->state == GroupState::kDropped && g->restore_pending) {
          c.on_restore_started(id, t);
        } else if (g->state == GroupState::kRestoring) {
          c.on_restore_done(id, t);
        } else if (g->state == GroupState::kDropped && u(rng) < 0.1) {
          ASSERT_TRUE(c.force_restore(id, t).ok());
        }
      }
      if (u(rng) < 0.05) {
        const std::int64_t a0 = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(n));
        const std::int64_t a1 = (a0 + 1) % n;
        const bool was_free = c.group_of(a0) < 0 && c.group_of(a1) < 0;
        auto r = c.force_drop({a0, a1}, t);
        EXPECT_EQ(r.ok(), was_free);
        if (r.ok()) {
          EXPECT_EQ(c.group_of(a0), r->group);
          EXPECT_EQ(c.group_of(a1), r->group);
        }
      }
    }
    // Latencies are recorded for every completed transition.
    for (const Event& e : c.events()) {
      if (e.kind == EventKind::kDropDone || e.kind == EventKind::kRestoreDone) {
        EXPECT_GE(e.latency_us, 0);
      }
      planned_drops += (e.kind == EventKind::kDropRequested && !e.forced) ? 1 : 0;
      restores_done += e.kind == EventKind::kRestoreDone ? 1 : 0;
    }
  }
  EXPECT_GT(planned_drops, 20);  // the property was exercised
  EXPECT_GT(restores_done, 5);
  EXPECT_GT(grows, 0);
  set_log_level(saved_level);
}

}  // namespace
}  // namespace kun::cluster
