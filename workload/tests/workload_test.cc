#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "common/test_support.h"
#include "workload/generators.h"
#include "workload/random.h"
#include "workload/stats.h"
#include "workload/trace.h"

namespace kun::workload {
namespace {

TEST(TimestampTest, ParsesAzureFormatTruncatingTo6Digits) {
  auto a = parse_timestamp_us("2023-11-16 18:17:03.9799600");
  auto b = parse_timestamp_us("2023-11-16 18:17:04.0319609");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*b - *a, 52'000);  // 04.031960(9) - 03.979960
  auto epoch = parse_timestamp_us("1970-01-02 00:00:01");
  ASSERT_TRUE(epoch.ok());
  EXPECT_EQ(*epoch, (86'400 + 1) * 1'000'000LL);
  EXPECT_FALSE(parse_timestamp_us("2023-13-16 18:17:03.97").ok());
  EXPECT_FALSE(parse_timestamp_us("yesterday").ok());
  EXPECT_FALSE(parse_timestamp_us("2023-11-16 18:17:03.9x").ok());
}

TEST(AzureCsvTest, ParsesRowsRelativeToFirst) {
  const std::string text =
      "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
      "2023-11-16 18:17:03.9799600,4808,10\r\n"
      "2023-11-16 18:17:04.0319600,3180,8\r\n"
      "2023-11-16 18:17:05.0000000,110,27\r\n\r\n";
  auto t = parse_azure_csv(text, "x.csv");
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  ASSERT_EQ(t->size(), 3u);
  EXPECT_EQ(t->requests[0].arrival_us, 0);
  EXPECT_EQ(t->requests[1].arrival_us, 52'000);
  EXPECT_EQ(t->requests[2].arrival_us, 1'020'040);
  EXPECT_EQ(t->requests[0].prompt_tokens, 4808);
  EXPECT_EQ(t->requests[2].output_tokens, 27);
}

TEST(AzureCsvTest, MalformedRowsNameFileAndLine) {
  const std::string header = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
  const std::string good = "2023-11-16 18:17:03.9799600,4808,10\n";
  auto bad_count = parse_azure_csv(header + good + "2023-11-16 18:17:04.0,12\n", "t.csv");
  ASSERT_FALSE(bad_count.ok());
  EXPECT_EQ(bad_count.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad_count.status().message().find("t.csv:3:"), std::string::npos) << bad_count.status().message();
  auto bad_num = parse_azure_csv(header + good + good + "2023-11-16 18:17:04.0,abc,3\n", "t.csv");
  ASSERT_FALSE(bad_num.ok());
  EXPECT_NE(bad_num.status().message().find("t.csv:4: bad ContextTokens"), std::string::npos)
      << bad_num.status().message();
  auto bad_ts = parse_azure_csv(header + "18:17:04,1,3\n", "t.csv");
  ASSERT_FALSE(bad_ts.ok());
  EXPECT_NE(bad_ts.status().message().find("t.csv:2:"), std::string::npos);
  auto negative = parse_azure_csv(header + "2023-11-16 18:17:04.0,-5,3\n", "t.csv");
  EXPECT_FALSE(negative.ok());
  auto no_header = parse_azure_csv("a,b,c\n1,2,3\n", "t.csv");
  EXPECT_FALSE(no_header.ok());
  EXPECT_FALSE(parse_azure_csv("", "t.csv").ok());
  auto missing = read_azure_csv("/nonexistent/dir/trace.csv");
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
}

TEST(BurstGptCsvTest, ParsesAndFilters) {
  const std::string text =
      "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
      "5,ChatGPT,472,18,490,Conversation log\n"
      "45,ChatGPT,1087,0,1087,Conversation log\n"
      "46.5,GPT-4,417,276,693,Conversation log\n";
  auto t = parse_burstgpt_csv(text, "b.csv");
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  ASSERT_EQ(t->size(), 3u);
  EXPECT_EQ(t->requests[0].arrival_us, 0);
  EXPECT_EQ(t->requests[2].arrival_us, 41'500'000);
  EXPECT_EQ(t->requests[1].output_tokens, 0);
  auto gpt4 = parse_burstgpt_csv(text, "b.csv", "GPT-4");
  ASSERT_TRUE(gpt4.ok());
  ASSERT_EQ(gpt4->size(), 1u);
  EXPECT_EQ(gpt4->requests[0].prompt_tokens, 417);
  auto bad = parse_burstgpt_csv(text + "x,GPT-4,1,2,3,Conversation log\n", "b.csv");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("b.csv:5: bad Timestamp"), std::string::npos) << bad.status().message();
}

TEST(ReadTraceCsvTest, DetectsFormatFromHeader) {
  const auto dir = std::filesystem::temp_directory_path();
  const std::string azure = (dir / "kun_workload_test_azure.csv").string();
  const std::string burst = (dir / "kun_workload_test_burst.csv").string();
  const std::string other = (dir / "kun_workload_test_other.csv").string();
  std::ofstream(azure) << "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,2\n";
  std::ofstream(burst) << "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,ChatGPT,3,4,7,API log\n";
  std::ofstream(other) << "a,b\n1,2\n";
  auto a = read_trace_csv(azure);
  auto b = read_trace_csv(burst);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->requests[0].prompt_tokens, 10);
  EXPECT_EQ(b->requests[0].output_tokens, 4);
  EXPECT_FALSE(read_trace_csv(other).ok());
  std::filesystem::remove(azure);
  std::filesystem::remove(burst);
  std::filesystem::remove(other);
}

// The shipped demo window must parse and be bursty without ../shared.
TEST(ShippedWindowTest, ParsesAndIsBursty) {
  const std::string path = (test_support::source_dir() / "workload" / "data" / "azure_code_burst_window.csv").string();
  auto t = read_azure_csv(path);
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  const TraceStats s = compute_stats(*t);
  std::printf("shipped window: n=%lld span=%.1f s cv=%.2f peak/mean 1s=%.1f 10s=%.1f 60s=%.1f\n",
              static_cast<long long>(s.num_requests), s.span_s, s.interarrival_cv, s.peak_to_mean_1s,
              s.peak_to_mean_10s, s.peak_to_mean_60s);
  EXPECT_GT(s.num_requests, 300);
  EXPECT_GE(s.span_s, 240.0);
  EXPECT_LE(s.span_s, 600.0);
  EXPECT_GT(s.interarrival_cv, 3.0);
  EXPECT_GT(s.peak_to_mean_10s, 3.0);
}

TEST(RngTest, DeterministicAndMomentsRight) {
  Rng a(42), b(42), c(43);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(a.next_u64(), b.next_u64());
  EXPECT_NE(Rng(42).next_u64(), c.next_u64());
  Rng r(7);
  for (double shape : {0.05, 0.6, 1.0, 4.0}) {
    double sum = 0.0, ss = 0.0;
    const int n = 200'000;
    for (int i = 0; i < n; ++i) {
      const double x = r.gamma(shape, 2.0);
      ASSERT_GE(x, 0.0);
      sum += x;
      ss += x * x;
    }
    const double mean = sum / n;
    const double var = ss / n - mean * mean;
    EXPECT_NEAR(mean, 2.0 * shape, 0.03 * 2.0 * shape + 0.01) << "shape " << shape;
    EXPECT_NEAR(var, 4.0 * shape, 0.1 * 4.0 * shape) << "shape " << shape;
  }
}

TEST(GeneratorTest, PoissonRateAndCv) {
  PoissonSpec spec;
  spec.rate_rps = 20.0;
  spec.duration_us = 600'000'000;
  spec.seed = 3;
  const Trace t = generate_poisson(spec);
  const TraceStats s = compute_stats(t);
  EXPECT_NEAR(s.mean_rate_rps, 20.0, 0.5);
  EXPECT_NEAR(s.interarrival_cv, 1.0, 0.03);
  EXPECT_LT(t.span_us(), spec.duration_us);
  const Trace again = generate_poisson(spec);
  ASSERT_EQ(again.size(), t.size());
  for (std::size_t i = 0; i < t.size(); ++i) EXPECT_EQ(again.requests[i].arrival_us, t.requests[i].arrival_us);
}

TEST(GeneratorTest, GammaHitsRequestedCv) {
  for (double cv : {0.5, 2.0, 4.0}) {
    GammaSpec spec;
    spec.rate_rps = 10.0;
    spec.cv = cv;
    spec.duration_us = 3600'000'000LL;
    spec.lengths = LengthModel::lognormal(1000, 1.0, 100, 0.8);
    spec.seed = 11;
    const TraceStats s = compute_stats(generate_gamma(spec));
    EXPECT_NEAR(s.mean_rate_rps, 10.0, 10.0 * (0.02 + 0.03 * cv)) << "cv " << cv;
    EXPECT_NEAR(s.interarrival_cv, cv, 0.1 * cv) << "cv " << cv;
    EXPECT_NEAR(s.prompt_tokens.p50, 1000, 50);
    EXPECT_NEAR(s.output_tokens.p50, 100, 5);
  }
}

TEST(GeneratorTest, MmppMeanRateAndBurstiness) {
  MmppSpec spec;
  spec.low_rate_rps = 2.0;
  spec.high_rate_rps = 40.0;
  spec.mean_low_s = 20.0;
  spec.mean_high_s = 5.0;
  spec.duration_us = 36'000'000'000LL;  // 10 h: ~1440 on/off cycles
  spec.lengths = LengthModel::fixed(100, 10);
  spec.seed = 5;
  const Trace t = generate_mmpp(spec);
  const TraceStats s = compute_stats(t);
  const double want = (2.0 * 20.0 + 40.0 * 5.0) / 25.0;  // 9.6 rps
  EXPECT_NEAR(s.mean_rate_rps, want, 0.1 * want);
  EXPECT_GT(s.interarrival_cv, 1.3);
  EXPECT_GT(s.peak_to_mean_10s, 3.0);
  EXPECT_EQ(t.requests[0].prompt_tokens, 100);
}

TEST(GeneratorTest, PiecewiseFollowsRatesAndLeavesZeroWindowsEmpty) {
  PiecewiseSpec spec;
  spec.rates_rps = {0.0, 100.0, 0.0, 0.0, 10.0, 0.0};
  spec.window_us = 1'000'000;
  spec.cv = 1.5;
  spec.lengths = LengthModel::fixed(8, 4);
  spec.seed = 9;
  const Trace t = generate_piecewise(spec);
  const auto counts = window_counts(t, 1'000'000);
  ASSERT_GE(counts.size(), 5u);
  EXPECT_EQ(counts[0], 0);
  EXPECT_NEAR(counts[1], 100, 40);
  EXPECT_EQ(counts[2], 0);
  EXPECT_EQ(counts[3], 0);
  EXPECT_LE(counts.size(), 5u);  // nothing in window 5
}

TEST(TransformTest, CompressWindowClipUpscale) {
  Trace t;
  t.name = "t";
  for (int i = 0; i < 10; ++i) t.requests.push_back({i * 1'000'000LL, 100 * (i + 1), 10 * (i + 1)});
  const Trace fast = time_compress(t, 2.0);
  EXPECT_EQ(fast.requests[9].arrival_us, 4'500'000);
  const Trace win = select_window(t, 3'000'000, 4'000'000);
  ASSERT_EQ(win.size(), 4u);
  EXPECT_EQ(win.requests[0].arrival_us, 0);
  EXPECT_EQ(win.requests[0].prompt_tokens, 400);
  const Trace clipped = clip_lengths(t, 512, 60);
  for (const auto& r : clipped.requests) {
    EXPECT_LE(r.prompt_tokens + r.output_tokens, 512);
    EXPECT_LE(r.output_tokens, 60);
    EXPECT_GE(r.prompt_tokens, 1);
  }
  EXPECT_EQ(clipped.requests[9].output_tokens, 60);
  EXPECT_EQ(clipped.requests[9].prompt_tokens, 452);
  Trace zero;
  zero.requests.push_back({0, 0, 0});
  zero.requests.push_back({1, 10, 5000});
  const Trace z = clip_lengths(zero, 100);
  EXPECT_EQ(z.requests[0].prompt_tokens, 1);
  EXPECT_EQ(z.requests[0].output_tokens, 1);
  EXPECT_EQ(z.requests[1].prompt_tokens, 1);
  EXPECT_EQ(z.requests[1].output_tokens, 99);
  const Trace up = upscale(t, 3.0, 1);
  EXPECT_EQ(up.size(), 30u);
  EXPECT_LE(up.span_us(), t.span_us());
  const Trace down = upscale(t, 0.5, 1);
  EXPECT_LT(down.size(), 10u);
}

TEST(TransformTest, CapIdleGapsKeepsBurstsAndShortensQuietStretches) {
  Trace t;
  t.name = "t";
  // A burst, 20 s of silence, another burst.
  for (std::int64_t us : {0LL, 100'000LL, 200'000LL, 20'200'000LL, 20'250'000LL}) t.requests.push_back({us, 10, 5});
  const Trace capped = cap_idle_gaps(t, 1'000'000);
  ASSERT_EQ(capped.size(), t.size());
  const std::vector<std::int64_t> want = {0, 100'000, 200'000, 1'200'000, 1'250'000};
  for (std::size_t i = 0; i < want.size(); ++i) EXPECT_EQ(capped.requests[i].arrival_us, want[i]) << i;
  EXPECT_EQ(cap_idle_gaps(t, 30'000'000).requests.back().arrival_us, 20'250'000) << "gaps under the cap stay";
}

TEST(StatsTest, QuantileInterpolatesLinearly) {
  EXPECT_DOUBLE_EQ(quantile({1, 2, 3, 4}, 0.5), 2.5);
  EXPECT_DOUBLE_EQ(quantile({4, 1, 3, 2}, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(quantile({1, 2, 3, 4}, 1.0), 4.0);
  EXPECT_DOUBLE_EQ(quantile({0, 10}, 0.99), 9.9);
  EXPECT_TRUE(std::isnan(quantile({}, 0.5)));
  Trace t;
  for (std::int64_t us : {0, 1'000'000, 1'500'000, 1'600'000, 10'000'000}) t.requests.push_back({us, 1, 1});
  // gaps 1, .5, .1, 8.4 s: mean 2.5, population sd 3.4
  EXPECT_NEAR(interarrival_cv(t), std::sqrt((2.25 + 4 + 5.76 + 34.81) / 4) / 2.5, 1e-9);
  // 1 s windows over [0, 10]: 11 windows, peak 3
  EXPECT_NEAR(peak_to_mean_rate(t, 1'000'000), 3.0 / (5.0 / 11.0), 1e-9);
}

}  // namespace
}  // namespace kun::workload
