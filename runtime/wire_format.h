// Little helpers to lay trivially copyable values and id lists into a message's bytes and read
// them back with bounds checks (message headers, device snapshots). Both ends of a message run
// the same build (MPI ranks check the build id at start), so values go in host byte order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

namespace kun::runtime::wire {

template <class T>
void put(std::vector<std::byte>& out, T v) {
  static_assert(std::is_trivially_copyable_v<T>);
  const std::size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &v, sizeof(T));
}

// A count, then the ids.
inline void put_ids(std::vector<std::byte>& out, const std::vector<std::int64_t>& ids) {
  put(out, static_cast<std::int64_t>(ids.size()));
  const std::size_t at = out.size();
  out.resize(at + ids.size() * sizeof(std::int64_t));
  if (!ids.empty()) std::memcpy(out.data() + at, ids.data(), ids.size() * sizeof(std::int64_t));
}

// Reads what put / put_ids wrote; every get fails (false) instead of reading past the end, and
// an id list longer than max_ids or than the bytes left is refused before anything is allocated.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> bytes, std::int64_t max_ids = std::numeric_limits<std::int64_t>::max())
      : bytes_(bytes), max_ids_(max_ids) {}
  template <class T>
  bool get(T* v) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (bytes_.size() - pos_ < sizeof(T)) return false;
    std::memcpy(v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool get_ids(std::vector<std::int64_t>* ids) {
    std::int64_t n = 0;
    if (!get(&n) || n < 0 || n > max_ids_) return false;
    if (static_cast<std::size_t>(n) > (bytes_.size() - pos_) / sizeof(std::int64_t)) return false;
    ids->resize(static_cast<std::size_t>(n));
    if (n > 0) std::memcpy(ids->data(), bytes_.data() + pos_, static_cast<std::size_t>(n) * sizeof(std::int64_t));
    pos_ += static_cast<std::size_t>(n) * sizeof(std::int64_t);
    return true;
  }
  // n raw bytes into dst.
  bool get_bytes(void* dst, std::size_t n) {
    if (bytes_.size() - pos_ < n) return false;
    if (n > 0) std::memcpy(dst, bytes_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  bool at_end() const { return pos_ == bytes_.size(); }

 private:
  std::span<const std::byte> bytes_;
  std::int64_t max_ids_;
  std::size_t pos_ = 0;
};

}  // namespace kun::runtime::wire
