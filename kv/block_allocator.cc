#include "kv/block_allocator.h"

#include <algorithm>
#include <bit>
#include <string>

namespace kun::kv {

KvBlockAllocator::KvBlockAllocator(std::int64_t blocks_per_page, AllocationOrder order, std::uint64_t seed,
                                   BlockNaming naming)
    : blocks_per_page_(blocks_per_page), order_(order), naming_(naming), rng_(seed) {
  KUN_CHECK_GE(blocks_per_page, 1) << "a KV page must hold at least one layer block";
}

Status KvBlockAllocator::add_pages(std::span<const PageId> pages) {
  // Duplicates within `pages`: a dense flag per page id up to the largest given (page ids are
  // arena page numbers; a std::set here was a tree node per page and 17 % of a simulation).
  std::int64_t max_page = -1;
  for (PageId p : pages) {
    if (p.value < 0) return invalid_argument("kv add_pages: invalid page id " + std::to_string(p.value));
    if (in_pool(p.value)) {
      return invalid_argument("kv add_pages: page " + std::to_string(p.value) + " is already in the pool");
    }
    max_page = std::max(max_page, p.value);
  }
  std::vector<std::uint8_t> seen(static_cast<std::size_t>(max_page + 1), 0);
  for (PageId p : pages) {
    auto& flag = seen[static_cast<std::size_t>(p.value)];
    if (flag) return invalid_argument("kv add_pages: page " + std::to_string(p.value) + " given twice");
    flag = 1;
  }
  if (max_page >= static_cast<std::int64_t>(pages_.size())) {
    pages_.reserve(static_cast<std::size_t>(max_page + 1));
    allocated_.reserve(static_cast<std::size_t>(max_page + 1) * static_cast<std::size_t>(blocks_per_page_));
  }
  page_of_seq_.reserve(page_of_seq_.size() + pages.size());
  for (PageId p : pages) {
    const auto page = static_cast<std::size_t>(p.value);
    if (page >= pages_.size()) {
      pages_.resize(page + 1);
      allocated_.resize((page + 1) * static_cast<std::size_t>(blocks_per_page_), 0);
    }
    PageState& st = pages_[page];
    st = PageState{next_seq_++, 0, false};
    page_of_seq_.push_back(p.value);
    open_bits_.resize((page_of_seq_.size() + 63) / 64, 0);
    set_open(st.seq, true);
    num_free_ += blocks_per_page_;
    ++num_pages_;
  }
  return ok_status();
}

void KvBlockAllocator::set_open(std::int64_t seq, bool open) {
  const auto word = static_cast<std::size_t>(seq) / 64;
  const std::uint64_t bit = std::uint64_t{1} << (static_cast<std::size_t>(seq) % 64);
  if (open) {
    open_bits_[word] |= bit;
    open_hint_ = std::min(open_hint_, word);
  } else {
    open_bits_[word] &= ~bit;
  }
}

void KvBlockAllocator::mark_allocated(BlockId block) {
  const std::int64_t page = page_of(block).value;
  PageState& st = state(page);
  auto& flag = allocated_[static_cast<std::size_t>(block.value)];
  KUN_CHECK(!flag) << "kv block " << block << " allocated twice";
  KUN_CHECK(!st.draining) << "kv block " << block << " allocated on a draining page";
  flag = 1;
  ++st.used;
  ++num_used_;
  --num_free_;
  if (st.used == blocks_per_page_) set_open(st.seq, false);
}

BlockId KvBlockAllocator::take_free_block() {
  KUN_CHECK(num_free_ > 0) << "no free kv block";
  // The k-th free block in (page add order, slot) order: k = 0 (deterministic) or uniform.
  std::int64_t k = 0;
  if (order_ == AllocationOrder::kShuffled) {
    std::uniform_int_distribution<std::size_t> pick(0, static_cast<std::size_t>(num_free_ - 1));
    k = static_cast<std::int64_t>(pick(rng_));
  }
  while (open_hint_ < open_bits_.size() && open_bits_[open_hint_] == 0) ++open_hint_;
  for (std::size_t w = open_hint_; w < open_bits_.size(); ++w) {
    std::uint64_t bits = open_bits_[w];
    while (bits != 0) {
      const auto seq = static_cast<std::int64_t>(w * 64 + static_cast<std::size_t>(std::countr_zero(bits)));
      bits &= bits - 1;
      const std::int64_t page = page_of_seq_[static_cast<std::size_t>(seq)];
      const PageState& st = state(page);
      const std::int64_t page_free = blocks_per_page_ - st.used;
      if (k >= page_free) {
        k -= page_free;
        continue;
      }
      const std::size_t base = static_cast<std::size_t>(page * blocks_per_page_);
      for (std::int64_t s = 0; s < blocks_per_page_; ++s) {
        if (allocated_[base + static_cast<std::size_t>(s)]) continue;
        if (k-- > 0) continue;
        const BlockId block = block_id(PageId(page), s, blocks_per_page_);
        mark_allocated(block);
        return block;
      }
    }
  }
  KUN_CHECK(false) << "kv free count " << num_free_ << " does not match the open pages";
  return BlockId();
}

void KvBlockAllocator::set_draining(std::int64_t page, bool draining) {
  PageState& st = state(page);
  if (st.draining == draining) return;
  const std::int64_t page_free = blocks_per_page_ - st.used;
  st.draining = draining;
  num_free_ += draining ? -page_free : page_free;
  if (page_free > 0) set_open(st.seq, !draining);
}

Status KvBlockAllocator::allocate_count(std::int64_t n) {
  KUN_CHECK(counts_only()) << "allocate_count on an allocator that names its blocks";
  if (n < 0) return invalid_argument("kv allocate: negative count " + std::to_string(n));
  if (n > num_free()) {
    return resource_exhausted("out of KV blocks: " + std::to_string(n) + " wanted, " +
                              std::to_string(num_free()) + " free of " + std::to_string(num_total()));
  }
  num_free_ -= n;
  num_used_ += n;
  return ok_status();
}

void KvBlockAllocator::free_count(std::int64_t n) {
  KUN_CHECK(counts_only()) << "free_count on an allocator that names its blocks";
  KUN_CHECK(n >= 0 && n <= num_used_) << "free of " << n << " kv blocks, " << num_used_ << " in use";
  num_used_ -= n;
  num_free_ += n;
}

StatusOr<std::vector<BlockId>> KvBlockAllocator::allocate(std::int64_t n) {
  KUN_CHECK(!counts_only()) << "named blocks wanted from a counts-only allocator";
  if (n < 0) return invalid_argument("kv allocate: negative count " + std::to_string(n));
  if (n > num_free()) {
    return resource_exhausted("out of KV blocks: " + std::to_string(n) + " wanted, " +
                              std::to_string(num_free()) + " free of " + std::to_string(num_total()));
  }
  std::vector<BlockId> out;
  out.reserve(static_cast<std::size_t>(n));
  if (order_ == AllocationOrder::kShuffled) {
    for (std::int64_t i = 0; i < n; ++i) out.push_back(take_free_block());
    return out;
  }
  // Lowest first: fill the lowest open page's free slots in order, then the next one (the same
  // blocks, in the same order, as n calls of take_free_block, without searching for each).
  while (static_cast<std::int64_t>(out.size()) < n) {
    while (open_hint_ < open_bits_.size() && open_bits_[open_hint_] == 0) ++open_hint_;
    KUN_CHECK_LT(open_hint_, open_bits_.size()) << "kv free count " << num_free_ << " does not match the open pages";
    const auto seq = open_hint_ * 64 + static_cast<std::size_t>(std::countr_zero(open_bits_[open_hint_]));
    const std::int64_t page = page_of_seq_[seq];
    const std::size_t base = static_cast<std::size_t>(page * blocks_per_page_);
    for (std::int64_t s = 0; s < blocks_per_page_ && static_cast<std::int64_t>(out.size()) < n; ++s) {
      if (allocated_[base + static_cast<std::size_t>(s)]) continue;
      const BlockId block = block_id(PageId(page), s, blocks_per_page_);
      mark_allocated(block);  // closes the page when it fills
      out.push_back(block);
    }
  }
  return out;
}

void KvBlockAllocator::free(BlockId block) {
  KUN_CHECK(!counts_only()) << "free of named kv block " << block << " on a counts-only allocator";
  const std::int64_t page = block.valid() ? page_of(block).value : -1;
  KUN_CHECK(in_pool(page)) << "free of kv block " << block << " outside the pool";
  PageState& st = state(page);
  auto& flag = allocated_[static_cast<std::size_t>(block.value)];
  KUN_CHECK(flag) << "double free of kv block " << block;
  flag = 0;
  --st.used;
  --num_used_;
  if (!st.draining) {
    ++num_free_;
    if (st.used == blocks_per_page_ - 1) set_open(st.seq, true);
  }
}

void KvBlockAllocator::free(std::span<const BlockId> blocks) {
  for (BlockId b : blocks) free(b);
}

bool KvBlockAllocator::contains(BlockId block) const {
  return block.valid() && in_pool(page_of(block).value);
}

bool KvBlockAllocator::is_allocated(BlockId block) const {
  if (!contains(block)) return false;
  return allocated_[static_cast<std::size_t>(block.value)] != 0;
}

std::vector<BlockId> KvBlockAllocator::used_blocks() const {
  std::vector<BlockId> out;
  out.reserve(static_cast<std::size_t>(num_used_));
  for (std::size_t b = 0; b < allocated_.size(); ++b) {
    if (allocated_[b]) out.emplace_back(static_cast<std::int64_t>(b));
  }
  return out;
}

std::vector<PageId> KvBlockAllocator::pages() const {
  std::vector<PageId> out;
  out.reserve(static_cast<std::size_t>(num_pages_));
  for (std::int64_t page : page_of_seq_) {
    if (page >= 0) out.emplace_back(page);
  }
  return out;
}

std::int64_t KvBlockAllocator::num_empty_pages() const {
  std::int64_t n = 0;
  for (std::int64_t page : page_of_seq_) n += page >= 0 && state(page).used == 0 ? 1 : 0;
  return n;
}

void KvBlockAllocator::cancel_reclaim() {
  for (std::int64_t page : page_of_seq_) {
    if (page >= 0) set_draining(page, false);
  }
}

void KvBlockAllocator::remove_page(std::int64_t page) {
  KUN_CHECK(in_pool(page) && state(page).used == 0) << "removing kv page " << page << " with live blocks";
  set_draining(page, true);  // out of the open set and the free count
  PageState& st = state(page);
  page_of_seq_[static_cast<std::size_t>(st.seq)] = -1;
  st = PageState{};
  --num_pages_;
}

StatusOr<ReclaimResult> KvBlockAllocator::reclaim_pages(std::int64_t n) {
  KUN_CHECK(!counts_only()) << "reclaim needs block ids (a repack names the blocks it moves)";
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
  candidates.reserve(static_cast<std::size_t>(num_pages_));
  for (std::int64_t page : page_of_seq_) {
    if (page >= 0) candidates.push_back({state(page).used, state(page).seq, page});
  }
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
    // Ascending ids: a restore maps the pages in this order, so a layer's own pages come back as
    // the consecutive runs (and, in a huge-page arena, the huge pages) they were.
    std::sort(result.pages.begin(), result.pages.end(), [](PageId x, PageId y) { return x.value < y.value; });
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
    set_draining(candidates[i].page, true);
  }
  for (std::size_t i = 0; i < count; ++i) {
    for (std::int64_t s = 0; s < blocks_per_page_; ++s) {
      if (!allocated_[static_cast<std::size_t>(candidates[i].page * blocks_per_page_ + s)]) continue;
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
  std::int64_t pages = 0;
  for (std::size_t seq = 0; seq < page_of_seq_.size(); ++seq) {
    const bool open = (open_bits_[seq / 64] >> (seq % 64)) & 1U;
    const std::int64_t page = page_of_seq_[seq];
    if (page < 0) {
      if (open) return fail("removed page slot " + std::to_string(seq) + " is open");
      continue;
    }
    const PageState& st = state(page);
    if (st.seq != static_cast<std::int64_t>(seq)) return fail("page " + std::to_string(page) + " has a wrong add order");
    ++pages;
    std::int64_t page_used = 0;
    for (std::int64_t s = 0; s < blocks_per_page_; ++s) {
      if (allocated_[static_cast<std::size_t>(page * blocks_per_page_ + s)]) {
        ++page_used;
      } else if (st.draining) {
        ++draining_free;
      } else {
        ++free_slots;
      }
    }
    const bool should_be_open = !st.draining && page_used < blocks_per_page_;
    if (open != should_be_open) {
      return fail("page " + std::to_string(page) + (should_be_open ? " has free slots but is not open" : " is open but has no free slot"));
    }
    if (seq / 64 < open_hint_ && open) return fail("open page below the search hint");
    if (counts_only() && (page_used != 0 || st.used != 0)) return fail("a counts-only allocator holds a named block");
    if (page_used != st.used) {
      return fail("page " + std::to_string(page) + " counts " + std::to_string(st.used) + " used blocks, holds " +
                  std::to_string(page_used));
    }
    used += page_used;
  }
  for (std::size_t page = 0; page < pages_.size(); ++page) {
    if (pages_[page].seq >= 0) continue;
    for (std::int64_t s = 0; s < blocks_per_page_; ++s) {
      if (allocated_[page * static_cast<std::size_t>(blocks_per_page_) + static_cast<std::size_t>(s)]) {
        return fail("block of page " + std::to_string(page) + " outside the pool is allocated");
      }
    }
  }
  if (pages != num_pages_) return fail("page count " + std::to_string(num_pages_) + " but " + std::to_string(pages) + " in the pool");
  if (counts_only()) {  // blocks are numbers: every slot of every page is "free" by name
    if (num_used_ < 0 || num_free() < 0 || num_free() + num_used_ != num_total()) {
      return fail("counts: free " + std::to_string(num_free()) + " + used " + std::to_string(num_used_) +
                  " != total " + std::to_string(num_total()));
    }
    return ok_status();
  }
  if (free_slots != num_free()) {
    return fail("free count is " + std::to_string(num_free()) + ", pages have " + std::to_string(free_slots) +
                " free slots");
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
