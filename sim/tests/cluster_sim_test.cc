// ClusterSim: a bursty trace under each policy, conservation and determinism.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>

#include "sim/cluster_sim.h"
#include "workload/generators.h"

namespace kun::sim {
namespace {

workload::Trace bursty_trace(std::uint64_t seed, double rate_rps = 40.0, std::int64_t duration_s = 12) {
  workload::GammaSpec spec;
  spec.rate_rps = rate_rps;
  spec.cv = 3.0;
  spec.duration_us = duration_s * 1'000'000;
  spec.lengths = workload::LengthModel::lognormal(800.0, 0.6, 300.0, 0.6);
  spec.seed = seed;
  return workload::clip_lengths(workload::generate_gamma(spec), 4096, 1024);
}

SimConfig base_config(cluster::Policy policy) {
  SimConfig c;
  c.gpu = "a100-80gb";
  c.link = "nvlink-a100";
  c.model_name = "llama-2-7b";
  c.num_instances = 4;
  c.policy = policy;
  c.scheduler.max_num_seqs = 256;
  c.scheduler.max_num_batched_tokens = 2048;
  c.scheduler.max_model_len = 4096;
  return c;
}

void expect_conservation(const SimReport& rep, const workload::Trace& trace) {
  ASSERT_EQ(rep.records.size(), trace.size());
  EXPECT_EQ(rep.report.total, static_cast<std::int64_t>(trace.size()));
  EXPECT_EQ(rep.report.completed, static_cast<std::int64_t>(trace.size()));
  for (const auto& r : rep.records) {
    EXPECT_EQ(r.outcome, workload::RequestOutcome::kOk) << r.index << " " << r.error;
    EXPECT_EQ(r.output_tokens, r.expected_output_tokens) << r.index;
    EXPECT_EQ(static_cast<std::int32_t>(r.token_times_us.size()), r.output_tokens) << r.index;
    EXPECT_GE(r.first_token_us, r.arrival_us);
    EXPECT_GE(r.finish_us, r.first_token_us);
    EXPECT_TRUE(std::is_sorted(r.token_times_us.begin(), r.token_times_us.end()));
  }
}

void print(const SimReport& rep, double wall_s) {
  std::printf("%-9s ttft p50 %8.1f p99 %9.1f ms | tpot mean %6.1f ms | queue p99 %9.1f ms | preempt %lld "
              "drops %lld restores %lld migr %lld | end %.1f s | wall %.2f s\n",
              rep.report.policy.c_str(), rep.report.ttft_ms.p50, rep.report.ttft_ms.p99, rep.report.tpot_ms.mean,
              rep.report.queue_ms.p99, static_cast<long long>(rep.counters.preemptions),
              static_cast<long long>(rep.counters.drops), static_cast<long long>(rep.counters.restores),
              static_cast<long long>(rep.counters.migrations), static_cast<double>(rep.end_us) / 1e6, wall_s);
}

SimReport run_or_die(const SimConfig& c, const workload::Trace& t) {
  const auto start = std::chrono::steady_clock::now();
  auto rep = run_simulation(c, t);
  EXPECT_TRUE(rep.ok()) << rep.status().to_string();
  if (!rep.ok()) return {};
  print(*rep, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return std::move(*rep);
}

TEST(ClusterSim, CapacityFromMemoryMinusParameters) {
  auto sim = ClusterSim::create(base_config(cluster::Policy::kRecompute));
  ASSERT_TRUE(sim.ok()) << sim.status().to_string();
  // 80 GB x 0.9 - 2 GiB reserve - 13.5 GB params = ~54 GB of KV, 512 KiB per token.
  const double tokens = static_cast<double>((*sim)->kv_blocks_per_instance()) / 32 * 16;
  EXPECT_GT(tokens, 95'000);
  EXPECT_LT(tokens, 110'000);
  SimConfig bad = base_config(cluster::Policy::kRecompute);
  bad.model_name = "llama-2-70b";  // 140 GB does not fit one 80 GB GPU
  EXPECT_EQ(ClusterSim::create(bad).status().code(), StatusCode::kInvalidArgument);
  bad = base_config(cluster::Policy::kRecompute);
  bad.gpu = "tpu";
  EXPECT_EQ(ClusterSim::create(bad).status().code(), StatusCode::kNotFound);
}

TEST(ClusterSim, LightLoadHasNoQueueing) {
  const auto trace = bursty_trace(3, 2.0, 10);
  const SimReport rep = run_or_die(base_config(cluster::Policy::kRecompute), trace);
  expect_conservation(rep, trace);
  EXPECT_EQ(rep.counters.preemptions, 0);
  EXPECT_LT(rep.report.ttft_ms.p99, 1000.0);
  EXPECT_GT(rep.report.tpot_ms.mean, 5.0);
  EXPECT_LT(rep.report.tpot_ms.mean, 60.0);
}

TEST(ClusterSim, BurstRecomputeQueuesAndPreemptsAndCompletes) {
  const auto trace = bursty_trace(1);
  SimConfig c = base_config(cluster::Policy::kRecompute);
  c.check_invariants_every_steps = 500;
  const SimReport rep = run_or_die(c, trace);
  expect_conservation(rep, trace);
  EXPECT_GT(rep.counters.preemptions_recompute, 0);
  EXPECT_GT(rep.counters.recomputed_tokens, 0);
  EXPECT_GT(rep.report.queue_ms.p99, 1000.0);
  EXPECT_GT(rep.report.ttft_ms.p99, rep.report.ttft_ms.p50);
  // Timeline: per-instance gauges present.
  EXPECT_FALSE(rep.timeline.rows.empty());
  EXPECT_EQ(rep.timeline.gauge_series.size(), 4u * 5u);
  const auto j = rep.to_json();
  EXPECT_EQ(j["policy"], "recompute");
  EXPECT_EQ(j["requests"]["completed"], static_cast<std::int64_t>(trace.size()));
}

void run_policy_burst(cluster::Policy p) {
  const auto trace = bursty_trace(1);
  const SimReport rep = run_or_die(base_config(p), trace);
  expect_conservation(rep, trace);
  if (p == cluster::Policy::kSwap) {
    EXPECT_GT(rep.counters.preemptions_swap, 0);
    EXPECT_GT(rep.counters.swap_bytes, 0);
  }
  if (p == cluster::Policy::kKunServe) {
    EXPECT_GT(rep.counters.drops, 0);
    EXPECT_GT(rep.counters.param_bytes_dropped, 0);
    EXPECT_EQ(rep.counters.restores, rep.counters.drops);  // every group split back by the end
    EXPECT_GT(rep.counters.weight_bytes_restored, 0);
  }
}

TEST(ClusterSim, SwapCompletesTheBurst) { run_policy_burst(cluster::Policy::kSwap); }
TEST(ClusterSim, MigrateCompletesTheBurst) { run_policy_burst(cluster::Policy::kMigrate); }
TEST(ClusterSim, KunServeDropsRestoresAndCompletesTheBurst) { run_policy_burst(cluster::Policy::kKunServe); }

TEST(ClusterSim, DeterministicForASeed) {
  const auto trace = bursty_trace(7, 40.0, 4);
  for (auto p : {cluster::Policy::kRecompute, cluster::Policy::kKunServe}) {
    const SimReport a = run_or_die(base_config(p), trace);
    const SimReport b = run_or_die(base_config(p), trace);
    EXPECT_EQ(a.to_json().dump(), b.to_json().dump());
    ASSERT_EQ(a.records.size(), b.records.size());
    for (std::size_t i = 0; i < a.records.size(); ++i) EXPECT_EQ(a.records[i].token_times_us, b.records[i].token_times_us);
    EXPECT_EQ(workload::timeline_to_csv(a.timeline), workload::timeline_to_csv(b.timeline));
  }
}

}  // namespace
}  // namespace kun::sim
