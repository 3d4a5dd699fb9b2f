// Partial restore in the simulator: a group of 8 formed under load shrinks by halves as its demand
// falls (8 -> 4 -> 2, then restores 2 -> 1), never restoring a group of 4 or more at once; every
// request completes exactly once, and with shrinking turned off the group restores whole.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "sim/cluster_sim.h"
#include "workload/generators.h"

namespace kun::sim {
namespace {

std::int64_t members_in(const std::string& plan) {
  // "... members {a,b,c} ...": count the ids of the first brace list.
  const std::size_t open = plan.find('{');
  const std::size_t close = plan.find('}', open);
  if (open == std::string::npos || close == std::string::npos || close == open + 1) return 0;
  std::int64_t n = 1;
  for (std::size_t i = open; i < close; ++i) n += plan[i] == ',' ? 1 : 0;
  return n;
}

workload::Trace burst() {
  workload::GammaSpec spec;
  spec.rate_rps = 40.0;
  spec.cv = 1.0;
  spec.duration_us = 6'000'000;
  spec.lengths = workload::LengthModel::lognormal(800, 0.5, 400, 1.0);
  spec.seed = 3;
  workload::Trace t = workload::clip_lengths(workload::generate_gamma(spec), 4096, 2048);
  // Then long generations finishing one by one (outputs 1000 + 64 i tokens), so demand keeps
  // falling for most of a minute: long enough for each new half group's trend window to vote.
  const std::int64_t after = t.requests.empty() ? 0 : t.requests.back().arrival_us + 1000;
  for (std::int32_t i = 0; i < 16; ++i) t.requests.push_back({after + i * 1000, 64, 1000 + 64 * i});
  return t;
}

SimConfig config() {
  SimConfig c;
  c.gpu = "a100-80gb";
  c.link = "nvlink-a100";
  c.model_name = "llama-2-7b";
  c.num_instances = 8;
  c.policy = cluster::Policy::kKunServe;
  c.allowed_degrees = {2, 4, 8};
  c.scheduler.max_num_seqs = 256;
  c.scheduler.max_model_len = 4096;
  c.kv_tokens_per_instance = 20'000;  // so the burst's demand is visible against the pool
  c.coordinator.planner.grow_groups = false;
  c.coordinator.monitor.min_trend_samples = 10;  // a trend over 5 s (the artifact's window: 15 s)
  c.script = {SimConfig::ScriptedTransition{500'000, {0, 1, 2, 3, 4, 5, 6, 7}, -1}};
  return c;
}

TEST(SimShrink, AGroupOfEightShrinksByHalvesAsDemandFalls) {
  const workload::Trace t = burst();
  SimConfig c = config();
  auto rep = run_simulation(c, t);
  ASSERT_TRUE(rep.ok()) << rep.status().to_string();
  ASSERT_EQ(rep->report.completed, static_cast<std::int64_t>(t.size()));
  for (const auto& r : rep->records) EXPECT_EQ(r.output_tokens, r.expected_output_tokens) << r.index;
  std::int64_t shrinks = 0, first_shrink_members = 0;
  std::string sequence;
  for (const cluster::TransitionRecord& tr : rep->transitions) {
    const std::int64_t m = members_in(tr.plan);
    sequence += " " + tr.kind + "(" + std::to_string(m) + ")";
    if (tr.kind == "shrink") {
      if (shrinks++ == 0) {
        first_shrink_members = m;
        // Even stages, then odd: the group of 8 over instances 0..7 in stage order.
        EXPECT_NE(tr.plan.find("into {0,2,4,6} + {1,3,5,7}"), std::string::npos) << tr.plan;
      }
    }
    if (tr.kind == "restore") {
      EXPECT_LE(m, 2) << "a group of " << m << " restored whole: " << tr.plan;
    }
  }
  std::printf("transitions:%s\n", sequence.c_str());
  EXPECT_EQ(rep->counters.shrinks, shrinks);
  EXPECT_GE(shrinks, 3);  // 8 -> 4 + 4, then each 4 -> 2 + 2
  EXPECT_EQ(first_shrink_members, 8);
  EXPECT_GE(rep->counters.restores, 1);  // groups of 2 then restore as before: 8 -> 4 -> 2 -> 1

  // Shrinking off: the group of 8 restores whole.
  c.coordinator.planner.shrink_groups = false;
  auto whole = run_simulation(c, t);
  ASSERT_TRUE(whole.ok()) << whole.status().to_string();
  ASSERT_EQ(whole->report.completed, static_cast<std::int64_t>(t.size()));
  EXPECT_EQ(whole->counters.shrinks, 0);
  bool restored_eight = false;
  for (const cluster::TransitionRecord& tr : whole->transitions) {
    restored_eight = restored_eight || (tr.kind == "restore" && members_in(tr.plan) == 8);
  }
  EXPECT_TRUE(restored_eight);
}

}  // namespace
}  // namespace kun::sim
