#include "workload/generators.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "common/check.h"
#include "common/units.h"
#include "workload/random.h"
#include "workload/stats.h"

namespace kun::workload {
namespace {

std::int32_t round_tokens(double v) {
  if (!(v >= 1.0)) return 1;
  if (v > 1e9) return 1'000'000'000;
  return static_cast<std::int32_t>(std::llround(v));
}

// Gamma renewal process of rate 1 and the given CV in operational time u, mapped to real time
// through the piecewise-linear cumulative rate. Calls emit(t_us) for each arrival.
template <typename Emit>
void piecewise_renewal(const std::vector<double>& rates_rps, std::int64_t window_us, double cv, Rng& rng,
                       Emit emit) {
  KUN_CHECK_GT(window_us, 0);
  KUN_CHECK_GT(cv, 0.0);
  const double shape = 1.0 / (cv * cv);
  const double scale = 1.0 / shape;  // mean 1
  const double window_s = static_cast<double>(window_us) / 1e6;
  double u = rng.gamma(shape, scale);
  double lambda_start = 0.0;  // cumulative expected arrivals at the start of window w
  for (std::size_t w = 0; w < rates_rps.size(); ++w) {
    const double rate = rates_rps[w];
    KUN_CHECK_GE(rate, 0.0) << "window " << w;
    const double lambda_end = lambda_start + rate * window_s;
    while (rate > 0.0 && u < lambda_end) {
      const double t_s = static_cast<double>(w) * window_s + (u - lambda_start) / rate;
      emit(static_cast<std::int64_t>(t_s * 1e6));
      u += rng.gamma(shape, scale);
    }
    lambda_start = lambda_end;
  }
}

std::vector<double> window_rates(const Trace& source, std::int64_t window_us) {
  const auto counts = window_counts(source, window_us);
  std::vector<double> rates(counts.size());
  const double window_s = static_cast<double>(window_us) / 1e6;
  for (std::size_t i = 0; i < counts.size(); ++i) rates[i] = static_cast<double>(counts[i]) / window_s;
  return rates;
}

std::string fmt(double v) {
  std::ostringstream ss;
  ss << v;
  return ss.str();
}

}  // namespace

LengthModel LengthModel::fixed(std::int32_t prompt_tokens, std::int32_t output_tokens) {
  LengthModel m;
  m.kind = Kind::kFixed;
  m.fixed_prompt_tokens = prompt_tokens;
  m.fixed_output_tokens = output_tokens;
  return m;
}

LengthModel LengthModel::lognormal(double prompt_median_tokens, double prompt_sigma, double output_median_tokens,
                                   double output_sigma) {
  KUN_CHECK_GT(prompt_median_tokens, 0.0);
  KUN_CHECK_GT(output_median_tokens, 0.0);
  KUN_CHECK_GE(prompt_sigma, 0.0);
  KUN_CHECK_GE(output_sigma, 0.0);
  LengthModel m;
  m.kind = Kind::kLogNormal;
  m.prompt_median_tokens = prompt_median_tokens;
  m.prompt_sigma = prompt_sigma;
  m.output_median_tokens = output_median_tokens;
  m.output_sigma = output_sigma;
  return m;
}

LengthModel LengthModel::empirical(const Trace& source) {
  KUN_CHECK(!source.empty()) << "empirical lengths need a non-empty trace";
  LengthModel m;
  m.kind = Kind::kEmpirical;
  m.samples.reserve(source.size());
  for (const auto& r : source.requests) m.samples.emplace_back(r.prompt_tokens, r.output_tokens);
  return m;
}

std::pair<std::int32_t, std::int32_t> LengthModel::sample(Rng& rng) const {
  switch (kind) {
    case Kind::kFixed:
      return {fixed_prompt_tokens, fixed_output_tokens};
    case Kind::kLogNormal: {
      const double p = rng.lognormal(std::log(prompt_median_tokens), prompt_sigma);
      const double o = rng.lognormal(std::log(output_median_tokens), output_sigma);
      return {round_tokens(p), round_tokens(o)};
    }
    case Kind::kEmpirical:
      KUN_CHECK(!samples.empty()) << "empirical length model without samples";
      return samples[rng.uniform_index(samples.size())];
  }
  KUN_CHECK(false) << "unknown length model";
  return {0, 0};
}

double operational_time_cv(const Trace& source, std::int64_t window_us) {
  if (source.size() < 3) return 1.0;
  const auto rates = window_rates(source, window_us);
  const double window_s = static_cast<double>(window_us) / 1e6;
  std::vector<double> cumulative(rates.size() + 1, 0.0);
  for (std::size_t i = 0; i < rates.size(); ++i) cumulative[i + 1] = cumulative[i] + rates[i] * window_s;
  Trace rescaled;
  rescaled.requests.reserve(source.size());
  for (const auto& r : source.requests) {
    const auto w = static_cast<std::size_t>(r.arrival_us / window_us);
    const double offset_s = static_cast<double>(r.arrival_us - static_cast<std::int64_t>(w) * window_us) / 1e6;
    const double u = cumulative[w] + rates[w] * offset_s;
    TraceRequest c = r;
    c.arrival_us = static_cast<std::int64_t>(u * 1e6);  // operational time in micro-units
    rescaled.requests.push_back(c);
  }
  return interarrival_cv(rescaled);
}

PiecewiseSpec piecewise_from_trace(const Trace& source, std::int64_t window_us, std::uint64_t seed) {
  KUN_CHECK(!source.empty()) << "piecewise spec from an empty trace";
  PiecewiseSpec spec;
  spec.rates_rps = window_rates(source, window_us);
  spec.window_us = window_us;
  spec.cv = operational_time_cv(source, window_us);
  spec.lengths = LengthModel::empirical(source);
  spec.seed = seed;
  return spec;
}

Trace generate_piecewise(const PiecewiseSpec& spec) {
  Rng rng(spec.seed);
  Rng length_rng(spec.seed ^ 0x5bd1e995a5a5a5a5ULL);
  Trace out;
  out.name = "piecewise(" + std::to_string(spec.rates_rps.size()) + " windows of " +
             std::to_string(spec.window_us) + "us, cv " + fmt(spec.cv) + ", seed " + std::to_string(spec.seed) + ")";
  piecewise_renewal(spec.rates_rps, spec.window_us, spec.cv, rng, [&](std::int64_t t_us) {
    const auto [p, o] = spec.lengths.sample(length_rng);
    out.requests.push_back({t_us, p, o});
  });
  normalize(out);
  return out;
}

Trace generate_gamma(const GammaSpec& spec) {
  KUN_CHECK_GT(spec.rate_rps, 0.0);
  KUN_CHECK_GT(spec.duration_us, 0);
  // A constant rate in 1 s windows covering the duration; arrivals past it are dropped.
  const std::int64_t window_us = 1'000'000;
  const std::vector<double> rates(static_cast<std::size_t>(ceil_div(spec.duration_us, window_us)), spec.rate_rps);
  Rng rng(spec.seed);
  Rng length_rng(spec.seed ^ 0x5bd1e995a5a5a5a5ULL);
  Trace out;
  out.name = "gamma(rate " + fmt(spec.rate_rps) + " rps, cv " + fmt(spec.cv) + ", seed " + std::to_string(spec.seed) + ")";
  piecewise_renewal(rates, window_us, spec.cv, rng, [&](std::int64_t t_us) {
    if (t_us >= spec.duration_us) return;
    const auto [p, o] = spec.lengths.sample(length_rng);
    out.requests.push_back({t_us, p, o});
  });
  normalize(out);
  return out;
}

Trace generate_poisson(const PoissonSpec& spec) {
  GammaSpec g;
  g.rate_rps = spec.rate_rps;
  g.cv = 1.0;
  g.duration_us = spec.duration_us;
  g.lengths = spec.lengths;
  g.seed = spec.seed;
  Trace out = generate_gamma(g);
  out.name = "poisson(rate " + fmt(spec.rate_rps) + " rps, seed " + std::to_string(spec.seed) + ")";
  return out;
}

Trace generate_mmpp(const MmppSpec& spec) {
  KUN_CHECK_GE(spec.low_rate_rps, 0.0);
  KUN_CHECK_GE(spec.high_rate_rps, 0.0);
  KUN_CHECK_GT(spec.mean_low_s, 0.0);
  KUN_CHECK_GT(spec.mean_high_s, 0.0);
  KUN_CHECK_GT(spec.duration_us, 0);
  Rng rng(spec.seed);
  Rng length_rng(spec.seed ^ 0x5bd1e995a5a5a5a5ULL);
  Trace out;
  out.name = "mmpp(low " + fmt(spec.low_rate_rps) + " rps/" + fmt(spec.mean_low_s) + " s, high " +
             fmt(spec.high_rate_rps) + " rps/" + fmt(spec.mean_high_s) + " s, seed " + std::to_string(spec.seed) + ")";
  const double end_s = static_cast<double>(spec.duration_us) / 1e6;
  bool high = spec.start_high;
  double t_s = 0.0;
  double switch_s = rng.exponential(high ? spec.mean_high_s : spec.mean_low_s);
  while (t_s < end_s) {
    const double rate = high ? spec.high_rate_rps : spec.low_rate_rps;
    const double next_s = rate > 0.0 ? t_s + rng.exponential(1.0 / rate) : switch_s;
    if (next_s < switch_s) {
      t_s = next_s;
      if (t_s >= end_s) break;
      const auto [p, o] = spec.lengths.sample(length_rng);
      out.requests.push_back({static_cast<std::int64_t>(t_s * 1e6), p, o});
    } else {
      // Memoryless: restart the arrival clock in the new state.
      t_s = switch_s;
      high = !high;
      switch_s = t_s + rng.exponential(high ? spec.mean_high_s : spec.mean_low_s);
    }
  }
  normalize(out);
  return out;
}

}  // namespace kun::workload
