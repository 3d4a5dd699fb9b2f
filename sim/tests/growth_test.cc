// Planner growth and the sustained-overload vote in the simulator: under a long overload fused
// groups grow 2 -> 4 -> 8 (carried out as drop plans over the absorbed groups), every request
// completes once, and capping groups at 2 members turns growth off; a decode-heavy overload whose
// queue never makes "pending >= free" hold on two consecutive samples still drops.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "sim/cluster_sim.h"
#include "workload/generators.h"

namespace kun::sim {
namespace {

workload::Trace trace(double rate_rps, std::int64_t duration_s, double prompt_mean, double output_mean, std::uint64_t seed,
                      double cv = 3.0) {
  workload::GammaSpec spec;
  spec.rate_rps = rate_rps;
  spec.cv = cv;
  spec.duration_us = duration_s * 1'000'000;
  spec.lengths = workload::LengthModel::lognormal(prompt_mean, 0.6, output_mean, 0.6);
  spec.seed = seed;
  return workload::clip_lengths(workload::generate_gamma(spec), 4096, 2048);
}

SimConfig config(std::int64_t instances, const std::string& model) {
  SimConfig c;
  c.gpu = "a100-80gb";
  c.link = "nvlink-a100";
  c.model_name = model;
  c.num_instances = instances;
  c.policy = cluster::Policy::kKunServe;
  c.scheduler.max_num_seqs = 256;
  c.scheduler.max_num_batched_tokens = 2048;
  c.scheduler.max_model_len = 4096;
  return c;
}

void expect_all_complete(const SimReport& rep, const workload::Trace& t) {
  ASSERT_EQ(rep.records.size(), t.size());
  EXPECT_EQ(rep.report.completed, static_cast<std::int64_t>(t.size()));
  for (const auto& r : rep.records) {
    EXPECT_EQ(r.outcome, workload::RequestOutcome::kOk) << r.index << " " << r.error;
    EXPECT_EQ(r.output_tokens, r.expected_output_tokens) << r.index;
  }
}

std::int64_t largest_group(const SimReport& rep) {
  std::int64_t largest = 0;
  for (const cluster::TransitionRecord& t : rep.transitions) {
    if (t.kind != "drop" && t.kind != "grow") continue;
    std::int64_t members = 0;
    for (std::size_t p = t.plan.find(" m"); p != std::string::npos; p = t.plan.find(" m", p + 1)) ++members;
    largest = std::max(largest, members);
  }
  return largest;
}

TEST(SimGrowth, OverloadedGroupsGrowAndEveryRequestCompletes) {
  const workload::Trace t = trace(14.0, 30, 1500, 300, 1);
  SimConfig c = config(8, "llama-2-13b");
  auto grown = run_simulation(c, t);
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  c.coordinator.planner.max_degree = 2;
  auto capped = run_simulation(c, t);
  ASSERT_TRUE(capped.ok()) << capped.status().to_string();
  std::printf("grow: drops %lld grows %lld largest %lld p99 ttft %.0f ms | capped at 2: drops %lld largest %lld p99 %.0f ms\n",
              static_cast<long long>(grown->counters.drops), static_cast<long long>(grown->counters.grows),
              static_cast<long long>(largest_group(*grown)), grown->report.ttft_ms.p99,
              static_cast<long long>(capped->counters.drops), static_cast<long long>(largest_group(*capped)),
              capped->report.ttft_ms.p99);
  expect_all_complete(*grown, t);
  expect_all_complete(*capped, t);
  EXPECT_GT(grown->counters.grows, 0);
  EXPECT_GT(largest_group(*grown), 2);
  EXPECT_EQ(capped->counters.grows, 0);
  EXPECT_EQ(largest_group(*capped), 2);
  bool grow_record = false;
  for (const auto& r : grown->transitions) grow_record = grow_record || r.kind == "grow";
  EXPECT_TRUE(grow_record);
}

// First "drop requested" time in the report's events ("<us> drop requested group ..."), -1 if none.
std::int64_t first_drop_us(const SimReport& rep) {
  for (const std::string& e : rep.events) {
    if (e.find(" drop requested") != std::string::npos) return std::stoll(e.substr(0, e.find(' ')));
  }
  return -1;
}

TEST(SimSustainedOverload, DropsAt95PercentWithPendingBelowFree) {
  // Two instances, each with 8 running requests (max_num_seqs) decoding long outputs and a queue
  // that makes demand 96 % of its pool at the start. While demand < 100 %, pending < free (the
  // queue would fit; it waits for a sequence slot), so "pending >= free" holds on no sample
  // until the running requests' growth pushes demand past 100 % (about 0.05 x pool / 8 decode
  // steps later). The sustained-overload vote drops 3 s after the overload starts.
  SimConfig c = config(2, "llama-2-7b");
  c.scheduler.max_num_seqs = 8;
  c.route = cluster::RoutePolicy::kRoundRobin;
  c.coordinator.enable_restore = false;
  auto probe = ClusterSim::create(c);
  ASSERT_TRUE(probe.ok()) << probe.status().to_string();
  const std::int64_t pool_tokens =
      (*probe)->kv_blocks_per_instance() / (*probe)->cost().model().num_layers * c.block_size_tokens;
  constexpr std::int32_t kPrompt = 512, kOutput = 1500;
  const std::int64_t per_instance = static_cast<std::int64_t>(0.96 * static_cast<double>(pool_tokens)) / kPrompt;
  ASSERT_GT(per_instance, 8);
  workload::Trace t;
  for (std::int64_t i = 0; i < 2 * per_instance; ++i) t.requests.push_back({0, kPrompt, kOutput});
  const double demand0 = static_cast<double>(per_instance * kPrompt) / static_cast<double>(pool_tokens);
  ASSERT_GE(demand0, 0.95);
  ASSERT_LT(demand0, 0.965);
  c.coordinator.monitor.sustained_overload_samples = 0;
  auto off = run_simulation(c, t);
  ASSERT_TRUE(off.ok()) << off.status().to_string();
  c.coordinator.monitor.sustained_overload_samples = 6;
  auto on = run_simulation(c, t);
  ASSERT_TRUE(on.ok()) << on.status().to_string();
  const std::int64_t off_us = first_drop_us(*off), on_us = first_drop_us(*on);
  std::printf("pool %lld tokens, %lld requests per instance (demand %.3f): first drop at %.1f s with the sustained vote, "
              "%.1f s without\n",
              static_cast<long long>(pool_tokens), static_cast<long long>(per_instance), demand0,
              static_cast<double>(on_us) / 1e6, static_cast<double>(off_us) / 1e6);
  expect_all_complete(*on, t);
  ASSERT_GT(on_us, 0);
  EXPECT_LE(on_us, 5'000'000);  // 6 samples at 0.5 s after the prefills
  // Without it, the drop waits until demand passes 100 % (or never comes).
  EXPECT_TRUE(off_us < 0 || off_us >= on_us + 2'000'000) << "off " << off_us << " on " << on_us;
}

std::int64_t members_of(const cluster::TransitionRecord& t) {
  std::int64_t members = 0;
  for (std::size_t p = t.plan.find(" m"); p != std::string::npos; p = t.plan.find(" m", p + 1)) ++members;
  return members;
}

// The planner's demand trend (cluster::PlannerConfig::trend_horizon_samples, on by default): a
// burst still arriving at the drop gets a group sized for the demand a few seconds ahead (more
// than 2 members at once), where the artifact's sizing (horizon 0) forms pairs first and grows
// them later; every request completes either way.
TEST(SimGrowth, TrendSizesTheFirstGroupsForTheArrivingBurst) {
  const workload::Trace t = trace(14.0, 30, 1500, 300, 1);
  SimConfig c = config(8, "llama-2-13b");
  ASSERT_GT(c.coordinator.planner.trend_horizon_samples, 0.0);  // the default
  auto trend = run_simulation(c, t);
  ASSERT_TRUE(trend.ok()) << trend.status().to_string();
  c.coordinator.planner.trend_horizon_samples = 0.0;
  auto now = run_simulation(c, t);
  ASSERT_TRUE(now.ok()) << now.status().to_string();
  // Largest group a drop (not a growth) formed, and after how many transitions a group of 4 existed.
  const auto drops_largest = [](const SimReport& rep) {
    std::int64_t largest = 0;
    for (const auto& r : rep.transitions) {
      if (r.kind == "drop") largest = std::max(largest, members_of(r));
    }
    return largest;
  };
  const auto first_four = [](const SimReport& rep) {
    for (std::size_t i = 0; i < rep.transitions.size(); ++i) {
      if ((rep.transitions[i].kind == "drop" || rep.transitions[i].kind == "grow") && members_of(rep.transitions[i]) >= 4) {
        return static_cast<std::int64_t>(i);
      }
    }
    return static_cast<std::int64_t>(rep.transitions.size());
  };
  std::printf("trend: largest at a drop %lld, first group of 4 at transition %lld, p99 ttft %.0f ms | horizon 0: %lld, %lld, "
              "%.0f ms\n",
              static_cast<long long>(drops_largest(*trend)), static_cast<long long>(first_four(*trend)),
              trend->report.ttft_ms.p99, static_cast<long long>(drops_largest(*now)),
              static_cast<long long>(first_four(*now)), now->report.ttft_ms.p99);
  expect_all_complete(*trend, t);
  expect_all_complete(*now, t);
  EXPECT_GT(drops_largest(*trend), 2);  // here g = 4 at the third drop (16-17.5 s)
  EXPECT_EQ(drops_largest(*now), 2);    // pairs, grown to 4 later
  EXPECT_LT(first_four(*trend), first_four(*now));
  EXPECT_LT(trend->report.ttft_ms.p99, now->report.ttft_ms.p99);  // 3.2 s against 13.2 s here
}

}  // namespace
}  // namespace kun::sim
