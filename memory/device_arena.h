// DeviceArena: a virtual device's memory, page-granular and really allocated.
//
// What it owns: one memfd of `capacity_bytes` (created, sized and fallocated at create(), so the
// capacity is resident memory and not a counter) split into pages of `page_bytes`. This is the CPU
// analogue of CUDA's physical allocation handles (cuMemCreate): every page is a physical chunk that
// can be mapped at any virtual address. Each page has exactly one owner:
//   * Free   - not in use;
//   * Param  - backs part of one parameter segment (a decoder layer's weights, the embedding, or
//              the final norm + LM head); a segment's pages are mapped back to back into a virtual
//              range reserved for it (the analogue of cuMemAddressReserve + cuMemMap), so kernels
//              see one contiguous tensor region at segment_data(id);
//   * Kv     - handed to the KV block pool (kv::KvBlockAllocator); reached through page_data(id),
//              which points into one whole-arena mapping of the memfd.
//
// Drop (KunServe, DESIGN.md 3.1): drop_segment() unmaps a segment's range and turns its pages into
// Kv pages without copying a byte. Restore: restore_segment() takes back exactly the Kv pages the
// caller chose (pages holding no live KV blocks), maps them contiguously at the segment's original
// address again, and the caller writes the contents (pulled from a peer or host memory).
//
// Invariants (verify_integrity()): every page is in exactly one place (the free list, the KV set,
// or one live segment's page list) and its owner entry says so; free + param + KV pages == the
// number of pages; each segment's page list matches the owner map.
//
// Threads: one executor thread owns an arena (DESIGN.md section 4, "one owner per piece of
// state"). There is no internal locking; every method must be called from that thread (or with
// external synchronisation). Pointers from segment_data()/page_data() may be read by the kernels'
// worker threads while the owner is inside a step, as long as no drop/restore runs concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "common/ids.h"
#include "common/status.h"
#include "common/units.h"

namespace kun::memory {

struct PageTag {};
struct SegmentTag {};
using PageId = Id<PageTag>;        // index of a physical page in the arena: [0, num_pages)
using SegmentId = Id<SegmentTag>;  // index of a parameter segment, stable for the arena's life

inline constexpr std::int64_t kDefaultPageBytes = 2 * kMiB;

enum class PageOwnerKind { kFree, kParam, kKv };
const char* page_owner_kind_name(PageOwnerKind kind);

struct PageOwner {
  PageOwnerKind kind = PageOwnerKind::kFree;
  SegmentId segment;  // valid only for kParam
};

struct SegmentStats {
  SegmentId id;
  std::string name;
  std::int64_t bytes = 0;           // requested size
  std::int64_t mapped_bytes = 0;    // pages currently backing it * page_bytes (0 while dropped)
  std::int64_t num_pages = 0;       // pages it needs when resident
  bool dropped = false;
};

struct ArenaStats {
  std::int64_t capacity_bytes = 0;
  std::int64_t page_bytes = 0;
  std::int64_t num_pages = 0;
  std::int64_t free_bytes = 0;
  std::int64_t param_bytes = 0;
  std::int64_t kv_bytes = 0;
  std::int64_t dropped_param_bytes = 0;  // bytes of pages that dropped segments need to restore
  std::int64_t num_segments = 0;
  std::int64_t num_dropped_segments = 0;
  std::vector<SegmentStats> segments;
};

struct ArenaOptions {
  std::int64_t capacity_bytes = 0;          // rounded down to a whole number of pages
  std::int64_t page_bytes = kDefaultPageBytes;  // multiple of the OS page size
  std::string name = "kun-device";          // memfd name, shows in /proc/<pid>/fd
  // Back the pages with the kernel's huge pages (2 MiB on x86-64) where page_bytes is a multiple
  // of one or divides one, and the kernel agrees (MADV_COLLAPSE, Linux 6.1+); KUN_HUGE_PAGES=0
  // turns it off process-wide. On 4 KiB pages llama-350m decodes 1.07-1.11x slower (README).
  bool huge_pages = true;
};

class DeviceArena {
 public:
  // Creates the memfd, sizes it and allocates every page (fallocate, or touching each page where
  // fallocate is unsupported). kInvalidArgument for a bad size, kResourceExhausted when the host
  // cannot provide the memory.
  static StatusOr<std::unique_ptr<DeviceArena>> create(const ArenaOptions& options);
  static StatusOr<std::unique_ptr<DeviceArena>> create(std::int64_t capacity_bytes,
                                                       std::int64_t page_bytes = kDefaultPageBytes);

  ~DeviceArena();
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  std::int64_t capacity_bytes() const { return num_pages_ * page_bytes_; }
  std::int64_t page_bytes() const { return page_bytes_; }
  std::int64_t num_pages() const { return num_pages_; }
  std::int64_t num_free_pages() const { return static_cast<std::int64_t>(free_pages_.size()); }
  std::int64_t num_kv_pages() const { return static_cast<std::int64_t>(kv_pages_.size()); }
  std::int64_t num_param_pages() const { return num_param_pages_; }
  // Bytes the memfd really holds (st_blocks); >= capacity_bytes() after create().
  std::int64_t resident_bytes() const;
  // The huge page size backing the pages, 0 when they are OS pages (not asked for, page_bytes not
  // a multiple, or refused by the kernel).
  std::int64_t huge_page_bytes() const { return huge_page_bytes_; }

  // ---- parameter segments ----
  // Takes ceil(bytes / page_bytes) free pages (lowest ids first) and maps them back to back.
  // kResourceExhausted when not enough free pages (nothing changes), kInvalidArgument for bytes<=0.
  StatusOr<SegmentId> create_segment(std::string name, std::int64_t bytes);
  // Unmaps the segment and returns its pages to the free list (model unload). Works while dropped.
  Status destroy_segment(SegmentId id);
  // Start of the contiguous mapping; CHECKs that the segment is resident (not dropped).
  std::byte* segment_data(SegmentId id) const;
  std::int64_t segment_bytes(SegmentId id) const;
  std::int64_t segment_num_pages(SegmentId id) const;
  const std::string& segment_name(SegmentId id) const;
  bool segment_dropped(SegmentId id) const;
  bool segment_exists(SegmentId id) const;
  // The pages backing a resident segment, in mapping order (empty while dropped).
  const std::vector<PageId>& segment_pages(SegmentId id) const;
  // Live (not destroyed) segments in creation order.
  std::vector<SegmentId> segments() const;

  // Drop: unmaps the segment (its range stays reserved, PROT_NONE, so a stale pointer faults) and
  // turns its pages into KV pages without copying. Returns those page ids in mapping order, so page
  // k holds bytes [k * page_bytes, (k + 1) * page_bytes) of the former tensor.
  // kFailedPrecondition if already dropped.
  StatusOr<std::vector<PageId>> drop_segment(SegmentId id);
  // Restore: takes exactly `pages` (segment_num_pages(id) distinct KV pages, chosen by the caller
  // to hold no live KV blocks) back into the segment and maps them contiguously at the segment's
  // original address, in the given order. Contents are whatever the pages held: the caller writes
  // the weights. On error nothing changes.
  Status restore_segment(SegmentId id, std::span<const PageId> pages);

  // ---- KV pages ----
  // Moves n free pages (lowest ids first) to the KV set. kResourceExhausted (nothing changes) if
  // fewer than n are free.
  StatusOr<std::vector<PageId>> add_kv_pages(std::int64_t n);
  // Returns KV pages to the free list. kInvalidArgument (nothing changes) if any is not a KV page
  // or appears twice.
  Status release_kv_pages(std::span<const PageId> pages);
  // All KV pages, ascending.
  std::vector<PageId> kv_pages() const;
  // Start of a page in the whole-arena mapping (any owner; used for KV pages and by tests).
  std::byte* page_data(PageId page) const;
  PageOwner page_owner(PageId page) const;

  // ---- integrity and stats ----
  Status verify_integrity() const;
  // CHECK-style: aborts with the verify_integrity() message.
  void check_integrity() const;
  ArenaStats stats() const;

 private:
  struct Segment {
    std::string name;
    std::int64_t bytes = 0;
    std::int64_t num_pages = 0;
    std::byte* base = nullptr;  // reserved range of num_pages * page_bytes
    std::vector<PageId> pages;  // empty while dropped
    bool dropped = false;
    bool destroyed = false;
  };

  DeviceArena(int fd, std::byte* base, std::int64_t num_pages, std::int64_t page_bytes,
              std::int64_t huge_page_bytes);
  const Segment& segment(SegmentId id) const;
  Segment& segment(SegmentId id);
  // Maps `pages` back to back at seg.base (coalescing runs of consecutive page ids).
  void map_segment_pages(const Segment& seg);
  // Replaces the segment's mapping with an inaccessible reservation.
  void unmap_segment_pages(const Segment& seg);
  bool valid_page(PageId p) const { return p.value >= 0 && p.value < num_pages_; }

  int fd_ = -1;
  std::byte* base_ = nullptr;  // whole-arena shared mapping
  std::int64_t num_pages_ = 0;
  std::int64_t page_bytes_ = 0;
  std::int64_t huge_page_bytes_ = 0;  // 0: OS pages
  std::int64_t num_param_pages_ = 0;
  std::vector<PageOwner> owners_;
  std::set<std::int64_t> free_pages_;
  std::set<std::int64_t> kv_pages_;
  std::vector<Segment> segments_;
};

}  // namespace kun::memory
