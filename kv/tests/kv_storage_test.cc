#include "kv/kv_storage.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>

#include "kv/block_allocator.h"

namespace kun::kv {
namespace {

const std::int64_t kOsPage = static_cast<std::int64_t>(::sysconf(_SC_PAGESIZE));

TEST(KvStorageTest, BlockAddressesFollowPagesAndLayoutF32) {
  auto arena_or = memory::DeviceArena::create(8 * kOsPage, kOsPage);
  ASSERT_TRUE(arena_or.ok());
  memory::DeviceArena& arena = **arena_or;
  const KvGeometry g{4, 2, 8, DType::kF32};  // 512-byte layer blocks
  KvStorage storage(arena, g);
  EXPECT_EQ(storage.blocks_per_page(), kOsPage / 512);
  auto pages = arena.add_kv_pages(2);
  ASSERT_TRUE(pages.ok());
  KvBlockAllocator alloc(storage.blocks_per_page());
  ASSERT_TRUE(alloc.add_pages(*pages).ok());
  auto blocks = alloc.allocate(3);
  ASSERT_TRUE(blocks.ok());
  const BlockId b = (*blocks)[2];
  std::byte* page = arena.page_data(alloc.page_of(b));
  EXPECT_EQ(storage.block_data(b), page + alloc.slot_of(b) * 512);
  EXPECT_EQ(storage.value_block(b), storage.block_data(b) + 256);
  // K row of head 1, slot 3 = [head][slot][dim] indexing, 4 bytes an element.
  EXPECT_EQ(storage.key_row(b, 1, 3), storage.key_block(b) + (1 * 4 + 3) * 8 * 4);
  EXPECT_EQ(storage.value_row(b, 0, 2), storage.value_block(b) + 2 * 8 * 4);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(storage.block_data(b)) % kKvBlockAlignBytes, 0u);

  // Copy, read, write.
  for (int i = 0; i < 128; ++i) {
    const float f = static_cast<float>(i) * 0.5f;
    std::memcpy(storage.key_block((*blocks)[0]) + i * 4, &f, 4);
  }
  storage.copy_block((*blocks)[0], (*blocks)[1]);
  EXPECT_EQ(std::memcmp(storage.block_data((*blocks)[0]), storage.block_data((*blocks)[1]), 512), 0);
  std::vector<std::byte> buf(512);
  storage.read_block((*blocks)[1], buf);
  storage.write_block((*blocks)[2], buf);
  EXPECT_FLOAT_EQ(storage.read_element(storage.value_block((*blocks)[2]), 0), 32.0f);  // float 64 of block = V[0]
}

TEST(KvStorageTest, Bf16BlocksAreHalfTheBytesAndRoundToNearestEven) {
  auto arena_or = memory::DeviceArena::create(8 * kOsPage, kOsPage);
  ASSERT_TRUE(arena_or.ok());
  memory::DeviceArena& arena = **arena_or;
  const KvGeometry g{4, 2, 8};  // bf16 by default: 256-byte layer blocks
  ASSERT_EQ(g.dtype, DType::kBF16);
  KvStorage storage(arena, g);
  EXPECT_EQ(storage.block_bytes(), 256);
  EXPECT_EQ(storage.blocks_per_page(), kOsPage / 256);
  auto pages = arena.add_kv_pages(1);
  ASSERT_TRUE(pages.ok());
  KvBlockAllocator alloc(storage.blocks_per_page());
  ASSERT_TRUE(alloc.add_pages(*pages).ok());
  auto blocks = alloc.allocate(2);
  ASSERT_TRUE(blocks.ok());
  const BlockId b = (*blocks)[1];
  EXPECT_EQ(storage.value_block(b), storage.block_data(b) + 128);
  EXPECT_EQ(storage.key_row(b, 1, 3), storage.key_block(b) + (1 * 4 + 3) * 8 * 2);
  // 1 + 2^-8 is a tie between two bf16 values: rounds to even (1.0); 1 + 3 * 2^-8 rounds up.
  std::byte* row = storage.value_row(b, 0, 1);
  storage.write_element(row, 0, 1.0f + 1.0f / 256);
  storage.write_element(row, 1, 1.0f + 3.0f / 256);
  storage.write_element(row, 7, -2.5f);
  EXPECT_EQ(storage.read_element(row, 0), 1.0f);
  EXPECT_EQ(storage.read_element(row, 1), 1.0f + 4.0f / 256);
  EXPECT_EQ(storage.read_element(row, 7), -2.5f);
  storage.copy_block(b, (*blocks)[0]);
  EXPECT_EQ(std::memcmp(storage.block_data(b), storage.block_data((*blocks)[0]), 256), 0);
}

TEST(KvStorageTest, DroppedLayerPagesBecomeBlocksWithoutCopy) {
  auto arena_or = memory::DeviceArena::create(8 * kOsPage, kOsPage);
  ASSERT_TRUE(arena_or.ok());
  memory::DeviceArena& arena = **arena_or;
  auto seg = arena.create_segment("layer.0", 2 * kOsPage);
  ASSERT_TRUE(seg.ok());
  std::memset(arena.segment_data(*seg), 0x5a, static_cast<std::size_t>(2 * kOsPage));
  KvStorage storage(arena, KvGeometry{4, 2, 8});
  KvBlockAllocator alloc(storage.blocks_per_page());
  auto dropped = arena.drop_segment(*seg);
  ASSERT_TRUE(dropped.ok());
  ASSERT_TRUE(alloc.add_pages(*dropped).ok());
  auto b = alloc.allocate(1);
  ASSERT_TRUE(b.ok());
  // The block sits on the former parameter page and still shows its bytes: no copy, no clear.
  EXPECT_EQ(alloc.page_of((*b)[0]), (*dropped)[0]);
  EXPECT_EQ(storage.block_data((*b)[0])[0], std::byte{0x5a});
}

TEST(KvStorageDeathTest, BlockOnNonKvPageAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto arena_or = memory::DeviceArena::create(4 * kOsPage, kOsPage);
  ASSERT_TRUE(arena_or.ok());
  KvStorage storage(**arena_or, KvGeometry{4, 2, 8});
  EXPECT_DEATH((void)storage.block_data(BlockId(0)), "not a KV page");
}

}  // namespace
}  // namespace kun::kv
