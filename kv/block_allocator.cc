#include "kv/block_allocator.h"

#include <algorithm>
#include <iterator>
#include <string>

namespace kun::kv {

KvBlockAllocator::KvBlockAllocator(std::int64_t blocks_per_page, AllocationOrder order, std::uint64_t seed)
    : blocks_per_page_(blocks_per_page), order_(order), rng_(seed) {
  KUN_CHECK_GE(blocks_per_page, 1) << "a KV page must hold at least one layer block";
}

Status KvBlockAllocator::add_pages(std::span<const PageId> pages) {
  std::set<std::int64_t> seen;
  for (PageId p : pages) {
    if (p.value < 0) return invalid_argument("kv add_pages: invalid page id " + std::to_string(p.value));
    if (pages_.count(p.value) != 0) {
      return invalid_argument("kv add_pages: page " + std::to_string(p.value) + " is already in the pool");
    }
    if (!seen.insert(p.value).second) {
      return invalid_argument("kv add_pages: page " + std::to_string(p.value) + " given twice");
    }
  }
  for (PageId p : pages) {
    PageState st;
    st.seq = next_seq_++;
    st.allocated.assign(static_cast<std::size_t>(blocks_per_page_), 0);
    open_pages_.emplace(st.seq, p.value);
    num_free_ += blocks_per_page_;
    pages_.emplace(p.value, std::move(st));
  }
  return ok_status();
}

std::int64_t KvBlockAllocator::first_free_slot(const PageState& st) const {
  for (std::int64_t s = 0; s < blocks_per_page_; ++s) {
    if (!st.allocated[static_cast<std::size_t>(s)]) return s;
  }
  KUN_CHECK(false) << "kv page in the open set has no free slot";
  return -1;
}

void KvBlockAllocator::mark_allocated(BlockId block) {
  PageState& st = pages_.at(page_of(block).value);
  auto slot = static_cast<std::size_t>(slot_of(block));
  KUN_CHECK(!st.allocated[slot]) << "kv block " << block << " allocated twice";
  KUN_CHECK(!st.draining) << "kv block " << block << " allocated on a draining page";
  st.allocated[slot] = 1;
  ++st.used;
  ++num_used_;
  --num_free_;
  if (st.used == blocks_per_page_) open_pages_.erase({st.seq, page_of(block).value});
}

BlockId KvBlockAllocator::take_free_block() {
  KUN_CHECK(num_free_ > 0 && !open_pages_.empty()) << "no free kv block";
  // The k-th free block in (page add order, slot) order: k = 0 (deterministic) or uniform.
  std::int64_t k = 0;
  if (order_ == AllocationOrder::kShuffled) {
    std::uniform_int_distribution<std::size_t> pick(0, static_cast<std::size_t>(num_free_ - 1));
    k = static_cast<std::int64_t>(pick(rng_));
  }
  for (const auto& [seq, page] : open_pages_) {
    const PageState& st = pages_.at(page);
    const std::int64_t page_free = blocks_per_page_ - st.used;
    if (k >= page_free) {
      k -= page_free;
      continue;
    }
    for (std::int64_t s = first_free_slot(st); s < blocks_per_page_; ++s) {
      if (st.allocated[static_cast<std::size_t>(s)]) continue;
      if (k-- > 0) continue;
      const BlockId block = block_id(PageId(page), s, blocks_per_page_);
      mark_allocated(block);
      return block;
    }
  }
  KUN_CHECK(false) << "kv free count " << num_free_ << " does not match the open pages";
  return BlockId();
}

void KvBlockAllocator::set_draining(std::int64_t page, PageState& st, bool draining) {
  if (st.draining == draining) return;
  const std::int64_t page_free = blocks_per_page_ - st.used;
  st.draining = draining;
  if (draining) {
    num_free_ -= page_free;
    if (page_free > 0) open_pages_.erase({st.seq, page});
  } else {
    num_free_ += page_free;
    if (page_free > 0) open_pages_.emplace(st.seq, page);
  }
}

StatusOr<std::vector<BlockId>> KvBlockAllocator::allocate(std::int64_t n) {
  if (n < 0) return invalid_argument("kv allocate: negative count " + std::to_string(n));
  if (n > num_free()) {
    return resource_exhausted("out of KV blocks: " + std::to_string(n) + " wanted, " +
                              std::to_string(num_free()) + " free of " + std::to_string(num_total()));
  }
  std::vector<BlockId> out;
  out.reserve(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) out.push_back(take_free_block());
  return out;
}

void KvBlockAllocator::free(BlockId block) {
  auto it = pages_.find(page_of(block).value);
  KUN_CHECK(block.valid() && it != pages_.end()) << "free of kv block " << block << " outside the pool";
  PageState& st = it->second;
  auto slot = static_cast<std::size_t>(slot_of(block));
  KUN_CHECK(st.allocated[slot]) << "double free of kv block " << block;
  st.allocated[slot] = 0;
  --st.used;
  --num_used_;
  if (!st.draining) {
    ++num_free_;
    if (st.used == blocks_per_page_ - 1) open_pages_.emplace(st.seq, it->first);
  }
}

void KvBlockAllocator::free(std::span<const BlockId> blocks) {
  for (BlockId b : blocks) free(b);
}

bool KvBlockAllocator::contains(BlockId block) const {
  return block.valid() && pages_.count(page_of(block).value) != 0;
}

bool KvBlockAllocator::is_allocated(BlockId block) const {
  if (!contains(block)) return false;
  return pages_.at(page_of(block).value).allocated[static_cast<std::size_t>(slot_of(block))] != 0;
}

std::vector<BlockId> KvBlockAllocator::used_blocks() const {
  std::vector<BlockId> out;
  out.reserve(static_cast<std::size_t>(num_used_));
  for (const auto& [page, st] : pages_) {
    for (std::int64_t s = 0; s < blocks_per_page_; ++s) {
      if (st.allocated[static_cast<std::size_t>(s)]) out.push_back(block_id(PageId(page), s, blocks_per_page_));
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<PageId> KvBlockAllocator::pages() const {
  std::vector<std::pair<std::int64_t, std::int64_t>> by_seq;
  by_seq.reserve(pages_.size());
  for (const auto& [page, st] : pages_) by_seq.emplace_back(st.seq, page);
  std::sort(by_seq.begin(), by_seq.end());
  std::vector<PageId> out;
  out.reserve(by_seq.size());
  for (const auto& [seq, page] : by_seq) out.emplace_back(page);
  return out;
}

std::int64_t KvBlockAllocator::num_empty_pages() const {
  std::int64_t n = 0;
  for (const auto& [page, st] : pages_) n += st.used == 0 ? 1 : 0;
  return n;
}

void KvBlockAllocator::cancel_reclaim() {
  for (auto& [page, st] : pages_) set_draining(page, st, false);
}

void KvBlockAllocator::remove_page(std::int64_t page) {
  auto it = pages_.find(page);
  KUN_CHECK(it != pages_.end() && it->second.used == 0) << "removing kv page " << page << " with live blocks";
  set_draining(page, it->second, true);  // out of the open set and the free count
  pages_.erase(it);
}

StatusOr<ReclaimResult> KvBlockAllocator::reclaim_pages(std::int64_t n) {
  if (n < 0) return invalid_argument("kv reclaim_pages: negative count " + std::to_string(n));
  ReclaimResult result;
  if (n == 0) return result;
  cancel_reclaim();
  if (n > num_pages()) {
    return resource_exhausted("kv reclaim: " + std::to_string(n) + " pages wanted, the pool has " +
                              std::to_string(num_pages()));
  }
  // Candidates ordered by (live blocks ascending, add order descending): empty extension pages
  // first, then the pages that are cheapest to empty.
  struct Candidate {
    std::int64_t used;
    std::int64_t seq;
    std::int64_t page;
  };
  std::vector<Candidate> candidates;
  candidates.reserve(pages_.size());
  for (const auto& [page, st] : pages_) candidates.push_back({st.used, st.seq, page});
  std::sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    if (a.used != b.used) return a.used < b.used;
    return a.seq > b.seq;
  });
  const auto count = static_cast<std::size_t>(n);
  if (candidates[count - 1].used == 0) {
    for (std::size_t i = 0; i < count; ++i) {
      remove_page(candidates[i].page);
      result.pages.emplace_back(candidates[i].page);
    }
    return result;
  }
  // The victims' live blocks must fit in the other pages' free slots, which holds exactly when
  // the pool has at least n * blocks_per_page free blocks.
  if (num_free() < n * blocks_per_page_) {
    return resource_exhausted("kv reclaim: emptying " + std::to_string(n) + " pages needs " +
                              std::to_string(n * blocks_per_page_) + " free blocks, " +
                              std::to_string(num_free()) + " free of " + std::to_string(num_total()));
  }
  for (std::size_t i = 0; i < count; ++i) {
    set_draining(candidates[i].page, pages_.at(candidates[i].page), true);
  }
  for (std::size_t i = 0; i < count; ++i) {
    const PageState& st = pages_.at(candidates[i].page);
    for (std::int64_t s = 0; s < blocks_per_page_; ++s) {
      if (!st.allocated[static_cast<std::size_t>(s)]) continue;
      const BlockId from = block_id(PageId(candidates[i].page), s, blocks_per_page_);
      result.moves.push_back({from, take_free_block()});
    }
  }
  return result;
}

Status KvBlockAllocator::verify() const {
  auto fail = [](const std::string& m) { return internal_error("kv allocator integrity: " + m); };
  std::int64_t used = 0;
  std::int64_t free_slots = 0;
  std::int64_t draining_free = 0;
  std::int64_t open = 0;
  for (const auto& [page, st] : pages_) {
    std::int64_t page_used = 0;
    for (std::int64_t s = 0; s < blocks_per_page_; ++s) {
      if (st.allocated[static_cast<std::size_t>(s)]) {
        ++page_used;
      } else if (st.draining) {
        ++draining_free;
      } else {
        ++free_slots;
      }
    }
    const bool should_be_open = !st.draining && page_used < blocks_per_page_;
    if ((open_pages_.count({st.seq, page}) != 0) != should_be_open) {
      return fail("page " + std::to_string(page) + (should_be_open ? " has free slots but is not open" : " is open but has no free slot"));
    }
    open += should_be_open ? 1 : 0;
    if (page_used != st.used) {
      return fail("page " + std::to_string(page) + " counts " + std::to_string(st.used) + " used blocks, holds " +
                  std::to_string(page_used));
    }
    used += page_used;
  }
  if (open != static_cast<std::int64_t>(open_pages_.size())) {
    return fail("open set has " + std::to_string(open_pages_.size()) + " pages, " + std::to_string(open) + " expected");
  }
  if (free_slots != num_free()) {
    return fail("free count is " + std::to_string(num_free()) + " entries, pages have " +
                std::to_string(free_slots) + " free slots");
  }
  if (used != num_used_) {
    return fail("used count " + std::to_string(num_used_) + " but pages hold " + std::to_string(used));
  }
  if (num_free() + num_used_ + draining_free != num_total()) {
    return fail("free " + std::to_string(num_free()) + " + used " + std::to_string(num_used_) + " + draining " +
                std::to_string(draining_free) + " != total " + std::to_string(num_total()));
  }
  return ok_status();
}

}  // namespace kun::kv
