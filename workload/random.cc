#include "workload/random.h"

#include <cmath>

#include "common/check.h"

namespace kun::workload {
namespace {

std::uint64_t splitmix64(std::uint64_t& x) {
  std::uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

constexpr double kTwoPi = 6.283185307179586476925286766559;

}  // namespace

Rng::Rng(std::uint64_t seed) {
  std::uint64_t x = seed;
  for (auto& s : s_) s = splitmix64(x);
}

// xoshiro256** (Blackman and Vigna), written from the published recurrence.
std::uint64_t Rng::next_u64() {
  const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const std::uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

double Rng::uniform_open_low() { return 1.0 - uniform(); }

std::uint64_t Rng::uniform_index(std::uint64_t n) {
  KUN_CHECK_GT(n, 0u);
  // Rejection sampling removes the modulo bias.
  const std::uint64_t limit = ~std::uint64_t{0} - (~std::uint64_t{0} % n);
  std::uint64_t v = next_u64();
  while (v >= limit) v = next_u64();
  return v % n;
}

double Rng::exponential(double mean) { return -mean * std::log(uniform_open_low()); }

double Rng::normal(double mean, double stddev) {
  if (has_spare_normal_) {
    has_spare_normal_ = false;
    return mean + stddev * spare_normal_;
  }
  // Box-Muller.
  const double r = std::sqrt(-2.0 * std::log(uniform_open_low()));
  const double theta = kTwoPi * uniform();
  spare_normal_ = r * std::sin(theta);
  has_spare_normal_ = true;
  return mean + stddev * r * std::cos(theta);
}

double Rng::gamma(double shape, double scale) {
  KUN_CHECK_GT(shape, 0.0);
  KUN_CHECK_GT(scale, 0.0);
  if (shape < 1.0) {
    // Boost a shape < 1 to shape + 1 and scale by U^(1/shape), done in log space so that very
    // small shapes (bursty processes, CV >> 1) do not underflow to an exact zero too often.
    const double g = gamma(shape + 1.0, 1.0);
    const double log_u = std::log(uniform_open_low()) / shape;
    return scale * g * std::exp(log_u);
  }
  // Marsaglia and Tsang's squeeze method.
  const double d = shape - 1.0 / 3.0;
  const double c = 1.0 / std::sqrt(9.0 * d);
  for (;;) {
    double x = 0.0;
    double v = 0.0;
    do {
      x = normal(0.0, 1.0);
      v = 1.0 + c * x;
    } while (v <= 0.0);
    v = v * v * v;
    const double u = uniform_open_low();
    if (u < 1.0 - 0.0331 * x * x * x * x) return scale * d * v;
    if (std::log(u) < 0.5 * x * x + d * (1.0 - v + std::log(v))) return scale * d * v;
  }
}

double Rng::lognormal(double mu, double sigma) { return std::exp(normal(mu, sigma)); }

}  // namespace kun::workload
