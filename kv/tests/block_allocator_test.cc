#include "kv/block_allocator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "kv/block_table.h"
#include "kv/integrity.h"

namespace kun::kv {
namespace {

std::vector<PageId> page_ids(std::initializer_list<std::int64_t> ids) {
  std::vector<PageId> out;
  for (auto i : ids) out.emplace_back(i);
  return out;
}

TEST(KvGeometryTest, SizesAndLayout) {
  KvGeometry g{16, 8, 64, DType::kF32};
  EXPECT_TRUE(g.validate().ok());
  EXPECT_EQ(g.element_bytes(), 4);
  EXPECT_EQ(g.layer_block_bytes(), 2 * 16 * 8 * 64 * 4);
  EXPECT_EQ(g.value_offset_bytes(), 16 * 8 * 64 * 4);
  EXPECT_EQ(g.block_stride_bytes(), g.layer_block_bytes());
  EXPECT_EQ(g.blocks_per_page(2 * kMiB), 2 * kMiB / (2 * 16 * 8 * 64 * 4));
  EXPECT_EQ(g.blocks_for_tokens(0), 0);
  EXPECT_EQ(g.blocks_for_tokens(16), 1);
  EXPECT_EQ(g.blocks_for_tokens(17), 2);
  KvGeometry odd{3, 1, 1, DType::kF32};
  EXPECT_EQ(odd.layer_block_bytes(), 24);
  EXPECT_EQ(odd.block_stride_bytes(), 64);
  EXPECT_EQ(KvGeometry({0, 1, 1}).validate().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(KvGeometry({16, 8, 64, DType::kF16}).validate().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(g.validate_for_page(4096).code(), StatusCode::kInvalidArgument);
}

TEST(KvGeometryTest, Bf16IsTheDefaultAndHalvesBytesPerToken) {
  const KvGeometry bf16{16, 8, 64};
  EXPECT_EQ(bf16.dtype, DType::kBF16);
  const KvGeometry f32{16, 8, 64, DType::kF32};
  EXPECT_EQ(bf16.bytes_per_token_per_layer(), 2 * 8 * 64 * 2);
  EXPECT_EQ(2 * bf16.bytes_per_token_per_layer(), f32.bytes_per_token_per_layer());
  EXPECT_EQ(2 * bf16.layer_block_bytes(), f32.layer_block_bytes());
  EXPECT_EQ(bf16.value_offset_bytes(), 16 * 8 * 64 * 2);
  // Twice the layer blocks in the same page.
  EXPECT_EQ(bf16.blocks_per_page(2 * kMiB), 2 * f32.blocks_per_page(2 * kMiB));
}

TEST(KvBlockAllocatorTest, DeterministicOrderAndIdsFromPages) {
  KvBlockAllocator a(4);
  ASSERT_TRUE(a.add_pages(page_ids({7, 2})).ok());
  EXPECT_EQ(a.num_total(), 8);
  EXPECT_EQ(a.num_free(), 8);
  auto b = a.allocate(5);
  ASSERT_TRUE(b.ok());
  // Page 7 was added first: its slots come first, then page 2's.
  const std::vector<BlockId> want = {BlockId(28), BlockId(29), BlockId(30), BlockId(31), BlockId(8)};
  EXPECT_EQ(*b, want);
  EXPECT_EQ(a.page_of(BlockId(30)), PageId(7));
  EXPECT_EQ(a.slot_of(BlockId(30)), 2);
  EXPECT_EQ(a.num_used(), 5);
  EXPECT_EQ(a.num_free(), 3);
  a.free(BlockId(29));
  auto c = a.allocate(1);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)[0], BlockId(29));
  EXPECT_TRUE(a.verify().ok());
}

TEST(KvBlockAllocatorTest, OutOfBlocksIsAStatusAndAllOrNothing) {
  KvBlockAllocator a(4);
  ASSERT_TRUE(a.add_pages(page_ids({0})).ok());
  ASSERT_TRUE(a.allocate(3).ok());
  auto r = a.allocate(2);
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(a.num_free(), 1);
  EXPECT_EQ(a.num_used(), 3);
  EXPECT_EQ(a.allocate(-1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(a.allocate(0).ok());
  KvBlockAllocator empty(2);
  EXPECT_EQ(empty.allocate(1).status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(a.verify().ok());
}

TEST(KvBlockAllocatorTest, AddPagesRejectsDuplicates) {
  KvBlockAllocator a(2);
  ASSERT_TRUE(a.add_pages(page_ids({1})).ok());
  EXPECT_EQ(a.add_pages(page_ids({1})).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(a.add_pages(page_ids({3, 3})).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(a.add_pages(page_ids({-2})).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(a.num_pages(), 1);
}

TEST(KvBlockAllocatorTest, ShuffledOrderStillAllocatesEveryBlockOnce) {
  KvBlockAllocator a(8, AllocationOrder::kShuffled, 123);
  ASSERT_TRUE(a.add_pages(page_ids({0, 1, 2})).ok());
  auto b = a.allocate(24);
  ASSERT_TRUE(b.ok());
  std::set<BlockId> unique(b->begin(), b->end());
  EXPECT_EQ(unique.size(), 24u);
  EXPECT_FALSE(std::is_sorted(b->begin(), b->end()));
  EXPECT_EQ(a.num_free(), 0);
  EXPECT_TRUE(a.verify().ok());
}

TEST(KvBlockAllocatorDeathTest, DoubleFreeAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  KvBlockAllocator a(2);
  ASSERT_TRUE(a.add_pages(page_ids({0})).ok());
  auto b = a.allocate(1);
  ASSERT_TRUE(b.ok());
  a.free((*b)[0]);
  EXPECT_DEATH(a.free((*b)[0]), "double free");
  EXPECT_DEATH(a.free(BlockId(100)), "outside the pool");
}

TEST(KvBlockAllocatorTest, ReclaimPrefersEmptyExtensionPages) {
  KvBlockAllocator a(4);
  ASSERT_TRUE(a.add_pages(page_ids({0, 1})).ok());  // base
  ASSERT_TRUE(a.add_pages(page_ids({5, 6})).ok());  // extension (dropped layer)
  ASSERT_TRUE(a.allocate(3).ok());                   // lands on page 0
  auto r = a.reclaim_pages(2);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->moves.empty());
  EXPECT_EQ(r->pages, page_ids({5, 6}));  // the extension's, latest added first, handed back ascending
  EXPECT_EQ(a.num_pages(), 2);
  EXPECT_EQ(a.num_total(), 8);
  EXPECT_FALSE(a.has_page(PageId(5)));
  EXPECT_TRUE(a.verify().ok());
  EXPECT_EQ(a.reclaim_pages(3).status().code(), StatusCode::kResourceExhausted);
  auto none = a.reclaim_pages(0);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->pages.empty() && none->moves.empty());
}

TEST(KvBlockAllocatorTest, ReclaimRepackPlanEmptiesPages) {
  KvBlockAllocator a(4);
  ASSERT_TRUE(a.add_pages(page_ids({0, 1, 2})).ok());
  auto blocks = a.allocate(12);
  ASSERT_TRUE(blocks.ok());
  // Leave live blocks scattered: one on each page.
  std::vector<BlockId> keep = {BlockId(1), BlockId(6), BlockId(11)};
  for (BlockId b : *blocks) {
    if (std::find(keep.begin(), keep.end(), b) == keep.end()) a.free(b);
  }
  // Build a one-layer table of three tokens over the kept blocks.
  BlockTable table(1, 0, 0);
  {
    // adopt requires blocks_per_layer() == count: grow tokens first on a layerless table.
    ASSERT_TRUE(table.append_tokens(3, a).ok());
    table.adopt_layer(0, keep);
  }
  std::vector<TableRef> refs = {{RequestId(1), &table}};
  ASSERT_TRUE(verify_block_ownership(a, refs).ok());

  // Not enough free blocks to empty 3 pages (needs 12, has 9).
  EXPECT_EQ(a.reclaim_pages(3).status().code(), StatusCode::kResourceExhausted);
  auto plan = a.reclaim_pages(2);
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(plan->pages.empty());
  ASSERT_EQ(plan->moves.size(), 2u);  // the two victims hold one live block each
  std::vector<BlockId> to_blocks;
  for (const BlockMove& m : plan->moves) to_blocks.push_back(m.to);
  // Mid-plan: the `to` blocks are allocated but not yet in a table.
  EXPECT_TRUE(verify_block_ownership(a, refs, to_blocks).ok());
  EXPECT_FALSE(verify_block_ownership(a, refs).ok());
  // Victim pages are set aside: allocation does not land there.
  const std::int64_t free_now = a.num_free();
  EXPECT_EQ(free_now, 12 - 3 - 2 - 6);  // 12 total - 3 live - 2 new - 6 free slots of 2 victims
  EXPECT_EQ(table.remap_blocks(plan->moves), 2);
  for (const BlockMove& m : plan->moves) a.free(m.from);
  ASSERT_TRUE(verify_block_ownership(a, refs).ok());
  auto done = a.reclaim_pages(2);
  ASSERT_TRUE(done.ok());
  EXPECT_TRUE(done->moves.empty());
  ASSERT_EQ(done->pages.size(), 2u);
  EXPECT_EQ(a.num_pages(), 1);
  EXPECT_EQ(a.num_used(), 3);
  ASSERT_TRUE(verify_block_ownership(a, refs).ok());
  for (BlockId b : table.layer_blocks(0)) EXPECT_TRUE(a.is_allocated(b));
}

TEST(KvBlockAllocatorTest, CancelReclaimReopensVictims) {
  KvBlockAllocator a(2);
  ASSERT_TRUE(a.add_pages(page_ids({0, 1, 2})).ok());
  auto b = a.allocate(6);
  ASSERT_TRUE(b.ok());
  for (std::int64_t id : {0, 2, 4}) a.free(BlockId(id));  // one live block on every page
  auto plan = a.reclaim_pages(1);
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->moves.size(), 1u);
  EXPECT_EQ(plan->moves[0].from, BlockId(5));  // the last page added is the victim
  EXPECT_EQ(plan->moves[0].to, BlockId(0));
  EXPECT_EQ(a.num_free(), 1);  // the victim's free slot is set aside
  EXPECT_TRUE(a.verify().ok());
  auto more = a.allocate(1);
  ASSERT_TRUE(more.ok());
  EXPECT_EQ((*more)[0], BlockId(2));  // never on the victim page
  a.free((*more)[0]);
  a.free(plan->moves[0].to);  // give up on the plan
  a.cancel_reclaim();
  EXPECT_EQ(a.num_free(), 3);
  EXPECT_EQ(a.num_used(), 3);
  EXPECT_TRUE(a.verify().ok());
}

}  // namespace
}  // namespace kun::kv
