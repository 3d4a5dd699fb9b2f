// Device profiles (sim/device_profile.h): the fit recovers a known device from its own step
// times, files round-trip and bad files are refused with a reason, the shipped CPU profile loads
// and still predicts the steps it was measured on, and host contention slows concurrent steps.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "common/test_support.h"
#include "model/config.h"
#include "sim/cluster_sim.h"
#include "sim/device_profile.h"

namespace kun::sim {
namespace {

std::filesystem::path source_root() { return test_support::source_dir(); }

GpuSpec known_cpu() {
  GpuSpec g;
  g.name = "test-cpu";
  g.peak_flops = 40e9;
  g.hbm_bytes_per_s = 6e9;
  g.memory_bytes = 1LL << 30;
  g.step_overhead_us = 150.0;
  g.page_bytes = 256 * 1024;
  g.host_contention = {1.0, 1.3, 1.7, 2.1};
  g.table_tokens = {1, 2, 4, 8, 16, 32, 64, 128};
  g.table_us = {3000, 3100, 7000, 9000, 13000, 20000, 35000, 65000};  // a kernel switch at 4
  g.sample_us = 200.0;
  g.attn_pair_us = 1.5;
  g.measured_model = "llama-30m";
  return g;
}

// Steps shaped like calibrate's: decode batches at short and long contexts, prefills, mixes; the
// engine's overhead on top of the executor's time.
std::vector<ProfileStep> synthetic_steps(const GpuSpec& truth, const model::ModelConfig& m) {
  const CostModel cost(truth, m);
  std::vector<ProfileStep> steps;
  const auto add = [&](std::vector<SeqWork> seqs) {
    const double wall = predicted_step_us(cost, seqs);
    steps.push_back({seqs, wall, wall - truth.step_overhead_us});
  };
  for (std::int64_t b : {1, 2, 3, 4, 6, 8, 12, 16, 24, 32}) {
    for (std::int64_t ctx : {16, 40, 400}) add(std::vector<SeqWork>(static_cast<std::size_t>(b), SeqWork{ctx, 1, true}));
  }
  for (std::int64_t n : {4, 8, 16, 32, 64, 100, 128}) add({SeqWork{0, n, true}});
  add({SeqWork{0, 20, true}, SeqWork{30, 1, true}, SeqWork{12, 1, true}});
  add({SeqWork{0, 5, true}, SeqWork{30, 1, true}, SeqWork{12, 1, true}, SeqWork{0, 9, false}});
  return steps;
}

TEST(DeviceProfile, FitRecoversAKnownDeviceFromItsStepTimes) {
  const model::ModelConfig m = *model::preset_config("llama-30m");
  const GpuSpec truth = known_cpu();
  const std::vector<ProfileStep> steps = synthetic_steps(truth, m);
  GpuSpec start = truth;
  start.table_tokens.clear();
  start.table_us.clear();
  start.sample_us = start.attn_pair_us = 0.0;
  start.step_overhead_us = 0.0;
  const GpuSpec fitted = fit_device_spec(start, m, steps);
  const FitError after = fit_error(fitted, m, steps);
  EXPECT_LT(after.median, 0.01) << "p90 " << after.p90;
  EXPECT_LT(after.p90, 0.02);
  EXPECT_NEAR(fitted.step_overhead_us, 150.0, 1.0);
  EXPECT_NEAR(fitted.sample_us / truth.sample_us, 1.0, 0.05);
  EXPECT_NEAR(fitted.attn_pair_us / truth.attn_pair_us, 1.0, 0.05);
  const CostModel a(truth, m), b(fitted, m);
  for (double t : {1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0}) {
    EXPECT_NEAR(b.table_us(t) / a.table_us(t), 1.0, 0.05) << t << " tokens";
  }
  // Beyond the last knot the table extrapolates its last slope.
  EXPECT_NEAR(b.table_us(256) / a.table_us(256), 1.0, 0.1);
  // A stage of half the layers takes about half the time (overhead once, sampling on the last).
  const std::vector<SeqWork> decode(8, SeqWork{30, 1, true});
  EXPECT_NEAR(a.step_us(decode, m.num_layers / 2, true, false, false) * 2.0 + truth.sample_us * 7 + truth.step_overhead_us,
              a.step_us(decode, m.num_layers, true, true, true), 1.0);
}

TEST(DeviceProfile, RoundTripsAndRefusesBadFiles) {
  DeviceProfile p;
  p.spec = known_cpu();
  p.preset = "llama-30m";
  p.steps = {{{SeqWork{10, 1, true}, SeqWork{0, 5, true}}, 321.5, 300.0}};
  p.fit = {0.05, 0.1, -0.01, 1};
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "kun_device_profile_test";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "p.json").string();
  ASSERT_TRUE(save_device_profile(p, path).ok());
  auto q = load_device_profile(path);
  ASSERT_TRUE(q.ok()) << q.status().to_string();
  EXPECT_EQ(q->spec.name, "test-cpu");
  EXPECT_DOUBLE_EQ(q->spec.peak_flops, 40e9);
  EXPECT_EQ(q->spec.page_bytes, 256 * 1024);
  EXPECT_EQ(q->spec.host_contention, p.spec.host_contention);
  ASSERT_EQ(q->steps.size(), 1u);
  EXPECT_EQ(q->steps[0].seqs[1].new_tokens, 5);
  EXPECT_DOUBLE_EQ(q->steps[0].measured_us, 321.5);
  EXPECT_DOUBLE_EQ(q->steps[0].exec_us, 300.0);
  EXPECT_EQ(q->spec.table_us, p.spec.table_us);
  EXPECT_DOUBLE_EQ(q->spec.attn_pair_us, 1.5);
  EXPECT_EQ(q->spec.measured_model, "llama-30m");
  // gpu_spec() takes the file by path.
  auto g = gpu_spec(path);
  ASSERT_TRUE(g.ok()) << g.status().to_string();
  EXPECT_TRUE(g->calibrated);
  EXPECT_EQ(gpu_spec((dir / "missing.json").string()).status().code(), StatusCode::kNotFound);
  // Not JSON, wrong format, a bad constant: refused with a reason, nothing loaded.
  const auto write = [&](const std::string& text) {
    std::ofstream(path) << text;
    return load_device_profile(path).status();
  };
  EXPECT_EQ(write("{ not json").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(write(R"({"format": "something-else"})").code(), StatusCode::kInvalidArgument);
  nlohmann::json j = p.to_json();
  j["spec"]["peak_flops"] = -1.0;
  const Status bad = write(j.dump());
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("peak_flops"), std::string::npos) << bad.message();
  j = p.to_json();
  j["spec"]["table_tokens"] = {1, 4, 2, 8, 16, 32, 64, 128};
  EXPECT_EQ(write(j.dump()).code(), StatusCode::kInvalidArgument);
  std::filesystem::remove_all(dir);
}

TEST(DeviceProfile, ContentionFactor) {
  const GpuSpec g = known_cpu();
  EXPECT_DOUBLE_EQ(g.contention_factor(1), 1.0);
  EXPECT_DOUBLE_EQ(g.contention_factor(3), 1.7);
  EXPECT_DOUBLE_EQ(g.contention_factor(8), 2.1 * 2.0);  // twice the measured devices
  EXPECT_DOUBLE_EQ(g.contention_factor(2.5), 1.5);         // between 1.3 and 1.7
  GpuSpec gpu = g;
  gpu.host_contention.clear();
  EXPECT_DOUBLE_EQ(gpu.contention_factor(8), 1.0);
}

// The shipped profile of this project's CPU device loads and predicts its own measured steps.
TEST(DeviceProfile, ShippedCpuProfilePredictsItsSteps) {
  const std::filesystem::path path = source_root() / "sim" / "profiles" / "cpu-llama-30m-t1.json";
  auto p = load_device_profile(path.string());
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  const model::ModelConfig m = *model::preset_config(p->preset);
  ASSERT_GE(p->steps.size(), 100u);
  const FitError e = fit_error(p->spec, m, p->steps);
  EXPECT_NEAR(e.median, p->fit.median, 1e-9);  // the recorded fit is the file's
  EXPECT_LT(e.median, 0.25);
  EXPECT_EQ(p->spec.measured_model, p->preset);
  ASSERT_GE(p->spec.host_contention.size(), 2u);
  EXPECT_DOUBLE_EQ(p->spec.host_contention[0], 1.0);
}

// Under a CPU profile the simulator slows steps that overlap other devices' steps: the same
// trace on 4 instances takes longer than with the contention removed.
TEST(DeviceProfile, HostContentionSlowsOverlappingSteps) {
  const model::ModelConfig m = *model::preset_config("llama-30m");
  GpuSpec g = known_cpu();
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "kun_device_profile_contention";
  std::filesystem::create_directories(dir);
  const auto run = [&](std::vector<double> contention) {
    DeviceProfile p;
    p.spec = g;
    p.spec.host_contention = std::move(contention);
    p.preset = "llama-30m";
    const std::string path = (dir / "c.json").string();
    EXPECT_TRUE(save_device_profile(p, path).ok());
    SimConfig c;
    c.gpu = path;
    c.model_name = "llama-30m";
    c.num_instances = 4;
    c.kv_tokens_per_instance = 1024;
    c.policy = cluster::Policy::kRecompute;
    workload::Trace t;
    for (int i = 0; i < 64; ++i) t.requests.push_back({static_cast<std::int64_t>(i) * 2000, 20, 16});
    auto r = run_simulation(c, t);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    return r.ok() ? r->report.e2e_ms.mean : 0.0;
  };
  const double alone = run({});
  const double shared = run({1.0, 1.5, 2.0, 2.5});
  EXPECT_GT(shared, alone * 1.3);
  std::filesystem::remove_all(dir);
}

// Host contention is processor sharing, not a factor fixed when a step starts: a step that began
// alone slows down when another device starts computing, and speeds up when that one ends.
// Two devices, contention 2x while both compute: A starts a step of W us at 0, B the same step at
// W/2. A does W/2 alone, then W/2 at half speed (W of wall time): ends at 1.5 W. B does W/2 at
// half speed until 1.5 W, then W/2 alone: ends at 2 W. Both first tokens come 1.5 W after their
// arrival (a factor fixed at the start would give W and 2 W).
TEST(DeviceProfile, HostContentionIsProcessorSharing) {
  const model::ModelConfig m = *model::preset_config("llama-30m");
  DeviceProfile p;
  p.spec = known_cpu();
  p.spec.host_contention = {1.0, 2.0};
  p.preset = "llama-30m";
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "kun_device_profile_sharing";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "c.json").string();
  ASSERT_TRUE(save_device_profile(p, path).ok());
  const std::vector<SeqWork> prefill{SeqWork{0, 16, true}};
  const double w = predicted_step_us(CostModel(p.spec, m), prefill);
  SimConfig c;
  c.gpu = path;
  c.model_name = "llama-30m";
  c.num_instances = 2;
  c.kv_tokens_per_instance = 1024;
  c.policy = cluster::Policy::kRecompute;
  // One request per device: least-outstanding would send B to A's device, whose published
  // stats do not count A before its step ends (as the runtime's router).
  c.route = cluster::RoutePolicy::kRoundRobin;
  workload::Trace t;
  t.requests.push_back({0, 16, 1});
  t.requests.push_back({static_cast<std::int64_t>(w / 2), 16, 1});
  auto r = run_simulation(c, t);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  ASSERT_EQ(r->records.size(), 2u);
  for (const auto& rec : r->records) {
    EXPECT_NEAR(static_cast<double>(rec.first_token_us - rec.arrival_us), 1.5 * w, 3.0) << "request " << rec.index << ", W " << w;
  }
  std::filesystem::remove_all(dir);
}

// The host's fixed time per step (GpuSpec::host_contention_us): two devices start the same step
// together, contention 2x and 1 ms at two devices: each takes 2 W + 1 ms, whatever W is; a step
// alone takes W (0 us at one device). The profile file carries the curve.
TEST(DeviceProfile, HostContentionFixedTimePerStep) {
  const model::ModelConfig m = *model::preset_config("llama-30m");
  DeviceProfile p;
  p.spec = known_cpu();
  p.spec.host_contention = {1.0, 2.0};
  p.spec.host_contention_us = {0.0, 1000.0};
  p.preset = "llama-30m";
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "kun_device_profile_latency";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "c.json").string();
  ASSERT_TRUE(save_device_profile(p, path).ok());
  auto loaded = load_device_profile(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
  EXPECT_EQ(loaded->spec.host_contention_us, p.spec.host_contention_us);
  EXPECT_DOUBLE_EQ(loaded->spec.contention_latency_us(2.0), 1000.0);
  EXPECT_DOUBLE_EQ(loaded->spec.contention_latency_us(1.5), 500.0);
  EXPECT_DOUBLE_EQ(loaded->spec.fused_contention_latency_us(2.0), 1000.0);  // none fitted: the independent steps'
  const double w = predicted_step_us(CostModel(p.spec, m), std::vector<SeqWork>{SeqWork{0, 16, true}});
  const auto ttfts = [&](std::vector<std::int64_t> arrivals) {
    SimConfig c;
    c.gpu = path;
    c.model_name = "llama-30m";
    c.num_instances = 2;
    c.kv_tokens_per_instance = 1024;
    c.policy = cluster::Policy::kRecompute;
    c.route = cluster::RoutePolicy::kRoundRobin;  // one request per device (see above)
    workload::Trace t;
    for (std::int64_t a : arrivals) t.requests.push_back({a, 16, 1});
    auto r = run_simulation(c, t);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    std::vector<double> out;
    if (r.ok()) {
      for (const auto& rec : r->records) out.push_back(static_cast<double>(rec.first_token_us - rec.arrival_us));
    }
    return out;
  };
  const std::vector<double> together = ttfts({0, 0});
  ASSERT_EQ(together.size(), 2u);
  for (double t : together) EXPECT_NEAR(t, 2.0 * w + 1000.0, 3.0) << "W " << w;
  const std::vector<double> alone = ttfts({0});
  ASSERT_EQ(alone.size(), 1u);
  EXPECT_NEAR(alone[0], w, 2.0);
  // A bad curve is refused, naming it.
  const auto expect_refused = [&](const std::string& field, const nlohmann::json& value, const std::string& named) {
    nlohmann::json j = p.to_json();
    j["spec"][field] = value;
    {
      std::ofstream f(path);
      f << j.dump();
    }
    auto bad = load_device_profile(path);
    ASSERT_FALSE(bad.ok()) << field;
    EXPECT_NE(bad.status().message().find(named), std::string::npos) << bad.status().to_string();
  };
  expect_refused("host_contention_us", {0.0, 1.0, 2.0}, "host_contention_us");
  // A fused rounds' curve travels in the file and is what fused rounds read.
  p.spec.host_contention_fused_us = {0.0, 400.0};
  ASSERT_TRUE(save_device_profile(p, path).ok());
  loaded = load_device_profile(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
  EXPECT_EQ(loaded->spec.host_contention_fused_us, p.spec.host_contention_fused_us);
  EXPECT_DOUBLE_EQ(loaded->spec.fused_contention_latency_us(2.0), 400.0);
  EXPECT_DOUBLE_EQ(loaded->spec.contention_latency_us(2.0), 1000.0);
  expect_refused("host_contention_fused_us", {0.0}, "host_contention_fused_us");
  // The contended shape by the step table's token bins, the idle spells, the drop's time per
  // layer and the swap step's wait travel too; the shape interpolates between device counts, bins by the table's knots.
  p.spec.host_contention_tokens = {{1.0, 1.0}, {0.5, 2.0}};
  p.spec.host_idle_gap_us = {10'000.0, 30'000.0};
  p.spec.host_idle_us = {1000.0, 2500.0};
  p.spec.drop_layer_us = 1500.0;
  p.spec.host_swap_us = 1800.0;
  p.spec.host_contention_token_knots = {1, 2, 3, 4};
  p.spec.host_contention_fused_tokens = {{1.0, 0.8}, {0.7, 1.3}};
  ASSERT_TRUE(save_device_profile(p, path).ok());
  loaded = load_device_profile(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
  EXPECT_EQ(loaded->spec.host_contention_tokens, p.spec.host_contention_tokens);
  EXPECT_DOUBLE_EQ(loaded->spec.drop_layer_us, 1500.0);
  EXPECT_DOUBLE_EQ(loaded->spec.host_swap_us, 1800.0);
  EXPECT_EQ(loaded->spec.host_contention_token_knots, p.spec.host_contention_token_knots);
  EXPECT_EQ(loaded->spec.host_contention_fused_tokens, p.spec.host_contention_fused_tokens);
  EXPECT_DOUBLE_EQ(loaded->spec.contention_shape(2.0, 2, true), 1.3);
  // knots 1, 2, 3, 4: bin 0 is 1 token, bin 1 is 2
  EXPECT_DOUBLE_EQ(loaded->spec.contention_shape(2.0, 1), 0.5);
  EXPECT_DOUBLE_EQ(loaded->spec.contention_shape(2.0, 2), 2.0);
  EXPECT_DOUBLE_EQ(loaded->spec.contention_shape(1.5, 2), 1.5);
  EXPECT_DOUBLE_EQ(loaded->spec.contention_shape(2.0, 3), 1.0);  // a bin past the row: 1
  EXPECT_DOUBLE_EQ(loaded->spec.contention_shape(2.0, 16), 1.0);  // a bin past the row: 1
  EXPECT_DOUBLE_EQ(loaded->spec.idle_wake_us(5'000.0), 0.0);
  EXPECT_DOUBLE_EQ(loaded->spec.idle_wake_us(20'000.0), 1000.0);
  EXPECT_DOUBLE_EQ(loaded->spec.idle_wake_us(1e9), 2500.0);
  expect_refused("host_contention_tokens", {{1.0}}, "host_contention_tokens");
  expect_refused("host_idle_us", {1000.0}, "host_idle");
  expect_refused("host_swap_us", -1.0, "host_swap_us");
  expect_refused("host_contention_token_knots", {1.0, 1.0}, "host_contention_token_knots");
  expect_refused("host_contention_fused_tokens", {{1.0}}, "host_contention_fused_tokens");
  std::filesystem::remove_all(dir);
}

// calibrate's contention fit: a known a x table + b comes back from steps of two sizes with
// noise; a line that would need a negative fixed time falls back to the ratio of the means.
TEST(DeviceProfile, FitContentionRecoversFactorAndFixedWait) {
  std::vector<std::pair<double, double>> samples;
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> noise(-300.0, 300.0);
  for (int i = 0; i < 400; ++i) {
    const double x = i % 5 == 0 ? 14000.0 + 10.0 * (i % 7) : 2300.0 + 10.0 * (i % 3);  // prefills among decodes
    samples.emplace_back(x, 1.9 * x + 4000.0 + noise(rng));
  }
  const ContentionFit fit = fit_contention(samples);
  EXPECT_NEAR(fit.factor, 1.9, 0.02);
  EXPECT_NEAR(fit.fixed_us, 4000.0, 60.0);
  // Large steps slowed more than small ones: the line's intercept would be negative.
  const std::vector<std::pair<double, double>> steep{{1000.0, 1000.0}, {10000.0, 30000.0}};
  const ContentionFit ratio = fit_contention(steep);
  EXPECT_DOUBLE_EQ(ratio.fixed_us, 0.0);
  EXPECT_DOUBLE_EQ(ratio.factor, 31000.0 / 11000.0);
  EXPECT_DOUBLE_EQ(fit_contention({}).factor, 1.0);
}

// The step logs of a real run (bench --out-dir: POLICY_steps.csv) parse by column name; a
// missing column or a cell that is not an integer is an error naming the file and row.
TEST(DeviceProfile, RecordedStepsParseByColumnName) {
  const std::string csv =
      "end_us,duration_us,unit_devices,first_instance,sequences,new_tokens,sampled,attended_pairs,swap_blocks\n"
      "1000,400,1,2,3,5,3,77,0\n"
      "\n"
      "2500,900,2,0,1,1,1,12,4\n";
  auto steps = parse_recorded_steps(csv, "a.csv");
  ASSERT_TRUE(steps.ok()) << steps.status().to_string();
  ASSERT_EQ(steps->size(), 2u);
  EXPECT_EQ((*steps)[0].end_us, 1000);
  EXPECT_EQ((*steps)[0].duration_us, 400);
  EXPECT_EQ((*steps)[0].sequences, 3);
  EXPECT_EQ((*steps)[0].attended_pairs, 77);
  EXPECT_EQ((*steps)[1].unit_devices, 2);
  EXPECT_EQ((*steps)[1].swap_blocks, 4);
  EXPECT_EQ((*steps)[0].first_instance, 2);
  // The simulator's writer (simulate --timeline-prefix: POLICY_steps.csv) gives the bench's
  // columns back: the same steps parse again.
  const std::string again = recorded_steps_csv(*steps);
  EXPECT_EQ(again.substr(0, again.find('\n')), csv.substr(0, csv.find('\n')));
  auto round = parse_recorded_steps(again, "again.csv");
  ASSERT_TRUE(round.ok()) << round.status().to_string();
  ASSERT_EQ(round->size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_EQ((*round)[i].end_us, (*steps)[i].end_us);
    EXPECT_EQ((*round)[i].first_instance, (*steps)[i].first_instance);
    EXPECT_EQ((*round)[i].attended_pairs, (*steps)[i].attended_pairs);
    EXPECT_EQ((*round)[i].swap_blocks, (*steps)[i].swap_blocks);
  }
  auto missing = parse_recorded_steps("end_us,duration_us\n1,2\n", "b.csv");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("unit_devices"), std::string::npos) << missing.status().to_string();
  auto bad = parse_recorded_steps(
      "end_us,duration_us,unit_devices,sequences,new_tokens,sampled,attended_pairs,swap_blocks\n1,2,1,1,x,1,1,0\n", "c.csv");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("c.csv' row 2: 'new_tokens'"), std::string::npos) << bad.status().to_string();
}

// Devices computing over a step's computing span: 1 plus the others' computing time inside it; a
// step's swap copies (and the wait after them) come first and do not compute.
TEST(DeviceProfile, DevicesComputingWeighsOverlapsAndSwapCopies) {
  std::vector<RecordedStep> steps(3);
  steps[0].end_us = 100, steps[0].duration_us = 100;  // [0, 100)
  steps[1].end_us = 150, steps[1].duration_us = 100;  // [50, 150): half of it beside step 0
  steps[2].end_us = 400, steps[2].duration_us = 100;  // alone
  std::vector<double> k = devices_computing(steps, 0.0);
  EXPECT_DOUBLE_EQ(k[0], 1.5);
  EXPECT_DOUBLE_EQ(k[1], 1.5);
  EXPECT_DOUBLE_EQ(k[2], 1.0);
  steps[1].swap_blocks = 1;  // 25 us of copy: it computes over [75, 150)
  k = devices_computing(steps, 25.0);
  EXPECT_DOUBLE_EQ(k[0], 1.25);
  EXPECT_DOUBLE_EQ(k[1], 1.0 + 25.0 / 75.0);
  k = devices_computing(steps, 25.0, 25.0);  // and 25 us of wait: [100, 150), beside nothing
  EXPECT_DOUBLE_EQ(k[0], 1.0);
  EXPECT_DOUBLE_EQ(k[1], 1.0);
}

// A host of up to two devices (a = 1 at both counts) on known_cpu()'s table, and a step's table
// time by the fit's pricing (CostModel::step_us) for `tokens` new tokens, 10 attended pairs.
struct TwoDeviceHost {
  model::ModelConfig m = *model::preset_config("llama-30m");
  GpuSpec spec = [] {
    GpuSpec g = known_cpu();
    g.host_contention = {1.0, 1.0};
    return g;
  }();
  CostModel cost{spec, m};
  double predicted(std::int64_t tokens, std::int64_t sampled = 1) const {
    CostModel::BatchTerms b;
    b.tokens = tokens;
    b.sampled = sampled;
    b.pairs = 10.0;
    return cost.step_us(b, m.num_layers, true, true);
  }
};

// Steps with swap copies: what they took beyond their link time (swap_us_per_block x blocks),
// a x shape x table and b is GpuSpec::host_swap_us; fewer than min_steps of them: 0.
TEST(DeviceProfile, FitHostContentionPricesSwapSteps) {
  const TwoDeviceHost host;
  const model::ModelConfig& m = host.m;
  const CostModel& cost = host.cost;
  const double table = host.predicted(1);
  const auto fit_with = [&](int swap_steps) {
    std::vector<RecordedStep> run;
    std::int64_t t = 0;
    for (int i = 0; i < 40; ++i) {  // alone, plain: a = 1, b = 0
      const auto d = static_cast<std::int64_t>(table);
      run.push_back(RecordedStep{t + d, d, 1, 1, 1, 1, 10, 0});
      t += d + 10;
    }
    for (int i = 0; i < swap_steps; ++i) {  // alone, 8 or 16 blocks at 250 us each, 1.5 ms more
      const std::int64_t blocks = i % 2 == 0 ? 8 : 16;
      const auto d = static_cast<std::int64_t>(table + 250.0 * static_cast<double>(blocks) + 1500.0);
      run.push_back(RecordedStep{t + d, d, 1, 1, 1, 1, 10, blocks});
      t += d + 10;
    }
    const std::vector<std::vector<RecordedStep>> runs{run};
    return fit_host_contention(cost, m.num_layers, runs, 250.0, 2);
  };
  const HostContentionFit fit = fit_with(30);
  EXPECT_EQ(fit.swap_steps, 30);
  EXPECT_NEAR(fit.swap_extra_us, 1500.0, 2.0);
  EXPECT_NEAR(fit.factor[0], 1.0, 1e-3);  // the swap steps stay out of a and b
  EXPECT_NEAR(fit.fixed_us[0], 0.0, 1.0);
  const HostContentionFit few = fit_with(10);
  EXPECT_EQ(few.swap_steps, 10);
  EXPECT_EQ(few.swap_extra_us, 0.0);
}

// The wait after a swap step's copies is not computing, for the fit as for the simulator: a
// device's steps that run inside another's link time and wait take the one-device time, and
// with the wait counted among the devices computing (the fit's first pass) they would pull a(2)
// and b(2) towards it; the second pass leaves the wait out and gets back the two-device curve.
TEST(DeviceProfile, FitLeavesTheSwapWaitOutOfTheDevicesComputing) {
  const TwoDeviceHost host;
  const double table = host.predicted(1);
  const double link = 8 * 100.0, wait = 3.0 * table + 100.0;
  std::vector<RecordedStep> run;
  std::int64_t t = 0;
  const auto step = [&](std::int64_t begin, double d, std::int64_t tokens, std::int64_t blocks, std::int64_t dev) {
    const auto di = static_cast<std::int64_t>(std::llround(d));
    run.push_back(RecordedStep{begin + di, di, 1, 1, tokens, 1, 10, blocks, dev});
    return begin + di;
  };
  for (int i = 0; i < 40; ++i) t = step(t, table, 1, 0, 0) + 10;  // alone
  for (int i = 0; i < 40; ++i) {  // side by side: 1.5 x table + 800 us, two sizes
    const std::int64_t tokens = i % 2 == 0 ? 1 : 32;
    const double d = 1.5 * host.predicted(tokens) + 800.0;
    step(t, d, tokens, 0, 1);
    t = step(t, d, tokens, 0, 0) + 10;
  }
  for (int i = 0; i < 40; ++i) {  // device 0 swaps (link, wait, then its forward alone at a = 1)
    // Device 1 steps back to back inside device 0's link time and wait, computing alone (not
    // after an idle spell: its gaps are shorter than 10 ms).
    std::int64_t d1 = t + 10;
    for (int j = 0; j < 3; ++j) d1 = step(d1, table, 1, 0, 1) + 10;
    t = step(t, link + wait + table, 1, 8, 0) + 10;
  }
  const std::vector<std::vector<RecordedStep>> runs{run};
  const HostContentionFit fit = fit_host_contention(host.cost, host.m.num_layers, runs, 100.0, 2);
  EXPECT_NEAR(fit.swap_extra_us, wait, 0.02 * wait);
  EXPECT_NEAR(fit.factor[0], 1.0, 0.02);
  EXPECT_NEAR(fit.factor[1], 1.5, 0.03);
  EXPECT_NEAR(fit.fixed_us[1], 800.0, 40.0);
  const std::vector<double> counted = devices_computing(run, 100.0);
  const std::vector<double> left_out = devices_computing(run, 100.0, wait);
  EXPECT_GT(counted[run.size() - 2], 1.5);       // device 1's last step: the wait counted
  EXPECT_NEAR(left_out[run.size() - 2], 1.0, 1e-9);  // left out: it computed alone
}

// The contended shape's bins are the fit's own knots (1, 2, 3, 4, 6, 8, ...), not the step
// table's (1, 2, 4, ...): steps of 2 and 3 tokens slowed differently come out with their own
// multipliers, and a profile carries the knots the simulator then bins by.
TEST(DeviceProfile, FitShapeSplitsTwoAndThreeTokenSteps) {
  const TwoDeviceHost host;
  const model::ModelConfig& m = host.m;
  const GpuSpec& spec = host.spec;
  const CostModel& cost = host.cost;
  const auto predicted = [&](std::int64_t tokens) { return host.predicted(tokens, tokens); };
  std::vector<RecordedStep> run;
  std::int64_t t = 0;
  for (int i = 0; i < 90; ++i) {  // two devices side by side: 1 token at 1.5x, 2 at 1.2x, 3 at 2.0x
    const std::int64_t tokens = 1 + i % 3;
    const double slow = tokens == 1 ? 1.5 : tokens == 2 ? 1.2 : 2.0;
    const auto d = static_cast<std::int64_t>(slow * predicted(tokens));
    for (int dev = 0; dev < 2; ++dev) run.push_back(RecordedStep{t + d, d, 1, tokens, tokens, tokens, 10, 0, dev});
    t += d + 10;
  }
  const std::vector<std::vector<RecordedStep>> runs{run};
  const HostContentionFit fit = fit_host_contention(cost, m.num_layers, runs, 0.0, 2);
  EXPECT_EQ(fit.token_knots, default_shape_token_knots());
  ASSERT_EQ(fit.token_shape.size(), 2u);
  const std::vector<double>& row = fit.token_shape[1];
  ASSERT_GE(row.size(), 3u);
  // a(2) x shape reproduces each size's slowdown (b comes out near 0: the slowdowns are ratios).
  EXPECT_NEAR(fit.factor[1] * row[0] * predicted(1) + fit.fixed_us[1], 1.5 * predicted(1), 0.02 * predicted(1));
  EXPECT_NEAR(fit.factor[1] * row[1] * predicted(2) + fit.fixed_us[1], 1.2 * predicted(2), 0.02 * predicted(2));
  EXPECT_NEAR(fit.factor[1] * row[2] * predicted(3) + fit.fixed_us[1], 2.0 * predicted(3), 0.02 * predicted(3));
  GpuSpec fitted = spec;
  fitted.host_contention = fit.factor;
  fitted.host_contention_tokens = fit.token_shape;
  fitted.host_contention_token_knots = fit.token_knots;
  EXPECT_EQ(fitted.token_bin(2), 1u);
  EXPECT_EQ(fitted.token_bin(3), 2u);
  EXPECT_EQ(fitted.token_bin(5), 3u);
  EXPECT_DOUBLE_EQ(fitted.contention_shape(2.0, 3), row[2]);
  EXPECT_EQ(spec.token_bin(3), 1u);  // without knots: the step table's (1, 2, 4, ...)
}

// A fused round has its own shape by new tokens, fitted to the fused micro-batches with their own
// fixed time: micro-batches of 1 token at 1.2 x table and of 3 tokens at 2.0 x table (two groups
// side by side) come back as a x shape x table + the fused b, per size; the independent steps'
// shape is not touched by them.
TEST(DeviceProfile, FusedRoundsHaveTheirOwnShape) {
  const TwoDeviceHost host;
  std::vector<RecordedStep> run;
  std::int64_t t = 0;
  for (int i = 0; i < 40; ++i) {  // independent, two sizes side by side: 1.5 x table + 800 us
    const std::int64_t tokens = i % 2 == 0 ? 1 : 32;
    const auto d = static_cast<std::int64_t>(1.5 * host.predicted(tokens) + 800.0);
    for (int dev = 0; dev < 2; ++dev) run.push_back(RecordedStep{t + d, d, 1, 1, tokens, 1, 10, 0, dev});
    t += d + 10;
  }
  for (int i = 0; i < 60; ++i) {  // two fused groups side by side
    const std::int64_t tokens = i % 2 == 0 ? 1 : 3;
    const auto d = static_cast<std::int64_t>((tokens == 1 ? 1.2 : 2.0) * host.predicted(tokens, tokens));
    for (int unit = 0; unit < 2; ++unit) run.push_back(RecordedStep{t + d, d, 2, tokens, tokens, tokens, 10, 0, 2 * unit});
    t += d + 10;
  }
  const std::vector<std::vector<RecordedStep>> runs{run};
  const HostContentionFit fit = fit_host_contention(host.cost, host.m.num_layers, runs, 0.0, 2);
  ASSERT_EQ(fit.fused_token_shape.size(), 2u);
  const std::vector<double>& row = fit.fused_token_shape[1];
  for (const std::int64_t tokens : {1, 3}) {
    const double want = (tokens == 1 ? 1.2 : 2.0) * host.predicted(tokens, tokens);
    const double got = fit.factor[1] * row[knot_bin(fit.token_knots, tokens)] * host.predicted(tokens, tokens) + fit.fused_fixed_us[1];
    EXPECT_NEAR(got, want, 0.01 * want) << tokens << " tokens";
  }
  EXPECT_NEAR(fit.factor[1], 1.5, 0.03);  // the independent steps' curve
  for (double v : fit.token_shape[1]) EXPECT_NEAR(v, 1.0, 0.02);
  GpuSpec spec = host.spec;
  spec.host_contention = fit.factor;
  spec.host_contention_token_knots = fit.token_knots;
  spec.host_contention_fused_tokens = fit.fused_token_shape;
  EXPECT_DOUBLE_EQ(spec.contention_shape(2.0, 3, true), row[2]);
  EXPECT_DOUBLE_EQ(spec.contention_shape(2.0, 3, false), 1.0);  // no independent shape in this spec
}

// One policy's window against the run's fit: steps that follow the fit exactly give 1, the same
// steps 1.25x as long (link time apart) give 1.25, and scale_host_speed scales every fitted host
// term by it (the step table stays).
TEST(DeviceProfile, HostSpeedRatioOfAWindow) {
  const TwoDeviceHost host;
  const model::ModelConfig& m = host.m;
  const GpuSpec& spec = host.spec;
  const CostModel& cost = host.cost;
  const auto predicted = [&](std::int64_t tokens) { return host.predicted(tokens); };
  // Two devices side by side at 1.5 x table + 800 us, plain and with 8 swapped blocks at 100 us
  // each plus 1 ms of wait.
  const auto window = [&](double slow) {
    std::vector<RecordedStep> run;
    std::int64_t t = 0;
    for (int i = 0; i < 80; ++i) {
      const std::int64_t tokens = i % 3 == 0 ? 32 : 1;
      const std::int64_t blocks = i % 4 == 0 ? 8 : 0;
      const double compute = slow * (1.5 * predicted(tokens) + 800.0 + (blocks > 0 ? 1000.0 : 0.0));
      const auto d = static_cast<std::int64_t>(std::llround(compute + 100.0 * static_cast<double>(blocks)));
      for (int dev = 0; dev < 2; ++dev) run.push_back(RecordedStep{t + d, d, 1, 1, tokens, 1, 10, blocks, dev});
      t += d + 10;
    }
    return run;
  };
  const std::vector<std::vector<RecordedStep>> runs{window(1.0)};
  const HostContentionFit fit = fit_host_contention(cost, m.num_layers, runs, 100.0, 2);
  GpuSpec fitted = spec;
  apply_host_fit(fit, &fitted);
  EXPECT_NEAR(host_speed_ratio(cost, m.num_layers, fitted, window(1.0), 100.0), 1.0, 0.01);
  EXPECT_NEAR(host_speed_ratio(cost, m.num_layers, fitted, window(1.25), 100.0), 1.25, 0.01);
  GpuSpec scaled = spec;
  scaled.host_contention = {1.0, 1.5};
  scaled.host_contention_us = {0.0, 800.0};
  scaled.host_contention_fused_us = {0.0, 300.0};
  scaled.host_idle_gap_us = {10'000.0};
  scaled.host_idle_us = {2000.0};
  scaled.host_swap_us = 1000.0;
  scale_host_speed(&scaled, 1.25);
  EXPECT_EQ(scaled.host_contention, (std::vector<double>{1.25, 1.875}));
  EXPECT_EQ(scaled.host_contention_us, (std::vector<double>{0.0, 1000.0}));
  EXPECT_EQ(scaled.host_contention_fused_us, (std::vector<double>{0.0, 375.0}));
  EXPECT_EQ(scaled.host_idle_gap_us, (std::vector<double>{10'000.0}));
  EXPECT_EQ(scaled.host_idle_us, (std::vector<double>{2500.0}));
  EXPECT_DOUBLE_EQ(scaled.host_swap_us, 1250.0);
  EXPECT_EQ(scaled.table_us, spec.table_us);
}

// A run whose steps at 1 device take the table's time and at 2 devices 1.5 x table + 800 us gives
// back those curves; a count with too few steps takes the previous count's values; steps of a
// fused group or with swap copies are not fitted.
TEST(DeviceProfile, FitHostContentionRecoversTheRunsCurves) {
  const TwoDeviceHost host;
  const model::ModelConfig& m = host.m;
  const CostModel& cost = host.cost;
  const auto predicted = [&](std::int64_t tokens) { return host.predicted(tokens); };
  std::vector<RecordedStep> run;
  std::int64_t t = 0;
  for (int i = 0; i < 60; ++i) {  // alone
    const std::int64_t tokens = i % 3 == 0 ? 32 : 1;
    RecordedStep r{t + static_cast<std::int64_t>(predicted(tokens)), static_cast<std::int64_t>(predicted(tokens)), 1, 1, tokens, 1, 10, 0};
    run.push_back(r);
    t = r.end_us + 10;
  }
  for (int i = 0; i < 60; ++i) {  // two devices, each step exactly beside the other's
    const std::int64_t tokens = i % 3 == 0 ? 32 : 1;
    const auto d = static_cast<std::int64_t>(1.5 * predicted(tokens) + 800.0);
    for (int dev = 0; dev < 2; ++dev) run.push_back(RecordedStep{t + d, d, 1, 1, tokens, 1, 10, 0});
    t += d + 10;
  }
  for (int i = 0; i < 30; ++i) {  // two fused groups' micro-batches side by side: 1.5 x table + 300 us
    const std::int64_t tokens = i % 3 == 0 ? 32 : 1;
    const auto d = static_cast<std::int64_t>(1.5 * predicted(tokens) + 300.0);
    for (int unit = 0; unit < 2; ++unit) run.push_back(RecordedStep{t + d, d, 2, 1, tokens, 1, 10, 0});
    t += d + 10;
  }
  run.push_back(RecordedStep{t + 5000, 5000, 2, 1, 1, 1, 10, 0});        // a fused step alone: too few at 1
  run.push_back(RecordedStep{t + 20000, 9000, 1, 1, 1, 1, 10, 3});       // swap copies
  t += 20000;
  for (int i = 0; i < 6; ++i) {  // alone after 50 ms idle: 2 ms more than the table
    t += 50'000;
    const auto d = static_cast<std::int64_t>(predicted(1) + 2000.0);
    run.push_back(RecordedStep{t + d, d, 1, 1, 1, 1, 10, 0});
    t += d;
  }
  const std::vector<std::vector<RecordedStep>> runs{run};
  const HostContentionFit fit = fit_host_contention(cost, m.num_layers, runs, 0.0, 3);
  // Idle spells: the 6 steps after 50 ms took 2 ms more; the run's first step (no step before
  // it: an infinite spell, alone) is the only one in the last bin, which takes the shorter
  // spell's value; nothing in the first bin: 0.
  EXPECT_EQ(fit.idle_gap_us, default_idle_gap_knots_us());
  EXPECT_EQ(fit.idle_steps, (std::vector<std::int64_t>{0, 6, 0, 1}));
  ASSERT_EQ(fit.idle_us.size(), 4u);
  EXPECT_DOUBLE_EQ(fit.idle_us[0], 0.0);
  EXPECT_NEAR(fit.idle_us[1], 2000.0, 2.0);
  EXPECT_EQ(fit.idle_us[2], fit.idle_us[1]);
  EXPECT_EQ(fit.idle_us[3], fit.idle_us[2]);
  // Steps that follow a x table + b exactly have no shape beyond it.
  for (const auto& row : fit.token_shape) {
    for (double v : row) EXPECT_NEAR(v, 1.0, 0.01);
  }
  // Fused rounds: their own fixed time at the count's factor; too few at a count: the count
  // below's fused value if it had enough, else the independent steps' value.
  EXPECT_EQ(fit.fused_steps, (std::vector<std::int64_t>{1, 60, 0}));
  ASSERT_EQ(fit.fused_fixed_us.size(), 3u);
  EXPECT_EQ(fit.fused_fixed_us[0], fit.fixed_us[0]);
  EXPECT_NEAR(fit.fused_fixed_us[1], 300.0, 2.0);
  EXPECT_EQ(fit.fused_fixed_us[2], fit.fused_fixed_us[1]);
  ASSERT_EQ(fit.factor.size(), 3u);
  EXPECT_EQ(fit.steps, (std::vector<std::int64_t>{59, 120, 0}));  // the run's first step follows an idle spell
  EXPECT_NEAR(fit.factor[0], 1.0, 1e-3);
  EXPECT_NEAR(fit.fixed_us[0], 0.0, 1.0);
  EXPECT_NEAR(fit.factor[1], 1.5, 1e-3);
  EXPECT_NEAR(fit.fixed_us[1], 800.0, 2.0);
  EXPECT_EQ(fit.factor[2], fit.factor[1]);  // no steps at 3: the count below's values
  EXPECT_EQ(fit.fixed_us[2], fit.fixed_us[1]);
  EXPECT_DOUBLE_EQ(fit.measured_over_table[2], 0.0);
}

}  // namespace
}  // namespace kun::sim
