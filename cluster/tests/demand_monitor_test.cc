#include "cluster/demand_monitor.h"

#include <algorithm>

#include <gtest/gtest.h>

#include <deque>
#include <vector>

#include "cluster/tests/test_util.h"

namespace kun::cluster {
namespace {

using testing::snap;

constexpr std::int64_t kPeriod = 500'000;

DemandSample sample(std::int64_t t_us, double demand, std::int64_t pending, std::int64_t free_blocks,
                    std::int64_t queued) {
  return DemandSample{t_us, demand, pending, free_blocks, queued};
}

DemandSample overload(std::int64_t t_us) { return sample(t_us, 0.99, 100, 20, 3); }
DemandSample calm(std::int64_t t_us, double demand = 0.6) { return sample(t_us, demand, 0, 1000, 0); }

TEST(DemandMonitor, DefaultsMatchTheArtifact) {
  DemandMonitorConfig c;
  EXPECT_EQ(c.sample_period_us, 500'000);
  EXPECT_EQ(c.window_samples, 30);
  EXPECT_DOUBLE_EQ(c.drop_demand_threshold, 0.95);
  EXPECT_DOUBLE_EQ(c.restore_demand_threshold, 0.5);
  EXPECT_EQ(c.drop_votes_needed, 2);
}

TEST(DemandMonitor, SamplesAtMostOncePerPeriod) {
  DemandMonitor m;
  EXPECT_TRUE(m.observe_instance(0, calm(0)));
  EXPECT_FALSE(m.observe_instance(0, calm(100'000)));
  EXPECT_FALSE(m.observe_instance(0, calm(499'999)));
  EXPECT_TRUE(m.observe_instance(0, calm(500'000)));
  EXPECT_EQ(m.instance_window(0)->samples.size(), 2u);
}

TEST(DemandMonitor, WindowIsBounded) {
  DemandMonitor m;
  for (int i = 0; i < 100; ++i) m.observe_instance(0, calm(i * kPeriod));
  EXPECT_EQ(m.instance_window(0)->samples.size(), 30u);
}

TEST(DemandMonitor, SingleSpikeDoesNotVoteDrop) {
  DemandMonitor m;
  // Ticks every 0.1 s; the spike lasts one sample period (0.4 s of ticks, one sample).
  for (std::int64_t t = 0; t < 20 * kPeriod; t += 100'000) {
    const bool spike = t >= 5 * kPeriod && t < 6 * kPeriod;
    m.observe_instance(0, spike ? overload(t) : calm(t));
    EXPECT_NE(m.instance_vote(0), Vote::kDrop) << "t=" << t;
  }
  // Alternating spikes never reach two in a row either.
  DemandMonitor alt;
  for (int i = 0; i < 20; ++i) {
    alt.observe_instance(1, i % 2 ? overload(i * kPeriod) : calm(i * kPeriod));
    EXPECT_NE(alt.instance_vote(1), Vote::kDrop);
  }
}

TEST(DemandMonitor, SustainedOverloadVotesDropAfterTwoSamples) {
  DemandMonitor m;
  m.observe_instance(0, calm(0));
  m.observe_instance(0, overload(kPeriod));
  EXPECT_EQ(m.instance_vote(0), Vote::kNone);
  m.observe_instance(0, overload(kPeriod + 200'000));  // same period: not a sample
  EXPECT_EQ(m.instance_vote(0), Vote::kNone);
  m.observe_instance(0, overload(2 * kPeriod));
  EXPECT_EQ(m.instance_vote(0), Vote::kDrop);
  m.observe_instance(0, calm(3 * kPeriod));
  EXPECT_EQ(m.instance_vote(0), Vote::kNone);
}

TEST(DemandMonitor, DropNeedsBothHighDemandAndPendingAtLeastFree) {
  DemandMonitorConfig c;
  c.drop_votes_needed = 1;
  DemandMonitor m(c);
  EXPECT_TRUE(m.drop_eligible(sample(0, 0.95, 10, 10, 1)));
  EXPECT_FALSE(m.drop_eligible(sample(0, 0.949, 10, 10, 1)));   // demand just below
  EXPECT_FALSE(m.drop_eligible(sample(0, 1.3, 9, 10, 1)));      // pending < free
  EXPECT_FALSE(m.drop_eligible(sample(0, 1.0, 0, 0, 0)));       // nothing pending
  c.drop_requires_pending = false;
  EXPECT_TRUE(DemandMonitor(c).drop_eligible(sample(0, 1.0, 0, 0, 0)));
}

TEST(DemandMonitor, SustainedOverloadVotesDropEvenWithPendingBelowFree) {
  // 95 % demand with a queue whose pending blocks stay below the free blocks: never
  // drop-eligible, but sustained for sustained_overload_samples samples it votes drop.
  DemandMonitor m;
  ASSERT_EQ(m.config().sustained_overload_samples, 6);
  for (std::int64_t i = 0; i < 5; ++i) {
    ASSERT_TRUE(m.observe_instance(0, sample(i * 500'000, 0.96, 40, 80, 2)));
    EXPECT_FALSE(m.drop_eligible(m.instance_window(0)->samples.back()));
    EXPECT_EQ(m.instance_vote(0), Vote::kNone) << "sample " << i;
  }
  m.observe_instance(0, sample(5 * 500'000, 0.96, 40, 80, 2));
  EXPECT_EQ(m.instance_vote(0), Vote::kDrop);
  // One sample without a queue ends the streak.
  m.observe_instance(0, sample(6 * 500'000, 0.97, 0, 80, 0));
  EXPECT_EQ(m.instance_vote(0), Vote::kNone);
  // High demand with nothing waiting never votes (dropping cannot help TTFT).
  DemandMonitor idle;
  for (std::int64_t i = 0; i < 10; ++i) idle.observe_instance(0, sample(i * 500'000, 0.99, 0, 10, 0));
  EXPECT_EQ(idle.instance_vote(0), Vote::kNone);
  // 0 turns the rule off.
  DemandMonitorConfig off;
  off.sustained_overload_samples = 0;
  DemandMonitor m2(off);
  for (std::int64_t i = 0; i < 10; ++i) m2.observe_instance(0, sample(i * 500'000, 0.96, 40, 80, 2));
  EXPECT_EQ(m2.instance_vote(0), Vote::kNone);
}

TEST(DemandMonitor, ThresholdsAreConfigurable) {
  DemandMonitorConfig c;
  c.drop_demand_threshold = 0.8;
  c.drop_votes_needed = 3;
  DemandMonitor m(c);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(m.instance_vote(0), Vote::kNone);
    m.observe_instance(0, sample(i * kPeriod, 0.85, 50, 40, 1));
  }
  EXPECT_EQ(m.instance_vote(0), Vote::kDrop);
}

TEST(DemandMonitor, LeastSquaresSlope) {
  std::deque<DemandSample> w;
  for (double y : {1.0, 2.0, 3.0}) w.push_back(calm(0, y));
  EXPECT_DOUBLE_EQ(least_squares_slope(w), 1.0);
  w.clear();
  // y = 0.9, 0.5, 0.7, 0.3: slope = sum((x-1.5)(y-0.6)) / 5 = (-1.5*0.3 + -0.5*-0.1 + 0.5*0.1 + 1.5*-0.3)/5 = -0.16
  for (double y : {0.9, 0.5, 0.7, 0.3}) w.push_back(calm(0, y));
  EXPECT_NEAR(least_squares_slope(w), -0.16, 1e-12);
}

// A monitor whose trend needs only 4 samples, so short curves exercise the restore rules.
DemandMonitorConfig short_trend() {
  DemandMonitorConfig c;
  c.min_trend_samples = 4;
  return c;
}

// The planner's trend: growth per sample over the newest k samples, only growth, only with k.
TEST(DemandMonitor, RecentGrowthPerSample) {
  std::deque<DemandSample> w;
  for (double d : {0.9, 0.2, 0.5, 0.8, 1.1}) w.push_back(calm(0, d));
  EXPECT_NEAR(recent_growth_per_sample(w, 4), 0.3, 1e-12);   // (1.1 - 0.2) / 3: the old 0.9 is out
  EXPECT_NEAR(recent_growth_per_sample(w, 5), 0.05, 1e-12);  // (1.1 - 0.9) / 4
  EXPECT_EQ(recent_growth_per_sample(w, 6), 0.0);            // too few samples: no trend
  w.push_back(calm(0, 0.1));
  EXPECT_EQ(recent_growth_per_sample(w, 2), 0.0);  // falling: no growth projected
}

TEST(DemandMonitor, RestoreOnlyWhenFallingLowAndNothingQueued) {
  DemandMonitor m(short_trend());
  // Demand falls 0.9 -> 0.2 in steps of 0.1.
  std::vector<double> curve = {0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2};
  std::vector<Vote> votes;
  for (std::size_t i = 0; i < curve.size(); ++i) {
    m.observe_group(7, calm(static_cast<std::int64_t>(i) * kPeriod, curve[i]));
    votes.push_back(m.group_vote(7));
  }
  // Eligible from 0.5 (index 4) on; two samples needed -> first vote at index 5.
  for (std::size_t i = 0; i < 5; ++i) EXPECT_EQ(votes[i], Vote::kNone) << i;
  for (std::size_t i = 5; i < votes.size(); ++i) EXPECT_EQ(votes[i], Vote::kRestore) << i;
}

TEST(DemandMonitor, ByDefaultAGroupStaysDroppedForAFullWindow) {
  DemandMonitor m;  // min_trend_samples = window_samples = 30
  std::vector<Vote> votes;
  for (int i = 0; i < 32; ++i) {
    m.observe_group(7, calm(i * kPeriod, std::max(0.1, 0.5 - 0.1 * i)));  // low and falling at once
    votes.push_back(m.group_vote(7));
  }
  // A trend exists from the 30th sample (index 29); two eligible samples -> first vote at 30.
  for (int i = 0; i < 30; ++i) EXPECT_EQ(votes[static_cast<std::size_t>(i)], Vote::kNone) << i;
  EXPECT_EQ(votes[30], Vote::kRestore);
}

TEST(DemandMonitor, NoRestoreWhileQueuedFlatOrRising) {
  // Falling and low, but requests queued.
  DemandMonitor queued(short_trend());
  for (int i = 0; i < 10; ++i) queued.observe_group(0, sample(i * kPeriod, 0.5 - 0.03 * i, 0, 1000, 1));
  EXPECT_EQ(queued.group_vote(0), Vote::kNone);
  // Pending blocks without a queue count also block it.
  DemandMonitor pending(short_trend());
  for (int i = 0; i < 10; ++i) pending.observe_group(0, sample(i * kPeriod, 0.5 - 0.03 * i, 5, 1000, 0));
  EXPECT_EQ(pending.group_vote(0), Vote::kNone);
  // Low but flat.
  DemandMonitor flat(short_trend());
  for (int i = 0; i < 10; ++i) flat.observe_group(0, calm(i * kPeriod, 0.3));
  EXPECT_EQ(flat.group_vote(0), Vote::kNone);
  // Low but rising.
  DemandMonitor rising(short_trend());
  for (int i = 0; i < 10; ++i) rising.observe_group(0, calm(i * kPeriod, 0.1 + 0.03 * i));
  EXPECT_EQ(rising.group_vote(0), Vote::kNone);
  // Too few samples for a trend.
  DemandMonitor young(short_trend());
  young.observe_group(0, calm(0, 0.4));
  young.observe_group(0, calm(kPeriod, 0.3));
  young.observe_group(0, calm(2 * kPeriod, 0.2));
  EXPECT_EQ(young.group_vote(0), Vote::kNone);
}

TEST(DemandMonitor, SlopeVersusLastBelowFirst) {
  // The two rules disagree on this curve: it ends just below where it started (last < first) but
  // its least-squares trend over the window is upward.
  std::vector<double> curve = {0.40, 0.10, 0.10, 0.10, 0.10, 0.45, 0.45, 0.45, 0.39, 0.39};
  DemandMonitorConfig slope_cfg = short_trend();
  DemandMonitorConfig lbf_cfg = short_trend();
  lbf_cfg.trend_rule = TrendRule::kLastBelowFirst;
  DemandMonitor slope(slope_cfg), lbf(lbf_cfg);
  for (std::size_t i = 0; i < curve.size(); ++i) {
    slope.observe_group(0, calm(static_cast<std::int64_t>(i) * kPeriod, curve[i]));
    lbf.observe_group(0, calm(static_cast<std::int64_t>(i) * kPeriod, curve[i]));
  }
  EXPECT_GT(least_squares_slope(slope.group_window(0)->samples), 0.0);
  EXPECT_EQ(slope.group_vote(0), Vote::kNone);
  EXPECT_EQ(lbf.group_vote(0), Vote::kRestore);
}

TEST(DemandMonitor, GroupSampleSumsMembers) {
  InstanceSnapshot a = snap(0, 0.5);  // 1600 of 3200
  InstanceSnapshot b = snap(1, 0.25);  // 800 of 3200
  b.kv_blocks_total = 1600;            // b: 800 of 1600
  a.pending_blocks = 10;
  b.pending_blocks = 5;
  a.num_queued = 1;
  b.num_queued = 2;
  DemandSample s = sample_of_group({&a, &b}, 42);
  EXPECT_EQ(s.time_us, 42);
  EXPECT_DOUBLE_EQ(s.demand, 2400.0 / 4800.0);
  EXPECT_EQ(s.pending_blocks, 15);
  EXPECT_EQ(s.free_blocks, a.kv_blocks_free + b.kv_blocks_free);
  EXPECT_EQ(s.num_queued, 3);
  // A dropped group's demand is against the capacity left once the lent blocks go back.
  EXPECT_DOUBLE_EQ(sample_of_group({&a, &b}, 42, 1600).demand, 2400.0 / 3200.0);
}

TEST(DemandMonitor, ResetForgetsHistory) {
  DemandMonitor m;
  m.observe_instance(3, overload(0));
  m.observe_instance(3, overload(kPeriod));
  EXPECT_EQ(m.instance_vote(3), Vote::kDrop);
  m.reset_instance(3);
  EXPECT_EQ(m.instance_vote(3), Vote::kNone);
  EXPECT_EQ(m.instance_window(3), nullptr);
}

}  // namespace
}  // namespace kun::cluster
