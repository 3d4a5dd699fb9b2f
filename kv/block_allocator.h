// KvBlockAllocator: pure bookkeeping of layer blocks over the KV pages it has been given.
//
// It never touches memory, so the simulator runs it with made-up page ids and no arena. Page ids
// come from memory::DeviceArena (add_kv_pages, drop_segment); block id = page * blocks_per_page +
// slot.
//
// Allocation order (kDeterministic): lowest (page add order, slot) first, so pages added early
// (the base pool) fill before pages added late (the "extension" from dropped parameters), which
// keeps the extension easy to reclaim on restore. kShuffled picks a random free block from a
// seeded generator: tests run both to prove nothing depends on the order.
//
// Reclaim for restore: reclaim_pages(n) either hands back n pages whose blocks are all free, in
// ascending id order (removing them from the pool; the caller gives them to
// DeviceArena::restore_segment, which maps consecutive ids as one run), or
// returns a repack plan. Planning sets n victim pages aside ("draining": nothing new is allocated
// there) and allocates every move's `to` block; the caller copies the bytes (KvStorage), rewrites
// the block tables (BlockTable::remap_blocks), frees every `from` block, then calls reclaim_pages
// again. cancel_reclaim() puts the victims back into service if the caller gives up.
//
// Free blocks are kept as dense per-block allocated flags plus a bitmap over add order of the pages
// that have a free slot: taking the lowest free block finds the lowest set bit and scans one
// page's slots; the bitmap changes only when a page fills up or gets a free slot back. (A
// std::set of every free block cost a tree node per block and dominated the simulator's profile.)
// Page ids index dense tables: they are arena page numbers, [0, number of pages).
//
// Invariants (verify()): free + used + (free slots of draining pages) == total; the open-page
// set holds exactly the non-draining pages with a free slot; per-page used counts match.
//
// Threads: owned by one thread (the engine thread, or the device executor); no locking.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "common/status.h"
#include "kv/kv_geometry.h"

namespace kun::kv {

enum class AllocationOrder { kDeterministic, kShuffled };

// kIds: every allocated block has an id (what a device's executor needs to find its bytes).
// kCountsOnly: blocks are counted, never named (the simulator: no executor reads a block id, and
// naming L blocks per token block per request was most of its run time). allocate_count /
// free_count move the numbers; allocate / free / reclaim_pages abort; block tables drawing from
// it keep layers and token counts but no ids (BlockTable::has_block_ids). Counts, capacity and
// out-of-blocks behave exactly as with ids.
enum class BlockNaming { kIds, kCountsOnly };

struct ReclaimResult {
  // Non-empty when done: these pages left the pool and hold no live blocks.
  std::vector<PageId> pages;
  // Non-empty when a repack is needed first (then `pages` is empty).
  std::vector<BlockMove> moves;
};

class KvBlockAllocator {
 public:
  explicit KvBlockAllocator(std::int64_t blocks_per_page,
                            AllocationOrder order = AllocationOrder::kDeterministic,
                            std::uint64_t seed = 0, BlockNaming naming = BlockNaming::kIds);

  std::int64_t blocks_per_page() const { return blocks_per_page_; }
  AllocationOrder order() const { return order_; }

  // Adds pages to the pool, in order (later pages are the extension). kInvalidArgument (nothing
  // changes) for a negative id, a duplicate, or a page already in the pool.
  Status add_pages(std::span<const PageId> pages);
  // n blocks, all or nothing. kResourceExhausted when fewer than n are free; never aborts.
  StatusOr<std::vector<BlockId>> allocate(std::int64_t n);
  // CHECKs that every block is allocated (a double free is a bug).
  void free(std::span<const BlockId> blocks);
  void free(BlockId block);
  // kCountsOnly: n blocks, all or nothing (kResourceExhausted when fewer are free), and their
  // return (CHECKs that many are in use).
  bool counts_only() const { return naming_ == BlockNaming::kCountsOnly; }
  Status allocate_count(std::int64_t n);
  void free_count(std::int64_t n);

  std::int64_t num_free() const { return num_free_; }  // allocatable now
  std::int64_t num_used() const { return num_used_; }
  std::int64_t num_total() const { return num_pages_ * blocks_per_page_; }
  std::int64_t num_pages() const { return num_pages_; }
  bool contains(BlockId block) const;
  bool is_allocated(BlockId block) const;
  bool has_page(PageId page) const { return in_pool(page.value); }
  // Allocated blocks, ascending.
  std::vector<BlockId> used_blocks() const;
  // Pages in the pool in the order they were added.
  std::vector<PageId> pages() const;
  // Pages whose blocks are all free.
  std::int64_t num_empty_pages() const;

  PageId page_of(BlockId block) const { return kv::page_of(block, blocks_per_page_); }
  std::int64_t slot_of(BlockId block) const { return kv::slot_of(block, blocks_per_page_); }

  // See the header comment. n == 0 returns an empty result. kResourceExhausted (nothing changes)
  // when the pool has fewer than n pages or fewer than n * blocks_per_page free blocks (the live
  // blocks cannot fit in the remaining pages: wait for requests to finish or preempt some).
  StatusOr<ReclaimResult> reclaim_pages(std::int64_t n);
  // Returns pages set aside by a repack plan to normal service.
  void cancel_reclaim();

  Status verify() const;

 private:
  struct PageState {
    std::int64_t seq = -1;  // add order; -1: not in the pool
    std::int64_t used = 0;
    bool draining = false;
  };

  BlockId take_free_block();
  void mark_allocated(BlockId block);
  // Takes a page out of service (draining) or puts it back: the free count and the open set.
  void set_draining(std::int64_t page, bool draining);
  void set_open(std::int64_t seq, bool open);
  void remove_page(std::int64_t page);
  bool in_pool(std::int64_t page) const {
    return page >= 0 && page < static_cast<std::int64_t>(pages_.size()) && pages_[static_cast<std::size_t>(page)].seq >= 0;
  }
  PageState& state(std::int64_t page) { return pages_[static_cast<std::size_t>(page)]; }
  const PageState& state(std::int64_t page) const { return pages_[static_cast<std::size_t>(page)]; }

  std::int64_t blocks_per_page_;
  AllocationOrder order_;
  BlockNaming naming_;
  std::mt19937_64 rng_;
  std::int64_t next_seq_ = 0;
  std::int64_t num_used_ = 0;
  std::int64_t num_free_ = 0;   // unallocated slots of non-draining pages
  std::int64_t num_pages_ = 0;
  // Dense tables: page ids are arena page indices [0, num_pages), block id = page * bpp + slot.
  std::vector<PageState> pages_;          // by page id
  std::vector<std::uint8_t> allocated_;   // by block id: 1 = allocated
  std::vector<std::int64_t> page_of_seq_;  // by add order; -1: removed
  // Open set: bit `seq` set when that page is in service and has a free slot. The lowest set bit
  // is the page allocation continues on; open_hint_ is a word index below which every word is 0.
  std::vector<std::uint64_t> open_bits_;
  std::size_t open_hint_ = 0;
};

}  // namespace kun::kv
