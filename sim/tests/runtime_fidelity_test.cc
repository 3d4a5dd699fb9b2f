// The simulator does what the in-process runtime does where the validation against
// `bench --in-process` found it did not (sim/README.md, "Validation"): the router and the
// coordinator see what the engines last published plus the requests submitted since (arrivals
// during a step wait in the engine's inbox), a step's paced swap copies each cost the host's
// wake-up again, and the monitor re-arms from when its tick ran, so its ticks drift later on a
// busy host.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"
#include "sim/cluster_sim.h"
#include "sim/device_profile.h"
#include "sim/sim_executor.h"

namespace kun::sim {
namespace {

// Output tokens sampled on each instance (independent instances' steps), from the step log.
std::map<std::int64_t, std::int64_t> sampled_by_instance(const SimReport& r) {
  std::map<std::int64_t, std::int64_t> out;
  for (const RecordedStep& s : r.steps) {
    if (s.unit_devices == 1) out[s.first_instance] += s.sampled;
  }
  return out;
}

SimConfig two_gpus() {
  SimConfig c;
  c.gpu = "a100-80gb";
  c.model_name = "llama-2-7b";
  c.num_instances = 2;
  c.policy = cluster::Policy::kRecompute;
  c.record_steps = true;
  return c;
}

// Requests arriving together: the published stats do not show them before a step ends, but the
// router counts what it routed since (engine::Engine::PublishedView::queued_estimate, the runtime's
// snapshots_of), so least-outstanding alternates. Counting the published stats alone sent the
// whole burst to instance 0 (34 / 28 / 19 / 19 % of the tokens on 4 instances in the bench).
TEST(RuntimeFidelity, SimultaneousArrivalsAreCountedByTheRouter) {
  workload::Trace t;
  for (int i = 0; i < 4; ++i) t.requests.push_back({0, 16, 4});
  for (bool live : {false, true}) {
    SimConfig c = two_gpus();
    c.live_stats = live;
    auto r = run_simulation(c, t);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    const auto by = sampled_by_instance(*r);
    ASSERT_EQ(by.size(), 2u) << "live " << live;
    EXPECT_EQ(by.at(0), 8);
    EXPECT_EQ(by.at(1), 8);
    for (const auto& rec : r->records) EXPECT_EQ(rec.outcome, workload::RequestOutcome::kOk);
  }
}

// An arrival during a step is counted by the router at once (B, during A's prefill, goes to the
// idle instance 1) and by the published stats only when a step ends: C, right after B, finds one
// request routed to each and goes to instance 0 (ties to the lowest id); A's running request is
// published only when its prefill step ends.
TEST(RuntimeFidelity, RoutedArrivalsCountBeforeTheirStepEnds) {
  workload::Trace t;
  t.requests.push_back({0, 1000, 200});  // A: a long prefill, then 199 decode steps
  t.requests.push_back({1, 16, 4});      // B: 1 us later, A's prefill in flight
  t.requests.push_back({2, 16, 4});      // C
  t.requests.push_back({1'000'000, 16, 4});  // D: A decoding (published), B and C done
  auto r = run_simulation(two_gpus(), t);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  ASSERT_FALSE(r->steps.empty());
  EXPECT_GT(r->steps.front().end_us, 2) << "A's first step must still run when B and C arrive";
  EXPECT_GT(r->records[0].finish_us, 1'000'000) << "A must still run when D arrives";
  const auto by = sampled_by_instance(*r);
  EXPECT_EQ(by.at(0), 204);  // A and C
  EXPECT_EQ(by.at(1), 8);    // B and D
  // C entered instance 0's scheduler when A's prefill ended: its first token is not before.
  EXPECT_GE(r->records[2].first_token_us, r->steps.front().end_us);
}

// A micro-batch's swap-outs and swap-ins are two paced host-link messages in the runtime's agent,
// each ending in a sleep; the executor counts those waits.
TEST(RuntimeFidelity, SwapCopiesCountOneWaitPerDirection) {
  const CostModel cost(*gpu_spec("a100-80gb"), *sim_model_config("llama-2-7b"));
  SimExecutorConfig cfg;
  cfg.host_link = *link_spec("pcie4");
  cfg.stage_link = *link_spec("nvlink-a100");
  cfg.vocab_size = 32000;
  SimExecutor ex(&cost, cfg);
  engine::StepPlan plan;
  engine::ScheduledSequence s;
  s.id = RequestId(1);
  s.tokens.assign(1, 5);
  s.sample = true;
  plan.sequences.push_back(s);
  ex.execute(plan);
  EXPECT_EQ(ex.counters().last_round_copy_waits, 0);
  plan.swap_out.resize(3);
  ex.execute(plan);
  EXPECT_EQ(ex.counters().last_round_copy_waits, 1);
  plan.swap_in.resize(2);
  ex.execute(plan);
  EXPECT_EQ(ex.counters().last_round_copy_waits, 2);
  plan.swap_out.clear();
  ex.execute(plan);
  EXPECT_EQ(ex.counters().last_round_copy_waits, 1);
}

// The monitor's tick waits for a core like a woken device thread (the host's fixed time per
// wake-up at the devices computing) and the next is due a period after it ran: with both devices
// busy and 2 ms per wake-up, the tick due at 1 s runs 2-8 ms late (four late ticks from 0); with
// no fixed time it runs on the grid. A scripted drop shows when the tick ran.
TEST(RuntimeFidelity, MonitorTicksDriftWithTheHostsWakeUps) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "kun_runtime_fidelity_ticks";
  std::filesystem::create_directories(dir);
  const auto drop_requested_us = [&](std::vector<double> fixed_us) -> std::int64_t {
    DeviceProfile p;
    p.spec.name = "test-cpu";
    p.spec.peak_flops = 40e9;
    p.spec.hbm_bytes_per_s = 6e9;
    p.spec.memory_bytes = 1LL << 30;
    p.spec.step_overhead_us = 150.0;
    p.spec.page_bytes = 256 * 1024;
    p.spec.table_tokens = {1, 2, 4, 8, 16, 32};
    p.spec.table_us = {3000, 3100, 4000, 5000, 8000, 13000};
    p.spec.sample_us = 100.0;
    p.spec.attn_pair_us = 0.5;
    p.spec.host_contention = {1.0, 1.0};
    p.spec.host_contention_us = std::move(fixed_us);
    p.spec.measured_model = "llama-30m";
    p.preset = "llama-30m";
    const std::string path = (dir / "p.json").string();
    EXPECT_TRUE(save_device_profile(p, path).ok());
    SimConfig c;
    c.gpu = path;
    c.model_name = "llama-30m";
    c.num_instances = 2;
    c.kv_tokens_per_instance = 4096;
    c.policy = cluster::Policy::kKunServe;
    c.timeline_period_us = 250'000;
    c.script = {SimConfig::ScriptedTransition{1'000'000, {0, 1}, -1}};
    workload::Trace t;
    for (int i = 0; i < 40; ++i) t.requests.push_back({static_cast<std::int64_t>(i) * 50'000, 8, 400});
    auto r = run_simulation(c, t);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    if (!r.ok()) return -1;
    for (const std::string& e : r->events) {
      if (e.find("drop requested") != std::string::npos) return std::stoll(e);
    }
    return -1;
  };
  EXPECT_EQ(drop_requested_us({0.0, 0.0}), 1'000'000);
  const std::int64_t late = drop_requested_us({0.0, 2000.0});
  EXPECT_GE(late, 1'002'000);
  EXPECT_LE(late, 1'008'000);
  std::filesystem::remove_all(dir);
}

// A fused group's round pays the host's fixed time fitted to fused rounds
// (GpuSpec::host_contention_fused_us; the bench's fused micro-batches wait less than its
// independent steps), or the independent steps' when the profile has none: with no slowdown
// factor, every fused round of the same work takes 1.5 ms less at 0.5 ms than at the fallback's
// 2 ms, and the independent steps before the drop are untouched.
TEST(RuntimeFidelity, FusedRoundsPayTheirOwnFixedTime) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "kun_runtime_fidelity_fused";
  std::filesystem::create_directories(dir);
  const auto steps = [&](std::vector<double> fused_us) {
    DeviceProfile p;
    p.spec.name = "test-cpu";
    p.spec.peak_flops = 40e9;
    p.spec.hbm_bytes_per_s = 6e9;
    p.spec.memory_bytes = 1LL << 30;
    p.spec.step_overhead_us = 150.0;
    p.spec.page_bytes = 256 * 1024;
    p.spec.table_tokens = {1, 2, 4, 8, 16, 32};
    p.spec.table_us = {3000, 3100, 4000, 5000, 8000, 13000};
    p.spec.sample_us = 100.0;
    p.spec.attn_pair_us = 0.5;
    p.spec.host_contention = {1.0, 1.0};
    p.spec.host_contention_us = {2000.0, 2000.0};
    p.spec.host_contention_fused_us = std::move(fused_us);
    p.spec.measured_model = "llama-30m";
    p.preset = "llama-30m";
    const std::string path = (dir / "p.json").string();
    EXPECT_TRUE(save_device_profile(p, path).ok());
    SimConfig c;
    c.gpu = path;
    c.model_name = "llama-30m";
    c.num_instances = 2;
    c.kv_tokens_per_instance = 4096;
    c.policy = cluster::Policy::kKunServe;
    c.timeline_period_us = 250'000;
    c.record_steps = true;
    c.stale_kv = cluster::StaleKvStrategy::kRecompute;  // no remote attention: a round's cost is its work
    c.script = {SimConfig::ScriptedTransition{500'000, {0, 1}, -1}};
    workload::Trace t;
    for (int i = 0; i < 40; ++i) t.requests.push_back({static_cast<std::int64_t>(i) * 50'000, 8, 400});
    auto r = run_simulation(c, t);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    return r.ok() ? r->steps : std::vector<RecordedStep>{};
  };
  // A round's duration by its work: the unit and each micro-batch's (sequences, new tokens,
  // attended pairs); a round's micro-batches end together.
  using Work = std::vector<std::int64_t>;
  const auto by_work = [](const std::vector<RecordedStep>& v) {
    std::map<std::pair<std::int64_t, std::int64_t>, std::pair<Work, std::int64_t>> rounds;  // (unit, end) ->
    for (const RecordedStep& s : v) {
      auto& [work, d] = rounds[{s.first_instance * 10 + s.unit_devices, s.end_us}];
      if (work.empty()) work.push_back(s.unit_devices);
      work.insert(work.end(), {s.sequences, s.new_tokens, s.attended_pairs});
      d = s.duration_us;
    }
    std::map<Work, std::int64_t> out;
    for (const auto& [key, round] : rounds) out[round.first] = round.second;
    return out;
  };
  const std::map<Work, std::int64_t> fallback = by_work(steps({}));
  const std::map<Work, std::int64_t> fitted = by_work(steps({500.0, 500.0}));
  std::int64_t fused_compared = 0, independent_compared = 0;
  for (const auto& [work, d] : fitted) {
    const auto it = fallback.find(work);
    if (it == fallback.end()) continue;
    if (work.front() > 1) {
      EXPECT_NEAR(static_cast<double>(it->second - d), 1500.0, 2.0) << "fused round of " << work.size() / 3 << " micro-batches";
      ++fused_compared;
    } else {
      EXPECT_EQ(it->second, d) << "independent step of " << work[1] << " sequences";
      ++independent_compared;
    }
  }
  EXPECT_GT(fused_compared, 5);
  EXPECT_GT(independent_compared, 2);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kun::sim
