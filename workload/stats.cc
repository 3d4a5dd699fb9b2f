#include "workload/stats.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>

#include "common/check.h"

namespace kun::workload {

double quantile_sorted(const std::vector<double>& sorted, double q) {
  KUN_CHECK(q >= 0.0 && q <= 1.0) << "quantile " << q;
  if (sorted.empty()) return std::numeric_limits<double>::quiet_NaN();
  const double h = q * static_cast<double>(sorted.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(h));
  const std::size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (h - static_cast<double>(lo)) * (sorted[hi] - sorted[lo]);
}

double quantile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  return quantile_sorted(values, q);
}

namespace {

// Ascending sort of values without NaN by their IEEE-754 bit patterns (LSD radix, 16 bits a pass),
// the same order std::sort gives (equal values are equal bits, but for -0.0 / +0.0). A long
// simulation reports tens of millions of per-token latencies, where a comparison sort was a tenth
// of the whole run.
void sort_values(std::vector<double>& v) {
  constexpr std::size_t kRadixFrom = 1 << 14;
  if (v.size() < kRadixFrom || std::any_of(v.begin(), v.end(), [](double x) { return std::isnan(x); })) {
    std::sort(v.begin(), v.end());
    return;
  }
  constexpr std::uint64_t kSign = std::uint64_t{1} << 63;
  std::vector<std::uint64_t> keys(v.size()), scratch(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    const auto bits = std::bit_cast<std::uint64_t>(v[i]);
    keys[i] = (bits & kSign) != 0 ? ~bits : bits | kSign;  // order-preserving as unsigned
  }
  std::vector<std::size_t> count(1 << 16);
  for (int shift = 0; shift < 64; shift += 16) {
    std::fill(count.begin(), count.end(), 0);
    for (std::uint64_t k : keys) ++count[(k >> shift) & 0xFFFF];
    if (count[(keys[0] >> shift) & 0xFFFF] == keys.size()) continue;  // one digit: nothing to move
    std::size_t sum = 0;
    for (auto& c : count) {
      const std::size_t n = c;
      c = sum;
      sum += n;
    }
    for (std::uint64_t k : keys) scratch[count[(k >> shift) & 0xFFFF]++] = k;
    keys.swap(scratch);
  }
  for (std::size_t i = 0; i < v.size(); ++i) {
    const std::uint64_t k = keys[i];
    v[i] = std::bit_cast<double>((k & kSign) != 0 ? k & ~kSign : ~k);
  }
}

}  // namespace

Summary summarize(std::vector<double> values) {
  Summary s;
  s.count = static_cast<std::int64_t>(values.size());
  sort_values(values);
  s.mean = values.empty() ? std::numeric_limits<double>::quiet_NaN()
                          : std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
  s.p50 = quantile_sorted(values, 0.50);
  s.p90 = quantile_sorted(values, 0.90);
  s.p99 = quantile_sorted(values, 0.99);
  s.p999 = quantile_sorted(values, 0.999);
  return s;
}

Summary summarize_us_as_ms(std::vector<std::int64_t> us) {
  const bool small = std::all_of(us.begin(), us.end(), [](std::int64_t x) { return x >= 0 && x < (std::int64_t{1} << 52); });
  if (us.size() < (1 << 14) || !small) {
    std::vector<double> ms(us.size());
    for (std::size_t i = 0; i < us.size(); ++i) ms[i] = static_cast<double>(us[i]) / 1000.0;
    return summarize(std::move(ms));
  }
  // LSD radix over the digits the largest value has. us / 1000.0 is non-decreasing in us and
  // exact below 2^52, so the doubles come out in the order summarize() sorts them into (equal
  // doubles are equal integers), and the mean adds the same values in the same order.
  const std::int64_t largest = *std::max_element(us.begin(), us.end());
  std::vector<std::int64_t> scratch(us.size());
  std::vector<std::size_t> count(1 << 16);
  for (int shift = 0; shift < 64 && (largest >> shift) != 0; shift += 16) {
    std::fill(count.begin(), count.end(), 0);
    for (std::int64_t k : us) ++count[static_cast<std::size_t>(k >> shift) & 0xFFFF];
    std::size_t sum = 0;
    for (auto& c : count) {
      const std::size_t n = c;
      c = sum;
      sum += n;
    }
    for (std::int64_t k : us) scratch[count[static_cast<std::size_t>(k >> shift) & 0xFFFF]++] = k;
    us.swap(scratch);
  }
  std::vector<double> values(us.size());
  for (std::size_t i = 0; i < us.size(); ++i) values[i] = static_cast<double>(us[i]) / 1000.0;
  Summary s;
  s.count = static_cast<std::int64_t>(values.size());
  s.mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
  s.p50 = quantile_sorted(values, 0.50);
  s.p90 = quantile_sorted(values, 0.90);
  s.p99 = quantile_sorted(values, 0.99);
  s.p999 = quantile_sorted(values, 0.999);
  return s;
}

double interarrival_cv(const Trace& trace) {
  const auto& r = trace.requests;
  if (r.size() < 3) return 0.0;
  const double n = static_cast<double>(r.size() - 1);
  double sum = 0.0;
  for (std::size_t i = 1; i < r.size(); ++i) sum += static_cast<double>(r[i].arrival_us - r[i - 1].arrival_us);
  const double mean = sum / n;
  if (mean <= 0.0) return 0.0;
  double ss = 0.0;
  for (std::size_t i = 1; i < r.size(); ++i) {
    const double d = static_cast<double>(r[i].arrival_us - r[i - 1].arrival_us) - mean;
    ss += d * d;
  }
  return std::sqrt(ss / n) / mean;
}

std::vector<std::int64_t> window_counts(const Trace& trace, std::int64_t window_us) {
  KUN_CHECK_GT(window_us, 0);
  if (trace.empty()) return {};
  std::vector<std::int64_t> counts(static_cast<std::size_t>(trace.span_us() / window_us) + 1, 0);
  for (const auto& r : trace.requests) ++counts[static_cast<std::size_t>(r.arrival_us / window_us)];
  return counts;
}

double peak_to_mean_rate(const Trace& trace, std::int64_t window_us) {
  const auto counts = window_counts(trace, window_us);
  if (counts.empty()) return 0.0;
  const double mean = static_cast<double>(trace.size()) / static_cast<double>(counts.size());
  return static_cast<double>(*std::max_element(counts.begin(), counts.end())) / mean;
}

TraceStats compute_stats(const Trace& trace) {
  TraceStats s;
  s.num_requests = static_cast<std::int64_t>(trace.size());
  s.span_s = static_cast<double>(trace.span_us()) / 1e6;
  s.mean_rate_rps = s.span_s > 0.0 ? static_cast<double>(s.num_requests) / s.span_s : 0.0;
  s.interarrival_cv = interarrival_cv(trace);
  s.peak_to_mean_1s = peak_to_mean_rate(trace, 1'000'000);
  s.peak_to_mean_10s = peak_to_mean_rate(trace, 10'000'000);
  s.peak_to_mean_60s = peak_to_mean_rate(trace, 60'000'000);
  std::vector<double> prompt, output;
  prompt.reserve(trace.size());
  output.reserve(trace.size());
  for (const auto& r : trace.requests) {
    prompt.push_back(r.prompt_tokens);
    output.push_back(r.output_tokens);
  }
  std::sort(prompt.begin(), prompt.end());
  std::sort(output.begin(), output.end());
  s.prompt_tokens = {quantile_sorted(prompt, 0.1), quantile_sorted(prompt, 0.5), quantile_sorted(prompt, 0.9),
                     quantile_sorted(prompt, 0.99)};
  s.output_tokens = {quantile_sorted(output, 0.1), quantile_sorted(output, 0.5), quantile_sorted(output, 0.9),
                     quantile_sorted(output, 0.99)};
  return s;
}

}  // namespace kun::workload
