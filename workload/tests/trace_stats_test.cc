// Checks the statistics of the real traces in ../shared/traces against the table in
// ../shared/traces/README.md, and that the piecewise generator fed from the code trace
// reproduces them. Skipped when ../shared is absent (the project must run without it).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "common/test_support.h"
#include "workload/generators.h"
#include "workload/stats.h"
#include "workload/trace.h"

namespace kun::workload {
namespace {

std::string shared_traces_dir() {
  return (test_support::source_dir() / ".." / "shared" / "traces").string();
}

std::string trace_path(const std::string& kind) {
  return shared_traces_dir() + "/AzureLLMInferenceTrace_" + kind + "_2023.csv";
}

void print_stats(const char* label, const TraceStats& s) {
  std::printf(
      "%-10s n=%lld span=%.1f min rate=%.2f rps cv=%.2f peak/mean 1s=%.1f 10s=%.1f 60s=%.1f "
      "in p10/50/90/99=%.0f/%.0f/%.0f/%.0f out=%.0f/%.0f/%.0f/%.0f\n",
      label, static_cast<long long>(s.num_requests), s.span_s / 60.0, s.mean_rate_rps, s.interarrival_cv,
      s.peak_to_mean_1s, s.peak_to_mean_10s, s.peak_to_mean_60s, s.prompt_tokens.p10, s.prompt_tokens.p50,
      s.prompt_tokens.p90, s.prompt_tokens.p99, s.output_tokens.p10, s.output_tokens.p50, s.output_tokens.p90,
      s.output_tokens.p99);
}

// The README table rounds to the shown digits; we require agreement to that rounding.
struct Expected {
  const char* kind;
  std::int64_t requests;
  double span_min, rate_rps, cv, p1, p10, p60;
  Quantiles4 in, out;
};

class SharedTraceTest : public ::testing::TestWithParam<Expected> {};

TEST_P(SharedTraceTest, StatsMatchReadmeTable) {
  const Expected& e = GetParam();
  const std::string path = trace_path(e.kind);
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "no " << path << " (../shared absent)";
  auto trace = read_azure_csv(path);
  ASSERT_TRUE(trace.ok()) << trace.status().to_string();
  const TraceStats s = compute_stats(*trace);
  print_stats(e.kind, s);
  EXPECT_EQ(s.num_requests, e.requests);
  EXPECT_EQ(static_cast<int>(s.span_s / 60.0), static_cast<int>(e.span_min));
  EXPECT_NEAR(s.mean_rate_rps, e.rate_rps, 0.005);
  EXPECT_NEAR(s.interarrival_cv, e.cv, e.cv >= 10 ? 0.05 : 0.005);
  EXPECT_NEAR(s.peak_to_mean_1s, e.p1, 0.05);
  EXPECT_NEAR(s.peak_to_mean_10s, e.p10, 0.05);
  EXPECT_NEAR(s.peak_to_mean_60s, e.p60, 0.05);
  EXPECT_NEAR(s.prompt_tokens.p10, e.in.p10, 0.5);
  EXPECT_NEAR(s.prompt_tokens.p50, e.in.p50, 0.5);
  EXPECT_NEAR(s.prompt_tokens.p90, e.in.p90, 0.5);
  EXPECT_NEAR(s.prompt_tokens.p99, e.in.p99, 0.5);
  EXPECT_NEAR(s.output_tokens.p10, e.out.p10, 0.5);
  EXPECT_NEAR(s.output_tokens.p50, e.out.p50, 0.5);
  EXPECT_NEAR(s.output_tokens.p90, e.out.p90, 0.5);
  EXPECT_NEAR(s.output_tokens.p99, e.out.p99, 0.5);
}

INSTANTIATE_TEST_SUITE_P(
    Azure2023, SharedTraceTest,
    ::testing::Values(Expected{"code", 8819, 57, 2.57, 13.2, 26.1, 12.8, 4.2, {147, 1469, 5188, 7436}, {7, 13, 55, 251}},
                      Expected{"conv", 19366, 58, 5.53, 1.09, 2.9, 1.8, 1.5, {207, 1020, 2734, 4142}, {54, 129, 424, 601}}),
    [](const auto& param_info) { return std::string(param_info.param.kind); });

// Tolerances for the piecewise generator fed from the code trace (1 s windows), relative to the
// source's statistics (also stated in workload/README.md). The generator is random: a count in a
// window of n expected requests varies by about cv * sqrt(n), and a peak is a maximum over many
// such windows, so single seeds get loose bounds and the mean over 5 seeds tight ones.
//                                    each seed    mean of 5 seeds
//   request count / mean rate          +-5 %          +-3 %
//   inter-arrival CV                   +-10 %         +-5 %
//   peak/mean at 1 s                   +-30 %         +-25 % (biased up: the peak of noisy
//                                                     counts exceeds the peak rate; ~+17 %)
//   peak/mean at 10 s and 60 s         +-20 %         +-10 %
//   length quantiles p10/50/90/99      +-10 %         +-5 %   (resampled from the source)
TEST(PiecewiseGeneratorTest, ReproducesCodeTraceStatistics) {
  const std::string path = trace_path("code");
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "no " << path << " (../shared absent)";
  auto source = read_azure_csv(path);
  ASSERT_TRUE(source.ok()) << source.status().to_string();
  const TraceStats want = compute_stats(*source);
  print_stats("source", want);
  auto values = [](const TraceStats& s) {
    return std::vector<double>{static_cast<double>(s.num_requests), s.interarrival_cv, s.peak_to_mean_1s,
                               s.peak_to_mean_10s, s.peak_to_mean_60s, s.prompt_tokens.p10, s.prompt_tokens.p50,
                               s.prompt_tokens.p90, s.prompt_tokens.p99, s.output_tokens.p10, s.output_tokens.p50,
                               s.output_tokens.p90, s.output_tokens.p99};
  };
  const char* names[] = {"requests", "cv", "peak/mean 1s", "peak/mean 10s", "peak/mean 60s", "in p10", "in p50",
                         "in p90", "in p99", "out p10", "out p50", "out p90", "out p99"};
  const double tol_seed[] = {0.05, 0.10, 0.30, 0.20, 0.20, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10};
  const double tol_mean[] = {0.03, 0.05, 0.25, 0.10, 0.10, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05};
  const std::vector<double> w = values(want);
  std::vector<double> sum(w.size(), 0.0);
  constexpr int kSeeds = 5;
  for (std::uint64_t seed = 1; seed <= kSeeds; ++seed) {
    const PiecewiseSpec spec = piecewise_from_trace(*source, 1'000'000, seed);
    if (seed == 1) std::printf("operational-time cv (within-window gamma cv) = %.3f\n", spec.cv);
    const Trace gen = generate_piecewise(spec);
    const TraceStats got = compute_stats(gen);
    print_stats(("seed " + std::to_string(seed)).c_str(), got);
    const std::vector<double> g = values(got);
    for (std::size_t i = 0; i < g.size(); ++i) {
      sum[i] += g[i];
      EXPECT_LT(std::abs(g[i] - w[i]) / w[i], tol_seed[i]) << names[i] << " seed " << seed << ": " << g[i] << " vs " << w[i];
    }
  }
  for (std::size_t i = 0; i < w.size(); ++i) {
    const double mean = sum[i] / kSeeds;
    std::printf("  %-14s source %9.2f  generated mean %9.2f  (%+.1f %%)\n", names[i], w[i], mean, 100.0 * (mean - w[i]) / w[i]);
    EXPECT_LT(std::abs(mean - w[i]) / w[i], tol_mean[i]) << names[i] << ": mean " << mean << " vs " << w[i];
  }
}

// Up-scaling keeps the burst shape: the same peak/mean at 10 s and 60 s at twice the rate.
TEST(UpscaleTest, CodeTraceKeepsBurstShape) {
  const std::string path = trace_path("code");
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "no " << path << " (../shared absent)";
  auto source = read_azure_csv(path);
  ASSERT_TRUE(source.ok());
  const TraceStats want = compute_stats(*source);
  const Trace up = upscale(*source, 2.0, 7);
  const TraceStats got = compute_stats(up);
  print_stats("x2 upscale", got);
  EXPECT_NEAR(got.mean_rate_rps / want.mean_rate_rps, 2.0, 0.05);
  EXPECT_NEAR(got.peak_to_mean_10s / want.peak_to_mean_10s, 1.0, 0.10);
  EXPECT_NEAR(got.peak_to_mean_60s / want.peak_to_mean_60s, 1.0, 0.10);
}

}  // namespace
}  // namespace kun::workload
