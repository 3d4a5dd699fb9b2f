#include "kv/block_table.h"

#include <gtest/gtest.h>

#include "kv/integrity.h"

namespace kun::kv {
namespace {

KvBlockAllocator make_allocator(std::int64_t pages, std::int64_t blocks_per_page) {
  KvBlockAllocator a(blocks_per_page);
  std::vector<PageId> ids;
  for (std::int64_t p = 0; p < pages; ++p) ids.emplace_back(p);
  KUN_CHECK_OK(a.add_pages(ids));
  return a;
}

TEST(BlockTableTest, AppendAllocatesForEveryLayerAtOnce) {
  KvBlockAllocator a = make_allocator(4, 4);  // 16 layer blocks
  BlockTable t(4, 2, 5);                      // layers 2, 3, 4
  EXPECT_EQ(t.num_layers(), 3);
  EXPECT_EQ(t.blocks_needed_to_append(1), 3);
  EXPECT_EQ(t.blocks_needed_to_append(4), 3);
  EXPECT_EQ(t.blocks_needed_to_append(5), 6);
  ASSERT_TRUE(t.append_tokens(5, a).ok());
  EXPECT_EQ(t.num_tokens(), 5);
  EXPECT_EQ(t.blocks_per_layer(), 2);
  EXPECT_EQ(t.num_blocks(), 6);
  EXPECT_EQ(a.num_used(), 6);
  EXPECT_EQ(t.blocks_needed_to_append(3), 0);
  ASSERT_TRUE(t.append_tokens(3, a).ok());  // fills block 2 of each layer: no allocation
  EXPECT_EQ(a.num_used(), 6);
  EXPECT_EQ(t.block_for_token(3, 7), t.layer_blocks(3)[1]);
  EXPECT_EQ(t.slot_for_token(7), 3);
  EXPECT_FALSE(t.holds_layer(1));
  const std::vector<std::int64_t> want_layers = {2, 3, 4};
  EXPECT_EQ(t.layers(), want_layers);
  std::vector<TableRef> refs = {{RequestId(0), &t}};
  EXPECT_TRUE(verify_block_ownership(a, refs).ok());
}

TEST(BlockTableTest, AppendIsAtomicWhenOutOfBlocks) {
  KvBlockAllocator a = make_allocator(1, 4);
  BlockTable t(2, 0, 3);
  ASSERT_TRUE(t.append_tokens(2, a).ok());  // 3 blocks
  const Status s = t.append_tokens(1, a);    // wants 3 more, 1 free
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(t.num_tokens(), 2);
  EXPECT_EQ(t.num_blocks(), 3);
  EXPECT_EQ(a.num_free(), 1);
  EXPECT_TRUE(t.verify().ok());
}

TEST(BlockTableTest, TruncateAndFreeAll) {
  KvBlockAllocator a = make_allocator(4, 4);
  BlockTable t(4, 0, 2);
  ASSERT_TRUE(t.append_tokens(13, a).ok());  // 4 blocks per layer
  EXPECT_EQ(a.num_used(), 8);
  t.truncate(5, a);
  EXPECT_EQ(t.num_tokens(), 5);
  EXPECT_EQ(a.num_used(), 4);
  t.free_all(a);
  EXPECT_EQ(a.num_used(), 0);
  EXPECT_EQ(t.num_tokens(), 0);
  EXPECT_EQ(t.num_layers(), 2);
  EXPECT_TRUE(t.verify().ok());
}

TEST(BlockTableTest, LayersLeaveAndArriveOneAtATime) {
  KvBlockAllocator home = make_allocator(4, 4);
  KvBlockAllocator peer = make_allocator(4, 4);
  BlockTable stale(4, 0, 4);  // a stale request holds all 4 layers at home
  ASSERT_TRUE(stale.append_tokens(6, home).ok());
  BlockTable moved(4, 0, 0);  // the peer's table for the same request: no layer yet
  ASSERT_TRUE(moved.append_tokens(6, peer).ok());
  EXPECT_EQ(peer.num_used(), 0);
  // Exchange layers 2 and 3, one at a time.
  for (std::int64_t l : {2, 3}) {
    ASSERT_TRUE(moved.add_layer(l, peer).ok());
    std::vector<BlockId> sent = stale.release_layer(l);
    EXPECT_EQ(sent.size(), 2u);
    home.free(sent);  // after the bytes went through the transport
  }
  EXPECT_EQ(stale.layers(), (std::vector<std::int64_t>{0, 1}));
  EXPECT_EQ(moved.layers(), (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(home.num_used(), 4);
  EXPECT_EQ(peer.num_used(), 4);
  // Appends now only allocate for the held layers.
  EXPECT_EQ(stale.blocks_needed_to_append(3), 2);
  ASSERT_TRUE(stale.append_tokens(3, home).ok());
  EXPECT_EQ(home.num_used(), 6);
  EXPECT_EQ(moved.add_layer(2, peer).code(), StatusCode::kInvalidArgument);
  stale.drop_layer(1, home);
  EXPECT_EQ(home.num_used(), 3);
  std::vector<TableRef> home_refs = {{RequestId(9), &stale}};
  std::vector<TableRef> peer_refs = {{RequestId(9), &moved}};
  EXPECT_TRUE(verify_block_ownership(home, home_refs).ok());
  EXPECT_TRUE(verify_block_ownership(peer, peer_refs).ok());
}

TEST(BlockOwnershipTest, DetectsLeakSharingAndUnallocated) {
  KvBlockAllocator a = make_allocator(2, 4);
  BlockTable t(4, 0, 1);
  ASSERT_TRUE(t.append_tokens(4, a).ok());
  std::vector<TableRef> refs = {{RequestId(1), &t}};
  ASSERT_TRUE(verify_block_ownership(a, refs).ok());

  auto leaked = a.allocate(1);
  ASSERT_TRUE(leaked.ok());
  Status s = verify_block_ownership(a, refs);
  EXPECT_EQ(s.code(), StatusCode::kInternal);
  EXPECT_NE(s.message().find("leaked"), std::string::npos) << s.message();
  a.free(*leaked);

  BlockTable copy(4, 0, 0);
  ASSERT_TRUE(copy.append_tokens(4, a).ok());
  copy.adopt_layer(0, t.layer_blocks(0));
  std::vector<TableRef> shared = {{RequestId(1), &t}, {RequestId(2), &copy}};
  s = verify_block_ownership(a, shared);
  EXPECT_NE(s.message().find("shared by request 1 layer 0 index 0 and request 2"), std::string::npos)
      << s.message();

  BlockTable ghost(4, 0, 0);
  ASSERT_TRUE(ghost.append_tokens(1, a).ok());
  ghost.adopt_layer(0, {BlockId(7)});
  std::vector<TableRef> bad = {{RequestId(1), &t}, {RequestId(3), &ghost}};
  s = verify_block_ownership(a, bad);
  EXPECT_NE(s.message().find("block 7 (request 3 layer 0 index 0) is not allocated"), std::string::npos)
      << s.message();
}

}  // namespace
}  // namespace kun::kv
