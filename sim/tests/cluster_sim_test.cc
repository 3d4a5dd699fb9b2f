// ClusterSim: a bursty trace under each policy, conservation and determinism.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>

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

TEST(ClusterSim, TensorParallelInstancesSplitWeightsAndKvPerGpu) {
  // Llama-2-70B does not fit one A100-80GB; TP 4 puts 1/4 of it on each GPU.
  SimConfig c = base_config(cluster::Policy::kKunServe);
  c.model_name = "llama-2-70b";
  c.tp = 4;
  c.num_instances = 2;
  auto sim = ClusterSim::create(c);
  ASSERT_TRUE(sim.ok()) << sim.status().to_string();
  const MemoryPlan m = (*sim)->memory_plan();
  // ~69 G parameters x 2 bytes / 4 GPUs (layers page-rounded).
  EXPECT_GT(m.weight_bytes_per_gpu, 33'000'000'000);
  EXPECT_LT(m.weight_bytes_per_gpu, 36'500'000'000);
  // 80 layers x K,V x 8 KV heads x 128 x 2 bytes / 4 GPUs = 80 KiB per token per GPU.
  EXPECT_EQ(m.kv_bytes_per_token, 80 * 2 * 1024 * 2 / 4);
  // What is left of 80 GB x 0.9 - 2 GiB after the weights is KV.
  EXPECT_NEAR(static_cast<double>(m.kv_bytes_per_gpu + m.weight_bytes_per_gpu),
              static_cast<double>(m.usable_bytes_per_gpu), 0.01 * static_cast<double>(m.usable_bytes_per_gpu));
  EXPECT_EQ(m.kv_tokens_per_instance, m.kv_bytes_per_gpu / m.kv_bytes_per_token / 16 * 16);
  // A group of 2 frees half of each member's layer weights for KV.
  ASSERT_EQ(m.growth.size(), 1u);
  EXPECT_EQ(m.growth[0].group_size, 2);
  EXPECT_NEAR(m.growth[0].growth,
              1.0 + static_cast<double>(40 * m.layer_bytes_per_gpu) / static_cast<double>(m.kv_bytes_per_gpu), 0.01);
  // TP 3 does not divide 64 heads; TP 16 has no all-reduce profile.
  c.tp = 3;
  EXPECT_EQ(ClusterSim::create(c).status().code(), StatusCode::kInvalidArgument);
  c.tp = 16;
  EXPECT_EQ(ClusterSim::create(c).status().code(), StatusCode::kInvalidArgument);
  // The TP-4 instances serve long generations until their KV runs out, drop into a 2-stage
  // pipeline of TP-4 stages, and restore once it drained.
  c.tp = 4;
  c.check_invariants_every_steps = 2000;
  workload::Trace trace;
  for (std::int64_t i = 0; i < 300; ++i) trace.requests.push_back({i * 100'000, 1000, 3000});
  const SimReport rep = run_or_die(c, trace);
  expect_conservation(rep, trace);
  EXPECT_GT(rep.counters.drops, 0);
  EXPECT_EQ(rep.counters.restores, rep.counters.drops);
  // Each member dropped half of its 80 layers: 40 layers' weights over its 4 GPUs.
  EXPECT_EQ(rep.counters.param_bytes_dropped, rep.counters.drops * 2 * 40 * m.layer_bytes_per_gpu * 4);
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

double mean_tpot_ms(const SimReport& rep, const std::vector<std::int64_t>& ids) {
  double sum = 0.0;
  std::int64_t n = 0;
  for (std::int64_t i : ids) {
    const auto& r = rep.records[static_cast<std::size_t>(i)];
    if (r.token_times_us.size() < 2) continue;
    sum += static_cast<double>(r.token_times_us.back() - r.token_times_us.front()) / 1000.0 /
           static_cast<double>(r.token_times_us.size() - 1);
    ++n;
  }
  return n > 0 ? sum / static_cast<double>(n) : 0.0;
}

void print_stale(const SimReport& rep) {
  const auto& c = rep.counters;
  std::printf("  %-17s stale %zu kept %lld recomputed %lld (%lld tokens) | restore kept %lld | exchanged %.1f MB "
              "gathered %.1f MB (%.1f at split) | remote attn %.1f MB %.1f ms | exchange %s ms | stale tpot %.2f ms\n",
              rep.stale_kv.c_str(), rep.stale_requests.size(), static_cast<long long>(c.stale_requests_kept_kv),
              static_cast<long long>(c.stale_requests_recomputed), static_cast<long long>(c.stale_tokens_recomputed),
              static_cast<long long>(c.restore_requests_kept_kv), static_cast<double>(c.kv_bytes_exchanged) / 1e6,
              static_cast<double>(c.kv_bytes_gathered) / 1e6, static_cast<double>(c.kv_bytes_gathered_at_split) / 1e6,
              static_cast<double>(c.remote_attention_bytes) / 1e6, static_cast<double>(c.remote_attention_us) / 1e3,
              c.exchange_ms.empty() ? "-" : std::to_string(c.exchange_ms.front()).c_str(),
              mean_tpot_ms(rep, rep.stale_requests));
}

void run_policy_burst(cluster::Policy p) {
  const auto trace = bursty_trace(1);
  SimConfig c = base_config(p);
  // Whole restores: with shrinking the group of 4 halves at 31.5 s and its halves' trend windows
  // outlast the trace (sim_shrink_test covers shrinking).
  c.coordinator.planner.shrink_groups = false;
  const SimReport rep = run_or_die(c, trace);
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
    print_stale(rep);
  }
}

TEST(ClusterSim, SwapCompletesTheBurst) { run_policy_burst(cluster::Policy::kSwap); }
TEST(ClusterSim, MigrateCompletesTheBurst) { run_policy_burst(cluster::Policy::kMigrate); }
TEST(ClusterSim, KunServeDropsRestoresAndCompletesTheBurst) { run_policy_burst(cluster::Policy::kKunServe); }

// Round-robin routing with every 4th request long: instance 0 runs out of KV while the others
// idle, so `migrate` moves requests away from it, at its step boundaries (it is always mid-step
// under load), running ones with their KV.
workload::Trace skewed_trace() {
  workload::Trace t;
  t.name = "skewed";
  for (std::int64_t i = 0; i < 160; ++i) {
    const bool long_one = i % 4 == 0;
    t.requests.push_back({i * 62'500, long_one ? 3000 : 200, long_one ? 1000 : 50});
  }
  return t;
}

TEST(ClusterSim, MigrateMovesRunningRequestsWithTheirKvUnderLoad) {
  const auto trace = skewed_trace();
  SimConfig c = base_config(cluster::Policy::kMigrate);
  c.route = cluster::RoutePolicy::kRoundRobin;
  c.check_invariants_every_steps = 200;
  const SimReport rep = run_or_die(c, trace);
  expect_conservation(rep, trace);  // every request ends with exactly its output tokens
  const auto& k = rep.counters;
  std::printf("  planned %lld done %lld with kv %lld skipped %lld, %.1f MB\n", static_cast<long long>(k.migrations_planned),
              static_cast<long long>(k.migrations), static_cast<long long>(k.migrations_with_kv),
              static_cast<long long>(k.migrations_skipped), static_cast<double>(k.migration_bytes) / 1e6);
  EXPECT_GT(k.migrations_planned, 0);
  EXPECT_GT(k.migrations_with_kv, 0);
  EXPECT_EQ(k.migrations + k.migrations_skipped, k.migrations_planned);
  // The KV crossed the link (whole blocks of every layer: 32 layers of 16 tokens x K,V x 4096 x
  // bf16) and nobody re-prefilled because of a move: no transition recompute.
  const std::int64_t all_layers_block_bytes = 32 * c.block_size_tokens * 2 * 4096 * 2;
  EXPECT_GE(k.migration_bytes, k.migrations_with_kv * all_layers_block_bytes);
  EXPECT_EQ(k.migration_bytes % all_layers_block_bytes, 0);
  EXPECT_EQ(k.transition_recomputed_tokens, 0);
  // Against recompute on the same skew, migrating relieves instance 0: fewer tokens recomputed.
  SimConfig r = base_config(cluster::Policy::kRecompute);
  r.route = cluster::RoutePolicy::kRoundRobin;
  const SimReport base = run_or_die(r, trace);
  EXPECT_LT(k.recomputed_tokens, base.counters.recomputed_tokens);
}

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

// ---- stale requests (DESIGN.md 3.5): recompute / remote attention / live KV exchange ----

// Two instances with a small KV pool (30 % of the GPU for parameters + KV: ~16 K tokens each) and
// a burst of long requests: the pair fuses (g = 2) while many requests run, and splits again once
// the burst has drained.
SimConfig stale_config(cluster::StaleKvStrategy strategy) {
  SimConfig c = base_config(cluster::Policy::kKunServe);
  c.num_instances = 2;
  c.gpu_memory_utilization = 0.3;
  c.stale_kv = strategy;
  c.coordinator.monitor.min_trend_samples = 6;
  c.check_invariants_every_steps = 200;
  return c;
}

workload::Trace stale_trace() {
  workload::GammaSpec spec;
  spec.rate_rps = 12.0;
  spec.cv = 1.0;
  spec.duration_us = 6'000'000;
  spec.lengths = workload::LengthModel::lognormal(600.0, 0.4, 400.0, 0.4);
  spec.seed = 11;
  return workload::clip_lengths(workload::generate_gamma(spec), 2048, 1024);
}

class StaleKv : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const auto trace = stale_trace();
    for (auto st : {cluster::StaleKvStrategy::kRecompute, cluster::StaleKvStrategy::kRemoteAttention,
                    cluster::StaleKvStrategy::kExchange}) {
      reports_[static_cast<int>(st)] = run_or_die(stale_config(st), trace);
      print_stale(reports_[static_cast<int>(st)]);
    }
  }
  static const SimReport& report(cluster::StaleKvStrategy st) { return reports_[static_cast<int>(st)]; }
  static SimReport reports_[3];
};
SimReport StaleKv::reports_[3];

TEST_F(StaleKv, EveryRequestCompletesOnceUnderEachStrategy) {
  const auto trace = stale_trace();
  for (auto st : {cluster::StaleKvStrategy::kRecompute, cluster::StaleKvStrategy::kRemoteAttention,
                  cluster::StaleKvStrategy::kExchange}) {
    SCOPED_TRACE(cluster::stale_kv_strategy_name(st));
    const SimReport& rep = report(st);
    expect_conservation(rep, trace);  // exactly max_tokens tokens each, one finish, in order
    EXPECT_GT(rep.counters.drops, 0);
    EXPECT_EQ(rep.counters.restores, rep.counters.drops);
    EXPECT_FALSE(rep.stale_requests.empty());
    EXPECT_EQ(rep.to_json()["stale_kv"], cluster::stale_kv_strategy_name(st));
    EXPECT_EQ(rep.to_json()["stale_requests"]["requests"], rep.stale_requests.size());
  }
}

TEST_F(StaleKv, RunningRequestsKeepTheirKvWithRoom) {
  const SimReport& rc = report(cluster::StaleKvStrategy::kRecompute);
  EXPECT_GT(rc.counters.stale_requests_recomputed, 0);
  EXPECT_GT(rc.counters.stale_tokens_recomputed, 0);
  EXPECT_EQ(rc.counters.stale_requests_kept_kv, 0);
  EXPECT_EQ(rc.counters.restore_requests_kept_kv, 0);
  EXPECT_EQ(rc.counters.kv_bytes_exchanged + rc.counters.kv_bytes_gathered + rc.counters.remote_attention_bytes, 0);
  for (auto st : {cluster::StaleKvStrategy::kRemoteAttention, cluster::StaleKvStrategy::kExchange}) {
    SCOPED_TRACE(cluster::stale_kv_strategy_name(st));
    const SimReport& rep = report(st);
    EXPECT_EQ(rep.counters.stale_requests_recomputed, 0);
    EXPECT_EQ(rep.counters.stale_tokens_recomputed, 0);
    EXPECT_GT(rep.counters.stale_requests_kept_kv, 0);
    EXPECT_GT(rep.counters.restore_requests_kept_kv, 0);
    EXPECT_GT(rep.counters.remote_attention_bytes, 0);
    EXPECT_GT(rep.counters.kv_bytes_gathered, 0);
    // Less prefill work than recompute's: the stale requests' tokens are not computed again.
    EXPECT_LT(rep.counters.recomputed_tokens, rc.counters.recomputed_tokens);
  }
  const SimReport& ra = report(cluster::StaleKvStrategy::kRemoteAttention);
  const SimReport& ex = report(cluster::StaleKvStrategy::kExchange);
  EXPECT_EQ(ra.counters.kv_bytes_exchanged, 0);
  EXPECT_TRUE(ra.counters.exchange_ms.empty());
  // Exchange moves (g-1)/g = half of each stale request's KV at g = 2: between a quarter of the KV
  // the kept requests had (short of the stale ones finishing first) and all of it.
  EXPECT_GT(ex.counters.kv_bytes_exchanged, 0);
  ASSERT_EQ(ex.counters.exchange_ms.size(), static_cast<std::size_t>(ex.counters.drops));
  EXPECT_LT(ex.counters.exchange_ms.front(), 2000.0);
  EXPECT_LT(ex.counters.remote_attention_bytes, ra.counters.remote_attention_bytes);
}

TEST_F(StaleKv, GatherTimeoutCopiesAtTheSplitWithoutRecompute) {
  // No time for the live gather: the split waits for the weights only and copies what is not home
  // yet stop-and-copy; the requests still keep their KV. (Over NVLink the gather would finish
  // within the step in flight at the restore; over HDR InfiniBand it queues behind the weights.)
  SimConfig c = stale_config(cluster::StaleKvStrategy::kExchange);
  c.link = "ib-hdr";
  c.restore_gather_timeout_us = 0;
  const auto trace = stale_trace();
  const SimReport rep = run_or_die(c, trace);
  print_stale(rep);
  expect_conservation(rep, trace);
  EXPECT_EQ(rep.counters.stale_requests_recomputed, 0);
  EXPECT_GT(rep.counters.restore_requests_kept_kv, 0);
  EXPECT_GT(rep.counters.kv_bytes_gathered_at_split, 0);
  EXPECT_EQ(rep.counters.kv_bytes_gathered, rep.counters.kv_bytes_gathered_at_split);
  // Deterministic, like every simulation.
  EXPECT_EQ(rep.to_json().dump(), run_or_die(c, trace).to_json().dump());
}

TEST_F(StaleKv, LookaheadKeepsTheFusedPipelineBusy) {
  // The same run without lookahead batch formation: the first virtual engine takes what fits, the
  // others get little, and rounds are bound by one micro-batch's trip through both stages.
  const SimReport& with = report(cluster::StaleKvStrategy::kExchange);
  SimConfig c = stale_config(cluster::StaleKvStrategy::kExchange);
  c.scheduler.balance_virtual_engines = false;
  const auto trace = stale_trace();
  const SimReport without = run_or_die(c, trace);
  expect_conservation(without, trace);
  const double b_with = with.to_json()["sim"]["bubble_fraction"], b_without = without.to_json()["sim"]["bubble_fraction"];
  std::printf("bubble fraction: lookahead %.3f, without %.3f\n", b_with, b_without);
  EXPECT_GT(b_with, 0.0);
  EXPECT_LT(b_with, 0.25);
  // Here the KV pool, not the batch bound, limits what the first virtual engine takes, so the
  // others still get work and the gap is moderate (0.13 vs 0.19); on the builtin burst with
  // long outputs it is 0.09 vs 0.54 (see the closing note).
  EXPECT_GT(b_without, 1.2 * b_with);
}

TEST_F(StaleKv, KeepingKvServesStaleRequestsFasterThanRecompute) {
  const SimReport& rc = report(cluster::StaleKvStrategy::kRecompute);
  const SimReport& ra = report(cluster::StaleKvStrategy::kRemoteAttention);
  const SimReport& ex = report(cluster::StaleKvStrategy::kExchange);
  EXPECT_GT(mean_tpot_ms(rc, rc.stale_requests), mean_tpot_ms(ra, ra.stale_requests));
  EXPECT_GT(mean_tpot_ms(rc, rc.stale_requests), mean_tpot_ms(ex, ex.stale_requests));
  // Remote attention keeps charging the stages for the whole fused period; the exchange only
  // until the stale KV has moved (a few rounds). Which of the two ends with the lower stale TPOT
  // depends on how the preemptions fall in this small burst, so the test compares the cause.
  EXPECT_GT(ra.counters.remote_attention_us, 10 * ex.counters.remote_attention_us);
}

// The executor's remote-attention term: zero when every layer's KV is on the stage that runs it
// (after the exchange), and exactly one q/k/v message out and one output message back per
// (layer, holder) otherwise.
TEST(SimExecutorRemoteAttention, ChargesMisplacedLayersOnly) {
  auto m = sim_model_config("llama-2-7b");
  ASSERT_TRUE(m.ok());
  const CostModel cost(*gpu_spec("a100-80gb"), *m);
  SimExecutorConfig ec;
  ec.stage_layers = {16, 16};
  ec.stage_link = *link_spec("nvlink-a100");
  ec.host_link = *link_spec("pcie4");
  ec.vocab_size = m->vocab_size;
  const SimExecutor ex(&cost, ec);
  const auto plan = [&](std::int32_t holder_of_all) {  // -1: each layer on its stage
    engine::StepPlan p;
    for (std::int64_t r = 0; r < 3; ++r) {
      engine::ScheduledSequence s;
      s.id = RequestId(r);
      s.start_pos = 700;
      s.tokens = {1};
      s.sample = true;
      for (std::int32_t l = 0; l < 32; ++l) {
        engine::LayerBlockList list;
        list.layer = l;
        list.device = r == 0 && holder_of_all >= 0 ? holder_of_all : (l < 16 ? 0 : 1);
        s.kv.push_back(list);
      }
      p.sequences.push_back(std::move(s));
    }
    return p;
  };
  const engine::StepPlan home = plan(-1), stale = plan(0);
  EXPECT_EQ(ex.remote_attention(home).bytes, 0);
  EXPECT_EQ(ex.remote_attention(home).stage_us, 0.0);
  engine::StepPlan no_kv = home;
  for (auto& s : no_kv.sequences) s.kv.clear();
  EXPECT_EQ(ex.duration_us(home), ex.duration_us(no_kv));
  // Request 0 keeps all 32 layers on device 0: stage 1's 16 layers reach it remotely.
  const std::int64_t per_layer = cost.remote_attention_send_bytes(1) + cost.remote_attention_return_bytes(1);
  EXPECT_EQ(per_layer, (32 + 2 * 32 + 32) * 128 * 2);
  EXPECT_EQ(ex.remote_attention(stale).bytes, 16 * per_layer);
  const double msg_us = transfer_us(ec.stage_link, cost.remote_attention_send_bytes(1)) +
                        transfer_us(ec.stage_link, cost.remote_attention_return_bytes(1));
  EXPECT_NEAR(ex.remote_attention(stale).stage_us, 16 * msg_us, 1e-6);
  EXPECT_GT(ex.duration_us(stale), ex.duration_us(home));
  EXPECT_LE(ex.duration_us(stale), ex.duration_us(home) + static_cast<std::int64_t>(std::ceil(16 * msg_us)) + 1);
}

}  // namespace
}  // namespace kun::sim
