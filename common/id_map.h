// IdMap<K, T>: a map from a strongly typed id (common/ids.h) to T, for tables the engine looks up
// for every running request every step (the scheduler's requests, the KV manager's tables).
//
// Why not std::unordered_map: libstdc++'s bucket holds the node *before* the wanted one, so a
// lookup reads the bucket array, the previous node (another request's) and then the node: two
// cache misses on top of the value's own under a large batch (a sixth of an overloaded
// simulation). Here the index is an open-addressing array of (id, position) pairs (linear
// probing, power-of-two capacity, load <= 1/2, backward-shift erase: no tombstones), small enough
// to stay in cache; values live in their own allocations (stable addresses until erased, as
// unordered_map nodes) listed in a dense vector that iteration walks.
//
// Iteration order is not the insertion order (erase moves the last entry into the hole): walk it
// only for order-free work, or sort. Not thread-safe (one owner, like the containers it replaces).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "common/check.h"

namespace kun {

template <typename K, typename T>
class IdMap {
  struct Entry {
    K id;
    std::unique_ptr<T> value;
  };

 public:
  // What iteration yields: (id, value&) by value, so `for (const auto& [id, v] : map)` binds
  // v to the stored value (mutable through a non-const map).
  template <bool kConst>
  class Iterator {
   public:
    using Value = std::conditional_t<kConst, const T, T>;
    using Base = std::conditional_t<kConst, typename std::vector<Entry>::const_iterator, typename std::vector<Entry>::iterator>;
    explicit Iterator(Base it) : it_(it) {}
    std::pair<K, Value&> operator*() const { return {it_->id, *it_->value}; }
    Iterator& operator++() {
      ++it_;
      return *this;
    }
    friend bool operator==(const Iterator& a, const Iterator& b) { return a.it_ == b.it_; }

   private:
    Base it_;
  };

  std::size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  std::size_t count(K id) const { return find(id) != nullptr ? 1 : 0; }

  T* find(K id) {
    const std::size_t slot = find_slot(id);
    return slot == kNone ? nullptr : entries_[index_[slot].pos].value.get();
  }
  const T* find(K id) const { return const_cast<IdMap*>(this)->find(id); }
  T& at(K id) {
    T* v = find(id);
    KUN_CHECK(v != nullptr) << "id " << id << " not in the map";
    return *v;
  }
  const T& at(K id) const { return const_cast<IdMap*>(this)->at(id); }

  // Inserts (id, value) unless id is present; returns the stored value and whether it inserted.
  std::pair<T*, bool> emplace(K id, T value) {
    if (T* v = find(id)) return {v, false};
    if ((entries_.size() + 1) * 2 > index_.size()) rehash(std::max<std::size_t>(16, index_.size() * 2));
    std::size_t slot = home(id);
    while (index_[slot].pos != kEmpty) slot = (slot + 1) & mask_;
    index_[slot] = Slot{id.value, static_cast<std::uint32_t>(entries_.size())};
    entries_.push_back(Entry{id, std::make_unique<T>(std::move(value))});
    return {entries_.back().value.get(), true};
  }

  // Removes id; false if absent. Addresses of the other values stay valid.
  bool erase(K id) {
    std::size_t slot = find_slot(id);
    if (slot == kNone) return false;
    const std::uint32_t pos = index_[slot].pos;
    // The last entry fills the hole in the dense vector.
    const auto last = static_cast<std::uint32_t>(entries_.size() - 1);
    if (pos != last) {
      const std::size_t moved = find_slot(entries_[last].id);
      index_[moved].pos = pos;
      entries_[pos] = std::move(entries_[last]);
    }
    entries_.pop_back();
    // Backward-shift deletion: pull later entries of the probe run into the hole.
    std::size_t hole = slot;
    std::size_t next = (hole + 1) & mask_;
    while (index_[next].pos != kEmpty) {
      const std::size_t want = home_of(index_[next].key);
      // Move `next` into the hole unless its home lies cyclically in (hole, next].
      if (((next - want) & mask_) >= ((next - hole) & mask_)) {
        index_[hole] = index_[next];
        hole = next;
      }
      next = (next + 1) & mask_;
    }
    index_[hole].pos = kEmpty;
    return true;
  }

  void clear() {
    entries_.clear();
    for (Slot& s : index_) s.pos = kEmpty;
  }

  Iterator<false> begin() { return Iterator<false>(entries_.begin()); }
  Iterator<false> end() { return Iterator<false>(entries_.end()); }
  Iterator<true> begin() const { return Iterator<true>(entries_.cbegin()); }
  Iterator<true> end() const { return Iterator<true>(entries_.cend()); }

 private:
  static constexpr std::uint32_t kEmpty = 0xFFFFFFFFu;
  static constexpr std::size_t kNone = ~std::size_t{0};
  struct Slot {
    std::int64_t key = 0;
    std::uint32_t pos = kEmpty;  // into entries_
  };

  std::size_t home_of(std::int64_t key) const {
    // Fibonacci hashing: sequential ids (the usual case) spread over the whole table.
    return static_cast<std::size_t>((static_cast<std::uint64_t>(key) * 0x9E3779B97F4A7C15ull) >> shift_) & mask_;
  }
  std::size_t home(K id) const { return home_of(id.value); }

  std::size_t find_slot(K id) const {
    if (index_.empty()) return kNone;
    std::size_t slot = home(id);
    while (index_[slot].pos != kEmpty) {
      if (index_[slot].key == id.value) return slot;
      slot = (slot + 1) & mask_;
    }
    return kNone;
  }

  void rehash(std::size_t capacity) {
    index_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    shift_ = 64 - std::countr_zero(capacity);
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      std::size_t slot = home(entries_[i].id);
      while (index_[slot].pos != kEmpty) slot = (slot + 1) & mask_;
      index_[slot] = Slot{entries_[i].id.value, static_cast<std::uint32_t>(i)};
    }
  }

  std::vector<Slot> index_;
  std::size_t mask_ = 0;
  int shift_ = 64;
  std::vector<Entry> entries_;
};

}  // namespace kun
