#include "common/clock.h"

#include <chrono>

#include "common/check.h"

namespace kun {
namespace {
std::int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

SteadyClock::SteadyClock() : origin_ns_(steady_ns()) {}
std::int64_t SteadyClock::now_us() const { return (steady_ns() - origin_ns_) / 1000; }

void ManualClock::advance_us(std::int64_t delta_us) {
  KUN_CHECK_GE(delta_us, 0) << "ManualClock cannot go backwards";
  now_us_ += delta_us;
}

void ManualClock::set_us(std::int64_t t_us) {
  KUN_CHECK_GE(t_us, now_us_) << "ManualClock cannot go backwards";
  now_us_ = t_us;
}

}  // namespace kun
