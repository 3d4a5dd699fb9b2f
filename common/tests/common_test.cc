#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "common/clock.h"
#include "common/id_map.h"
#include "common/ids.h"
#include "common/status.h"
#include "common/units.h"

namespace kun {
namespace {

StatusOr<int> parse_positive(int v) {
  if (v <= 0) return invalid_argument("value must be positive, got " + std::to_string(v));
  return v;
}

Status use_positive(int v, int* out) {
  KUN_ASSIGN_OR_RETURN(int x, parse_positive(v));
  *out = x * 2;
  return ok_status();
}

TEST(StatusTest, CarriesCodeAndMessage) {
  Status s = not_found("tensor model.norm.weight");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_EQ(s.to_string(), "NOT_FOUND: tensor model.norm.weight");
  EXPECT_EQ(s.with_context("file a.safetensors").message(), "file a.safetensors: tensor model.norm.weight");
}

TEST(StatusTest, AssignOrReturnPropagates) {
  int out = 0;
  EXPECT_TRUE(use_positive(4, &out).ok());
  EXPECT_EQ(out, 8);
  Status s = use_positive(-1, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(out, 8);
}

TEST(CheckDeathTest, AbortsWithContext) {
  EXPECT_DEATH({ KUN_CHECK_EQ(1 + 1, 3) << "page 7 owned twice"; }, "page 7 owned twice");
  StatusOr<int> bad = invalid_argument("nope");
  EXPECT_DEATH({ (void)bad.value(); }, "nope");
}

TEST(ClockTest, ManualClockIsMonotonic) {
  ManualClock clock(100);
  clock.advance_us(50);
  EXPECT_EQ(clock.now_us(), 150);
  EXPECT_DEATH(clock.set_us(10), "backwards");
  SteadyClock steady;
  auto a = steady.now_us();
  EXPECT_LE(a, steady.now_us());
}

TEST(UnitsTest, Rounding) {
  EXPECT_EQ(ceil_div(5, 2), 3);
  EXPECT_EQ(round_up(5 * kMiB + 1, 2 * kMiB), 6 * kMiB);
  EXPECT_NE(RequestId(3), RequestId(4));
}

}  // namespace
}  // namespace kun

#include "common/dtype.h"

namespace kun {
namespace {
TEST(DTypeTest, RoundTripsExactValues) {
  for (float v : {0.0f, 1.0f, -2.5f, 65504.0f, 0.000061035156f, 3.140625f}) {
    EXPECT_EQ(f16_to_f32(f32_to_f16(v)), v) << v;
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(v)), v == 65504.0f ? 65536.0f : (v == 0.000061035156f ? bf16_to_f32(f32_to_bf16(v)) : v));
  }
  // Round-to-nearest-even on a tie for bf16: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(f16_to_f32(f32_to_f16(1e-7f)), std::ldexp(2.0f, -24));  // subnormal rounds up to 2 ulp
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
  DType t;
  EXPECT_TRUE(parse_dtype("bfloat16", &t));
  EXPECT_EQ(t, DType::kBF16);
  EXPECT_FALSE(parse_dtype("int8", &t));
}
}  // namespace
}  // namespace kun

// IdMap against std::map under random inserts, erases (backward-shift deletion is the part that
// can lose an entry) and lookups; values keep their addresses until erased.
TEST(IdMap, MatchesStdMapUnderRandomInsertsAndErases) {
  for (std::uint64_t seed = 1; seed <= 5; ++seed) {
    std::mt19937_64 rng(seed);
    kun::IdMap<kun::RequestId, std::int64_t> map;
    std::map<std::int64_t, std::int64_t> ref;
    std::map<std::int64_t, const std::int64_t*> address;
    // Small key ranges force long probe runs and wrap-around; large ones exercise growth.
    const std::int64_t range = seed % 2 == 0 ? 64 : 100000;
    for (int step = 0; step < 20000; ++step) {
      const auto key = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(range));
      const kun::RequestId id(key);
      switch (rng() % 3) {
        case 0: {
          const auto [v, inserted] = map.emplace(id, key * 7);
          EXPECT_EQ(inserted, ref.count(key) == 0);
          if (inserted) {
            ref[key] = key * 7;
            address[key] = v;
          }
          EXPECT_EQ(v, address[key]);
          break;
        }
        case 1:
          EXPECT_EQ(map.erase(id), ref.erase(key) == 1);
          address.erase(key);
          break;
        default: {
          const std::int64_t* v = map.find(id);
          ASSERT_EQ(v != nullptr, ref.count(key) == 1) << "key " << key;
          if (v != nullptr) {
            EXPECT_EQ(*v, ref[key]);
            EXPECT_EQ(v, address[key]) << "a value moved";
          }
        }
      }
      ASSERT_EQ(map.size(), ref.size());
    }
    std::map<std::int64_t, std::int64_t> walked;
    for (const auto& [id, v] : map) walked[id.value] = v;
    EXPECT_EQ(walked, ref);
    for (const auto& [k, v] : ref) EXPECT_EQ(map.at(kun::RequestId(k)), v);
    map.clear();
    EXPECT_TRUE(map.empty());
    EXPECT_EQ(map.find(kun::RequestId(1)), nullptr);
  }
}
