// BoundedRing<T>: an append-only history that keeps the newest `capacity` entries (the oldest
// are dropped), so an event log of a long-running server cannot grow without bound. Counts
// every entry ever pushed, so readers can tell how many were dropped. Not thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <vector>

#include "common/check.h"

namespace kun {

template <typename T>
class BoundedRing {
 public:
  explicit BoundedRing(std::size_t capacity = kDefaultCapacity) : capacity_(capacity) {
    KUN_CHECK_GT(capacity, 0u) << "a BoundedRing must hold at least one entry";
  }
  static constexpr std::size_t kDefaultCapacity = 4096;

  void push_back(T value) {
    if (items_.size() == capacity_) items_.pop_front();
    items_.push_back(std::move(value));
    ++pushed_;
  }
  // Shrinking drops the oldest entries at once.
  void set_capacity(std::size_t capacity) {
    KUN_CHECK_GT(capacity, 0u) << "a BoundedRing must hold at least one entry";
    capacity_ = capacity;
    while (items_.size() > capacity_) items_.pop_front();
  }

  std::size_t capacity() const { return capacity_; }
  std::size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  std::uint64_t total_pushed() const { return pushed_; }
  std::uint64_t dropped() const { return pushed_ - items_.size(); }
  const T& operator[](std::size_t i) const { return items_[i]; }  // 0 = oldest kept
  const T& back() const { return items_.back(); }
  auto begin() const { return items_.begin(); }
  auto end() const { return items_.end(); }
  std::vector<T> to_vector() const { return std::vector<T>(items_.begin(), items_.end()); }

 private:
  std::size_t capacity_;
  std::deque<T> items_;
  std::uint64_t pushed_ = 0;
};

}  // namespace kun
