// The simulator does what the in-process runtime does where the validation against
// `bench --in-process` found it did not (sim/README.md, "Validation"): the router and the
// coordinator see what the engines last published plus the requests submitted since (arrivals
// during a step wait in the engine's inbox), a step's paced swap copies each cost the host's
// wait for a core (GpuSpec::host_swap_us) without computing, and the monitor re-arms from when its tick ran, so its ticks drift later on a
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

// A CPU-like profile: a step table, no slowdown with up to 4 devices, no fixed waits.
DeviceProfile flat_cpu_profile() {
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
  p.spec.host_contention = {1.0, 1.0, 1.0, 1.0};
  p.spec.host_contention_us = {0.0, 0.0, 0.0, 0.0};
  p.spec.measured_model = "llama-30m";
  p.preset = "llama-30m";
  return p;
}

StatusOr<SimReport> simulate_with(const DeviceProfile& p, SimConfig c, const workload::Trace& t, const std::string& name) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / ("kun_runtime_fidelity_" + name);
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "p.json").string();
  if (Status s = save_device_profile(p, path); !s.ok()) return s;
  c.gpu = path;
  c.model_name = "llama-30m";
  auto r = run_simulation(c, t);
  std::filesystem::remove_all(dir);
  return r;
}

// A kunserve pair whose two instances are dropped into one group at `drop_at_us`, and 40 requests
// of 400 output tokens every 50 ms that keep both busy.
SimConfig scripted_pair(std::int64_t drop_at_us) {
  SimConfig c;
  c.num_instances = 2;
  c.kv_tokens_per_instance = 4096;
  c.policy = cluster::Policy::kKunServe;
  c.timeline_period_us = 250'000;
  c.script = {SimConfig::ScriptedTransition{drop_at_us, {0, 1}, -1}};
  return c;
}

workload::Trace steady_decodes() {
  workload::Trace t;
  for (int i = 0; i < 40; ++i) t.requests.push_back({static_cast<std::int64_t>(i) * 50'000, 8, 400});
  return t;
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
  const auto drop_requested_us = [&](std::vector<double> fixed_us) -> std::int64_t {
    DeviceProfile p = flat_cpu_profile();
    p.spec.host_contention_us = std::move(fixed_us);
    auto r = simulate_with(p, scripted_pair(1'000'000), steady_decodes(), "ticks");
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    if (!r.ok()) return -1;
    for (const std::string& e : r->events) {
      if (e.find("drop requested") != std::string::npos) return std::stoll(e);
    }
    return -1;
  };
  EXPECT_EQ(drop_requested_us({0.0, 0.0, 0.0, 0.0}), 1'000'000);
  const std::int64_t late = drop_requested_us({0.0, 2000.0, 2000.0, 2000.0});
  EXPECT_GE(late, 1'002'000);
  EXPECT_LE(late, 1'008'000);
}

// A fused group's round pays the host's fixed time fitted to fused rounds
// (GpuSpec::host_contention_fused_us; the bench's fused micro-batches wait less than its
// independent steps), or the independent steps' when the profile has none: with no slowdown
// factor, every fused round of the same work takes 1.5 ms less at 0.5 ms than at the fallback's
// 2 ms, and the independent steps before the drop are untouched.
TEST(RuntimeFidelity, FusedRoundsPayTheirOwnFixedTime) {
  const auto steps = [&](std::vector<double> fused_us) {
    DeviceProfile p = flat_cpu_profile();
    p.spec.host_contention_us = {2000.0, 2000.0, 2000.0, 2000.0};
    p.spec.host_contention_fused_us = std::move(fused_us);
    SimConfig c = scripted_pair(500'000);
    c.record_steps = true;
    c.stale_kv = cluster::StaleKvStrategy::kRecompute;  // no remote attention: a round's cost is its work
    auto r = simulate_with(p, c, steady_decodes(), "fused");
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
  const std::map<Work, std::int64_t> fitted = by_work(steps({500.0, 500.0, 500.0, 500.0}));
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
}

// A step after its instance idled pays the host's extra time for the spell (the bench's lone
// requests: 6-8 ms to the first token against 3 ms simulated before): two lone requests, the
// first at the start (no step before: an infinite spell), the second 500 ms after, each 3 ms
// later than without it; the decode steps right after their prefill pay nothing.
TEST(RuntimeFidelity, StepsAfterAnIdleSpellPayTheHostsWakeUp) {
  const auto run = [&](std::vector<double> idle_us) {
    DeviceProfile p = flat_cpu_profile();
    p.spec.host_idle_gap_us = {10'000.0, 100'000.0};
    p.spec.host_idle_us = std::move(idle_us);
    SimConfig c;
    c.num_instances = 1;
    c.kv_tokens_per_instance = 4096;
    c.policy = cluster::Policy::kRecompute;
    workload::Trace t;
    t.requests.push_back({0, 8, 4});
    t.requests.push_back({500'000, 8, 4});
    auto r = simulate_with(p, c, t, "idle");
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    std::vector<std::int64_t> ttft, e2e;
    if (r.ok()) {
      for (const auto& rec : r->records) {
        ttft.push_back(rec.first_token_us - rec.arrival_us);
        e2e.push_back(rec.finish_us - rec.first_token_us);
      }
    }
    return std::make_pair(ttft, e2e);
  };
  const auto [ttft0, decode0] = run({0.0, 0.0});
  const auto [ttft1, decode1] = run({1000.0, 3000.0});
  ASSERT_EQ(ttft0.size(), 2u);
  ASSERT_EQ(ttft1.size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_NEAR(static_cast<double>(ttft1[i] - ttft0[i]), 3000.0, 2.0) << "request " << i;
    EXPECT_NEAR(static_cast<double>(decode1[i] - decode0[i]), 0.0, 2.0) << "request " << i;
  }
}

// After each paced swap copy the agent's thread waits for a core (GpuSpec::host_swap_us): a step
// with copies takes that much more per copy, and the wait is not computing, so a step of another
// device running beside it is not slowed. One instance under memory pressure with the swap
// policy: its first step with copies is host_swap_us longer than with none (the runs are the same
// up to it); with two devices at 2x contention the other instance's steps that overlap only the
// wait keep their uncontended time.
TEST(RuntimeFidelity, SwapStepsWaitForACoreAfterEachCopy) {
  workload::Trace same;
  for (int i = 0; i < 6; ++i) same.requests.push_back({i * 1000, 16, 40});
  const auto run = [&](double swap_us, std::int64_t instances, const workload::Trace& t) {
    DeviceProfile p = flat_cpu_profile();
    p.spec.host_swap_us = swap_us;
    p.spec.host_contention = {1.0, 2.0, 2.0, 2.0};
    SimConfig c;
    c.num_instances = instances;
    c.kv_tokens_per_instance = 96;
    c.host_link_gbps = 1.0;
    c.policy = cluster::Policy::kSwap;
    c.record_steps = true;
    auto r = simulate_with(p, c, t, "swapwait");
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    return r.ok() ? r->steps : std::vector<RecordedStep>{};
  };
  const std::vector<RecordedStep> base = run(0.0, 1, same);
  const std::vector<RecordedStep> waited = run(4000.0, 1, same);
  std::size_t first = 0;
  while (first < base.size() && base[first].swap_blocks == 0) ++first;
  ASSERT_LT(first, base.size()) << "no step swapped";
  ASSERT_LT(first, waited.size());
  EXPECT_EQ(waited[first].swap_blocks, base[first].swap_blocks);
  EXPECT_EQ(waited[first].duration_us - base[first].duration_us, 4000);  // one direction: a swap-out
  for (std::size_t i = 0; i < first; ++i) EXPECT_EQ(waited[i].duration_us, base[i].duration_us) << "step " << i;
  // Two instances, the router alternating the requests: instance 0 gets the long ones and swaps,
  // instance 1 short ones that fit. A step of instance 1 that lies inside a step with copies'
  // link time and wait runs at the one-device speed (its uncontended price); one that starts
  // during the other's forward is slowed.
  workload::Trace mixed;
  for (int i = 0; i < 8; ++i) mixed.requests.push_back(i % 2 == 0 ? workload::TraceRequest{i * 1000, 16, 40} : workload::TraceRequest{i * 1000, 4, 12});
  const std::vector<RecordedStep> two = run(20'000.0, 2, mixed);
  DeviceProfile p = flat_cpu_profile();
  const CostModel cost(p.spec, *sim_model_config("llama-30m"));
  const auto uncontended_us = [&](const RecordedStep& o) {
    CostModel::BatchTerms b;
    b.tokens = o.new_tokens;
    b.sampled = o.sampled;
    b.pairs = static_cast<double>(o.attended_pairs);
    return cost.step_us(b, cost.model().num_layers, true, true);
  };
  int inside = 0, overlapping = 0;
  for (const RecordedStep& s : two) {
    if (s.swap_blocks == 0) continue;
    const std::int64_t start = s.end_us - s.duration_us;
    // The copies of a few blocks at 1 GB/s take microseconds: the first 20 ms are the wait.
    for (const RecordedStep& o : two) {
      if (o.first_instance == s.first_instance || o.swap_blocks > 0) continue;
      const std::int64_t o_start = o.end_us - o.duration_us;
      if (o_start >= start && o.end_us <= start + 20'000) {
        EXPECT_NEAR(static_cast<double>(o.duration_us), uncontended_us(o), 2.0) << "step at " << o_start;
        ++inside;
      } else if (o_start >= start + 20'100 && o_start + 100 < s.end_us) {
        EXPECT_GT(static_cast<double>(o.duration_us), uncontended_us(o) + 100.0) << "step at " << o_start;
        ++overlapping;
      }
    }
  }
  EXPECT_GT(inside, 0) << "no step of the other instance ran inside a swap wait";
  EXPECT_GT(overlapping, 0) << "no step of the other instance ran beside a swap step's forward";
}

// The runtime carries out one tick's drops one after another (ClusterRuntime::run_actions), and
// a drop frees its members' layers after their steps end, one control round trip per layer
// (GpuSpec::drop_layer_us): two pairs of llama-30m (8 layers freed each) dropped at the same tick
// at 1 ms per layer finish 8 ms and 16 ms after the tick plus their steps in flight; without the
// per-layer time they finish when their steps end.
TEST(RuntimeFidelity, OneTicksDropsRunOneAfterAnother) {
  const auto done_after_request = [&](double layer_us) {
    DeviceProfile p = flat_cpu_profile();
    p.spec.drop_layer_us = layer_us;
    SimConfig c;
    c.num_instances = 4;
    c.kv_tokens_per_instance = 4096;
    c.policy = cluster::Policy::kKunServe;
    c.timeline_period_us = 250'000;
    c.route = cluster::RoutePolicy::kRoundRobin;
    c.script = {SimConfig::ScriptedTransition{500'000, {0, 1}, -1}, SimConfig::ScriptedTransition{500'000, {2, 3}, -1}};
    workload::Trace t;
    for (int i = 0; i < 8; ++i) t.requests.push_back({0, 8, 200});
    auto r = simulate_with(p, c, t, "drops");
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    std::vector<std::int64_t> requested, done;
    if (r.ok()) {
      for (const std::string& e : r->events) {
        if (e.find("drop requested") != std::string::npos) requested.push_back(std::stoll(e));
        if (e.find("drop done") != std::string::npos) done.push_back(std::stoll(e));
      }
    }
    EXPECT_EQ(requested.size(), 2u);
    EXPECT_EQ(done.size(), 2u);
    return std::make_pair(requested, done);
  };
  const auto [req0, done0] = done_after_request(0.0);
  const auto [req1, done1] = done_after_request(1000.0);
  ASSERT_EQ(done0.size(), 2u);
  ASSERT_EQ(done1.size(), 2u);
  // Without the layers' time: each when its pair's steps in flight end (the second pair stops
  // only once the first drop is done, here the same instant); with it, 8 ms each, in turn.
  EXPECT_GE(done1[0] - req1[0], 8000);
  EXPECT_EQ(done1[0] - done0[0], 8000);
  EXPECT_GE(done1[1] - done1[0], 8000);
  EXPECT_LT(done1[1] - done1[0], 8000 + 6000);  // at most one decode step of the second pair before it stops
}

// A live migration stops its source and its destination at their step boundaries and keeps both
// paused while the request's KV crosses the link (ClusterRuntime::migrate), one migration at a
// time: on a slow link (a copy of several ms), no step of either instance overlaps a copy, and
// copies do not overlap each other.
TEST(RuntimeFidelity, MigrationsPauseBothInstancesOneAtATime) {
  DeviceProfile p = flat_cpu_profile();
  SimConfig c;
  c.num_instances = 2;
  c.kv_tokens_per_instance = 512;
  c.policy = cluster::Policy::kMigrate;
  c.route = cluster::RoutePolicy::kRoundRobin;
  c.timeline_period_us = 250'000;
  c.link_gbps = 0.01;  // 10 MB/s: a request's KV takes milliseconds
  c.record_steps = true;
  workload::Trace t;
  for (int i = 0; i < 60; ++i) {
    const bool long_one = i % 2 == 0;  // round robin: instance 0 gets the long ones and runs out of KV
    t.requests.push_back({static_cast<std::int64_t>(i) * 40'000, long_one ? 96 : 8, long_one ? 200 : 20});
  }
  auto r = simulate_with(p, c, t, "migrate");
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  struct Copy {
    std::int64_t begin, end, from, to;
  };
  std::vector<Copy> copies;
  for (const std::string& e : r->events) {
    if (e.find(" migrate request ") == std::string::npos) continue;
    Copy cp{};
    cp.begin = std::stoll(e);
    cp.from = std::stoll(e.substr(e.find("from instance ") + 14));
    cp.to = std::stoll(e.substr(e.find(" to ") + 4));
    cp.end = std::stoll(e.substr(e.find("until ") + 6));
    copies.push_back(cp);
  }
  std::int64_t with_time = 0;
  for (const Copy& cp : copies) with_time += cp.end > cp.begin ? 1 : 0;
  ASSERT_GT(with_time, 0) << copies.size() << " migrations, none with KV to copy";
  for (std::size_t i = 0; i < copies.size(); ++i) {
    if (i > 0) {
      EXPECT_GE(copies[i].begin, copies[i - 1].end) << "migrations " << i - 1 << " and " << i << " overlap";
    }
    for (const RecordedStep& st : r->steps) {
      if (st.first_instance != copies[i].from && st.first_instance != copies[i].to) continue;
      const std::int64_t begin = st.end_us - st.duration_us;
      EXPECT_FALSE(begin < copies[i].end && st.end_us > copies[i].begin)
          << "a step of instance " << st.first_instance << " at " << begin << "-" << st.end_us << " during the copy "
          << copies[i].begin << "-" << copies[i].end;
    }
  }
}

}  // namespace
}  // namespace kun::sim
