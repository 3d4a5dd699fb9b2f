// Byte and time units. Names carry their unit (DESIGN.md section 4: `_bytes`, `_ms`, `_us`).
#pragma once

#include <cstdint>

namespace kun {

inline constexpr std::int64_t kKiB = 1024;
inline constexpr std::int64_t kMiB = 1024 * kKiB;
inline constexpr std::int64_t kGiB = 1024 * kMiB;

inline constexpr std::int64_t kUsPerMs = 1000;
inline constexpr std::int64_t kUsPerSecond = 1000 * 1000;

constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }
constexpr std::int64_t round_up(std::int64_t a, std::int64_t b) { return ceil_div(a, b) * b; }

}  // namespace kun
