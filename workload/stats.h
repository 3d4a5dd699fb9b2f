// Trace statistics and the percentile rule shared by every report.
//
// Percentile rule (everywhere in this module): linear interpolation between closest ranks
// (Hyndman-Fan type 7, numpy's default): for sorted x[0..n-1] and q in [0, 1], h = q * (n - 1),
// result = x[floor h] + (h - floor h) * (x[floor h + 1] - x[floor h]). Empty input gives NaN.
#pragma once

#include <cstdint>
#include <vector>

#include "workload/trace.h"

namespace kun::workload {

// q in [0, 1]; `values` need not be sorted.
double quantile(std::vector<double> values, double q);
// Same on already-sorted values.
double quantile_sorted(const std::vector<double>& sorted, double q);

struct Summary {
  std::int64_t count = 0;
  double mean = 0.0;  // NaN when count == 0 (so are the percentiles)
  double p50 = 0.0;
  double p90 = 0.0;
  double p99 = 0.0;
  double p999 = 0.0;
};
Summary summarize(std::vector<double> values);
// summarize() of each microsecond count as milliseconds (us / 1000.0), to the bit, sorting the
// integers first: a long simulation's tens of millions of per-token latencies sort in two 16-bit
// radix passes instead of the four a double needs.
Summary summarize_us_as_ms(std::vector<std::int64_t> us);

struct Quantiles4 {
  double p10 = 0.0, p50 = 0.0, p90 = 0.0, p99 = 0.0;
};

struct TraceStats {
  std::int64_t num_requests = 0;
  double span_s = 0.0;         // first to last arrival
  double mean_rate_rps = 0.0;  // num_requests / span_s
  double interarrival_cv = 0.0;  // population stddev / mean of the n-1 gaps
  // Peak over mean of per-window request counts; windows are aligned at the first arrival and
  // cover [0, span] (the last window may be partial but counts as a full one).
  double peak_to_mean_1s = 0.0;
  double peak_to_mean_10s = 0.0;
  double peak_to_mean_60s = 0.0;
  Quantiles4 prompt_tokens;
  Quantiles4 output_tokens;
};

double interarrival_cv(const Trace& trace);
// Peak/mean request count over windows of window_us (definition as in TraceStats).
double peak_to_mean_rate(const Trace& trace, std::int64_t window_us);
// Requests per window of window_us, windows aligned at 0 (covering [0, span]).
std::vector<std::int64_t> window_counts(const Trace& trace, std::int64_t window_us);
TraceStats compute_stats(const Trace& trace);

}  // namespace kun::workload
