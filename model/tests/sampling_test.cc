// model::sample_token: greedy picks the first largest logit (NaN rules included), temperature
// sampling is a function of (logits, params, seed, step) only.
#include "model/sampling.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace kun::model {
namespace {

std::int32_t greedy(const std::vector<float>& x) {
  std::vector<float> scratch;
  return sample_token(x.data(), static_cast<std::int64_t>(x.size()), SamplingParams{}, 0, &scratch);
}

// The specification: the first index whose logit is larger than every earlier one's (x[0] first).
std::int32_t first_largest(const std::vector<float>& x) {
  std::size_t best = 0;
  for (std::size_t i = 1; i < x.size(); ++i) {
    if (x[i] > x[best]) best = i;
  }
  return static_cast<std::int32_t>(best);
}

TEST(Greedy, FirstLargestOnRandomLogitsOfEverySize) {
  std::mt19937 rng(7);
  std::normal_distribution<float> d(0.0f, 3.0f);
  for (std::size_t n : {1u, 2u, 15u, 16u, 17u, 33u, 100u, 32000u, 32001u}) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> x(n);
      for (float& v : x) v = d(rng);
      // Ties: copies of the largest value further on, and now and then in the tail.
      const std::int32_t top = first_largest(x);
      if (n > 3 && trial % 2 == 0) x[n - 1 - static_cast<std::size_t>(trial) % 3] = x[static_cast<std::size_t>(top)];
      ASSERT_EQ(greedy(x), first_largest(x)) << "n " << n << " trial " << trial;
    }
  }
}

TEST(Greedy, TiesSignedZerosInfinitiesAndNaNs) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(greedy({1.0f, 3.0f, -2.0f, 3.0f, 0.5f}), 1);
  EXPECT_EQ(greedy({-0.0f, 0.0f, -1.0f}), 0);  // -0 == +0: the first
  EXPECT_EQ(greedy({-1.0f, 0.0f, -0.0f}), 1);
  EXPECT_EQ(greedy({-inf, -inf, -inf}), 0);
  EXPECT_EQ(greedy({-inf, -5.0f, inf, inf}), 2);
  // A NaN never compares larger; a NaN first is never replaced.
  std::vector<float> x(40, 1.0f);
  x[5] = nan;
  x[30] = 2.0f;
  EXPECT_EQ(greedy(x), 30);
  x[0] = nan;
  EXPECT_EQ(greedy(x), 0);
  x.assign(40, nan);
  x[39] = 1.0f;
  EXPECT_EQ(greedy(x), 0);
}

TEST(Temperature, SameDrawForSameSeedAndStepOnly) {
  std::vector<float> x(1000);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<float>(i) * 0.37f) * 2.0f;
  std::vector<float> scratch;
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 42;
  const auto draw = [&](std::uint64_t step) {
    return sample_token(x.data(), static_cast<std::int64_t>(x.size()), p, step, &scratch);
  };
  std::vector<std::int32_t> first;
  for (std::uint64_t s = 0; s < 50; ++s) first.push_back(draw(s));
  for (std::uint64_t s = 0; s < 50; ++s) EXPECT_EQ(draw(s), first[s]) << s;
  int differ = 0;
  for (std::uint64_t s = 1; s < 50; ++s) differ += first[s] != first[0] ? 1 : 0;
  EXPECT_GT(differ, 10) << "50 draws at temperature 1 over 1000 spread logits should not repeat";
  p.top_k = 1;  // top-1 is greedy
  EXPECT_EQ(draw(3), first_largest(x));
}

}  // namespace
}  // namespace kun::model
