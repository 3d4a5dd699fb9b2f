#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "workload/report.h"
#include "workload/stats.h"

namespace kun::workload {
namespace {

// A request arriving at `arrival_ms`, first token after ttft_ms, then n-1 more every gap_ms.
RequestRecord make(std::int64_t index, double arrival_ms, double ttft_ms, double gap_ms, int n) {
  RequestRecord r;
  r.index = index;
  r.arrival_us = static_cast<std::int64_t>(arrival_ms * 1000);
  r.first_token_us = r.arrival_us + static_cast<std::int64_t>(ttft_ms * 1000);
  for (int i = 0; i < n; ++i) r.token_times_us.push_back(r.first_token_us + static_cast<std::int64_t>(i * gap_ms * 1000));
  r.finish_us = r.token_times_us.back();
  r.output_tokens = n;
  r.expected_output_tokens = n;
  return r;
}

TEST(ReportTest, LatencyMathOnHandComputedRecords) {
  std::vector<RequestRecord> recs;
  recs.push_back(make(0, 0, 100, 10, 11));    // ttft 100, tpot 10, e2e 200
  recs.push_back(make(1, 500, 300, 20, 6));   // ttft 300, tpot 20, e2e 400
  recs.push_back(make(2, 1500, 200, 0, 1));   // ttft 200, no tpot, e2e 200
  RequestRecord rejected;
  rejected.index = 3;
  rejected.arrival_us = 2'000'000;
  rejected.finish_us = 2'001'000;
  rejected.outcome = RequestOutcome::kRejected;
  rejected.http_status = 429;
  recs.push_back(rejected);
  recs[0].queue_us = 40'000;
  const Report rep = build_report(recs, "kunserve", SloSpec{250, 15});
  EXPECT_EQ(rep.total, 4);
  EXPECT_EQ(rep.completed, 3);
  EXPECT_EQ(rep.failed, 1);
  EXPECT_EQ(rep.rejected, 1);
  EXPECT_DOUBLE_EQ(rep.ttft_ms.mean, 200.0);
  EXPECT_DOUBLE_EQ(rep.ttft_ms.p50, 200.0);
  EXPECT_DOUBLE_EQ(rep.ttft_ms.p90, 280.0);  // 200 + 0.8 * 100
  EXPECT_DOUBLE_EQ(rep.ttft_ms.p99, 298.0);
  EXPECT_EQ(rep.tpot_ms.count, 2);
  EXPECT_DOUBLE_EQ(rep.tpot_ms.mean, 15.0);
  EXPECT_EQ(rep.itl_ms.count, 15);  // 10 + 5 gaps
  EXPECT_NEAR(rep.itl_ms.mean, (10 * 10.0 + 5 * 20.0) / 15.0, 1e-9);
  EXPECT_DOUBLE_EQ(rep.e2e_ms.p50, 200.0);
  EXPECT_EQ(rep.queue_ms.count, 1);
  EXPECT_DOUBLE_EQ(rep.queue_ms.mean, 40.0);
  // SLO: request 0 meets both; 1 misses ttft and tpot; 2 meets (no tpot); 3 failed.
  EXPECT_EQ(rep.slo_met, 2);
  EXPECT_DOUBLE_EQ(rep.slo_attainment, 0.5);
  EXPECT_DOUBLE_EQ(rep.slo_ttft_attainment, 0.5);
  EXPECT_DOUBLE_EQ(rep.slo_tpot_attainment, 0.5);
  // duration: first arrival 0 to last event max(1.7 s, 2.001 s)
  EXPECT_DOUBLE_EQ(rep.duration_s, 2.001);
  EXPECT_DOUBLE_EQ(rep.goodput_rps, 2 / 2.001);

  const nlohmann::json j = report_to_json(rep);
  EXPECT_EQ(j["policy"], "kunserve");
  EXPECT_EQ(j["requests"]["completed"], 3);
  EXPECT_EQ(j["requests"]["failed"], 1);
  EXPECT_EQ(j["requests"]["total"], 4);
  for (const char* k : {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "queue_ms"}) {
    for (const char* p : {"mean", "p50", "p90", "p99", "p999"}) EXPECT_TRUE(j[k].contains(p)) << k << "." << p;
  }
  EXPECT_DOUBLE_EQ(j["ttft_ms"]["p90"].get<double>(), 280.0);
  EXPECT_DOUBLE_EQ(j["slo"]["attainment"].get<double>(), 0.5);
  EXPECT_TRUE(j.contains("goodput_rps"));
  EXPECT_TRUE(j.contains("duration_s"));
  const std::string table = format_report_table({rep, rep});
  EXPECT_NE(table.find("TTFT p99 ms"), std::string::npos);
}

TEST(ReportTest, EmptyInputGivesNullPercentiles) {
  const Report rep = build_report({}, "none", SloSpec{});
  EXPECT_EQ(rep.total, 0);
  const nlohmann::json j = report_to_json(rep);
  EXPECT_TRUE(j["ttft_ms"]["p99"].is_null());
  EXPECT_EQ(j["requests"]["total"], 0);
}

TEST(TimelineTest, BucketsArrivalsCompletionsTokensAndGauges) {
  std::vector<RequestRecord> recs;
  recs.push_back(make(0, 100, 200, 300, 4));   // arrive 0 s, tokens .3 .6 .9 1.2, finish 1.2 s
  recs.push_back(make(1, 900, 600, 100, 2));   // arrive 0 s, tokens 1.5 1.6, finish 1.6 s
  recs.push_back(make(2, 2500, 100, 100, 1));  // arrive 2 s, token 2.6
  RequestRecord failed;
  failed.index = 3;
  failed.arrival_us = 2'100'000;
  failed.finish_us = 3'200'000;
  failed.outcome = RequestOutcome::kFailed;
  recs.push_back(failed);
  std::vector<GaugeSample> gauges = {{500'000, "demand{instance=\"0\"}", 0.5},
                                     {900'000, "demand{instance=\"0\"}", 0.7},
                                     {1'100'000, "group_state", 2.0}};
  const Timeline tl = build_timeline(recs, gauges);
  ASSERT_EQ(tl.rows.size(), 4u);
  EXPECT_EQ(tl.rows[0].arrivals, 2);
  EXPECT_EQ(tl.rows[2].arrivals, 2);
  EXPECT_EQ(tl.rows[1].completions, 2);
  EXPECT_EQ(tl.rows[2].completions, 1);
  EXPECT_EQ(tl.rows[3].failures, 1);
  EXPECT_DOUBLE_EQ(tl.rows[0].output_tokens, 3.0);
  EXPECT_DOUBLE_EQ(tl.rows[1].output_tokens, 3.0);
  EXPECT_DOUBLE_EQ(tl.rows[0].mean_ttft_ms, 400.0);
  EXPECT_TRUE(std::isnan(tl.rows[1].mean_ttft_ms));
  ASSERT_EQ(tl.gauge_series.size(), 2u);
  EXPECT_EQ(tl.gauge_series[0], "demand{instance=\"0\"}");
  EXPECT_DOUBLE_EQ(tl.rows[0].gauges[0], 0.7);
  EXPECT_TRUE(std::isnan(tl.rows[0].gauges[1]));
  EXPECT_DOUBLE_EQ(tl.rows[1].gauges[1], 2.0);
  const std::string csv = timeline_to_csv(tl);
  EXPECT_EQ(csv.substr(0, csv.find('\n')),
            "t_s,arrivals,completions,failures,output_tokens_per_s,mean_ttft_ms,\"demand{instance=\"\"0\"\"}\",group_state")
      << csv;
  EXPECT_NE(csv.find("\n0,2,0,0,3,400,0.7,\n"), std::string::npos) << csv;
}

}  // namespace
}  // namespace kun::workload

namespace kun::workload {
namespace {

// summarize() sorts large inputs by radix over the bit patterns: the same mean and quantiles, to
// the bit, as a comparison sort, with negatives, zeros, duplicates and wide exponents.
TEST(Summarize, LargeInputsMatchAComparisonSortExactly) {
  std::mt19937_64 rng(7);
  std::vector<double> values;
  for (int i = 0; i < 50000; ++i) {
    const double x = std::ldexp(std::uniform_real_distribution<double>(0.0, 1.0)(rng), static_cast<int>(rng() % 40) - 20);
    values.push_back(i % 7 == 0 ? -x : x);
    if (i % 101 == 0) values.push_back(0.0);
    if (i % 13 == 0) values.push_back(values[static_cast<std::size_t>(rng() % values.size())]);
  }
  std::vector<double> sorted = values;
  std::sort(sorted.begin(), sorted.end());
  const Summary s = summarize(values);
  EXPECT_EQ(s.count, static_cast<std::int64_t>(values.size()));
  EXPECT_EQ(s.mean, std::accumulate(sorted.begin(), sorted.end(), 0.0) / static_cast<double>(sorted.size()));
  EXPECT_EQ(s.p50, quantile_sorted(sorted, 0.50));
  EXPECT_EQ(s.p90, quantile_sorted(sorted, 0.90));
  EXPECT_EQ(s.p99, quantile_sorted(sorted, 0.99));
  EXPECT_EQ(s.p999, quantile_sorted(sorted, 0.999));
  EXPECT_EQ(quantile(values, 0.25), quantile_sorted(sorted, 0.25));
}

// summarize_us_as_ms (the report's per-token latencies) gives summarize() of us / 1000.0 to the
// bit: small and multi-digit (> 2^32) values, duplicates and zeros, above and below the radix size.
TEST(Summarize, MicrosecondsAsMillisecondsMatchSummarizeExactly) {
  for (const std::size_t n : {std::size_t{1000}, std::size_t{70000}}) {
    for (const std::uint64_t range : {std::uint64_t{200000}, std::uint64_t{1} << 40}) {
      std::mt19937_64 rng(n + range);
      std::vector<std::int64_t> us;
      for (std::size_t i = 0; i < n; ++i) us.push_back(i % 97 == 0 ? 0 : static_cast<std::int64_t>(rng() % range));
      std::vector<double> ms;
      for (std::int64_t x : us) ms.push_back(static_cast<double>(x) / 1000.0);
      const Summary want = summarize(ms);
      const Summary got = summarize_us_as_ms(us);
      EXPECT_EQ(got.count, want.count);
      EXPECT_EQ(got.mean, want.mean) << n << " values below " << range;
      EXPECT_EQ(got.p50, want.p50);
      EXPECT_EQ(got.p90, want.p90);
      EXPECT_EQ(got.p99, want.p99);
      EXPECT_EQ(got.p999, want.p999);
    }
  }
  EXPECT_TRUE(std::isnan(summarize_us_as_ms({}).mean));
  EXPECT_EQ(summarize_us_as_ms({-5, 7}).p50, summarize({-0.005, 0.007}).p50);  // negatives: the plain path
}

}  // namespace
}  // namespace kun::workload
