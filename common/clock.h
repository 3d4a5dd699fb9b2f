// Clock: the only notion of time policy code sees (DESIGN.md section 4). The runtime passes a
// SteadyClock; the simulator and tests pass a ManualClock they advance themselves.
#pragma once

#include <cstdint>

namespace kun {

class Clock {
 public:
  virtual ~Clock() = default;
  // Microseconds since an arbitrary epoch fixed for the clock's lifetime; never decreases.
  virtual std::int64_t now_us() const = 0;
};

class SteadyClock final : public Clock {
 public:
  SteadyClock();
  std::int64_t now_us() const override;

 private:
  std::int64_t origin_ns_;
};

class ManualClock final : public Clock {
 public:
  explicit ManualClock(std::int64_t start_us = 0) : now_us_(start_us) {}
  std::int64_t now_us() const override { return now_us_; }
  void advance_us(std::int64_t delta_us);
  void set_us(std::int64_t t_us);

 private:
  std::int64_t now_us_;
};

}  // namespace kun
