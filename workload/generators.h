// Seeded, deterministic synthetic trace generators. Same spec + seed = same trace, on every
// platform (workload::Rng, not <random>). Pure code.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "workload/trace.h"

namespace kun::workload {

class Rng;

// How request lengths are drawn.
struct LengthModel {
  enum class Kind { kFixed, kLogNormal, kEmpirical };
  Kind kind = Kind::kFixed;
  // kFixed
  std::int32_t fixed_prompt_tokens = 512;
  std::int32_t fixed_output_tokens = 128;
  // kLogNormal: median and log-space sigma per length (prompt and output drawn independently).
  double prompt_median_tokens = 512.0;
  double prompt_sigma = 1.0;
  double output_median_tokens = 128.0;
  double output_sigma = 1.0;
  // kEmpirical: joint (prompt, output) pairs, drawn uniformly (keeps their correlation).
  std::vector<std::pair<std::int32_t, std::int32_t>> samples;

  static LengthModel fixed(std::int32_t prompt_tokens, std::int32_t output_tokens);
  static LengthModel lognormal(double prompt_median_tokens, double prompt_sigma, double output_median_tokens,
                               double output_sigma);
  // The source trace's empirical joint distribution; the trace must not be empty.
  static LengthModel empirical(const Trace& source);

  // Draws one (prompt, output) pair; lognormal draws are rounded and at least 1.
  std::pair<std::int32_t, std::int32_t> sample(Rng& rng) const;
};

struct PoissonSpec {
  double rate_rps = 1.0;
  std::int64_t duration_us = 60'000'000;
  LengthModel lengths;
  std::uint64_t seed = 0;
};

// Renewal process with Gamma inter-arrivals of mean 1/rate and coefficient of variation cv
// (cv = 1 is Poisson; cv > 1 is bursty: shape 1/cv^2).
struct GammaSpec {
  double rate_rps = 1.0;
  double cv = 1.0;
  std::int64_t duration_us = 60'000'000;
  LengthModel lengths;
  std::uint64_t seed = 0;
};

// Two-state Markov-modulated Poisson process: Poisson at low_rate_rps for an exponential time
// of mean mean_low_s, then at high_rate_rps for mean mean_high_s, and so on.
struct MmppSpec {
  double low_rate_rps = 1.0;
  double high_rate_rps = 10.0;
  double mean_low_s = 30.0;
  double mean_high_s = 5.0;
  bool start_high = false;
  std::int64_t duration_us = 60'000'000;
  LengthModel lengths;
  std::uint64_t seed = 0;
};

// Piecewise-constant rate: rates_rps[i] holds on [i * window_us, (i + 1) * window_us). Arrivals
// are a Gamma renewal process of CV cv in operational time (time rescaled by the cumulative rate),
// so the expected count in each window is rates_rps[i] * window and windows of rate 0 stay empty.
struct PiecewiseSpec {
  std::vector<double> rates_rps;
  std::int64_t window_us = 1'000'000;
  double cv = 1.0;
  LengthModel lengths;
  std::uint64_t seed = 0;
};

// Takes the rate per window_us window from `source` (count / window), cv as the inter-arrival CV
// of `source` in operational time (the local burstiness left once the per-window rate is
// factored out; see README), and the source's empirical lengths.
PiecewiseSpec piecewise_from_trace(const Trace& source, std::int64_t window_us, std::uint64_t seed);
// The CV of inter-arrival gaps after rescaling time by the trace's own per-window rate.
double operational_time_cv(const Trace& source, std::int64_t window_us);

Trace generate_poisson(const PoissonSpec& spec);
Trace generate_gamma(const GammaSpec& spec);
Trace generate_mmpp(const MmppSpec& spec);
Trace generate_piecewise(const PiecewiseSpec& spec);

}  // namespace kun::workload
