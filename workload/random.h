// Rng: a small, portable, seeded random source for trace generation. The standard library's
// distributions differ between implementations; these do not, so a seed gives the same trace
// on every platform. Pure code, no global state.
#pragma once

#include <cstdint>

namespace kun::workload {

class Rng {
 public:
  explicit Rng(std::uint64_t seed);

  std::uint64_t next_u64();
  // Uniform in [0, 1).
  double uniform();
  // Uniform in (0, 1]: safe to take the log of.
  double uniform_open_low();
  // Uniform integer in [0, n); n > 0.
  std::uint64_t uniform_index(std::uint64_t n);
  double exponential(double mean);
  double normal(double mean, double stddev);
  // Gamma with shape k > 0 and scale theta > 0 (mean k * theta).
  double gamma(double shape, double scale);
  double lognormal(double mu, double sigma);

 private:
  std::uint64_t s_[4];
  bool has_spare_normal_ = false;
  double spare_normal_ = 0.0;
};

}  // namespace kun::workload
