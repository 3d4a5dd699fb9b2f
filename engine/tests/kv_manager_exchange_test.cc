// KvManager with KV away from its placement (a stale request kept through a drop): import accepts
// layers held on any device, growth allocates where each layer lives, and move_layer brings one
// layer home (all or nothing). Pure bookkeeping over allocators with made-up pages.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <vector>

#include "engine/kv_manager.h"
#include "kv/block_allocator.h"

namespace kun::engine {
namespace {

constexpr std::int64_t kLayers = 4;
constexpr std::int64_t kBlockSize = 16;

struct Group {
  std::vector<std::unique_ptr<kv::KvBlockAllocator>> allocators;
  std::unique_ptr<KvManager> kv;
  // Two devices; layers 0-1 placed on device 0, layers 2-3 on device 1.
  explicit Group(std::int64_t pages_on_device1) {
    std::vector<kv::KvBlockAllocator*> devices;
    for (std::int64_t pages : {std::int64_t{8}, pages_on_device1}) {
      auto a = std::make_unique<kv::KvBlockAllocator>(4);
      std::vector<kv::PageId> ids;
      for (std::int64_t p = 0; p < pages; ++p) ids.emplace_back(p);
      KUN_CHECK_OK(a->add_pages(ids));
      devices.push_back(a.get());
      allocators.push_back(std::move(a));
    }
    kv = std::make_unique<KvManager>(kBlockSize, devices, std::vector<std::int32_t>{0, 0, 1, 1}, 0);
  }
  kv::KvBlockAllocator& device(int d) { return *allocators[static_cast<std::size_t>(d)]; }
};

// A request of `tokens` tokens whose KV is all on device 0 (it ran there before the drop).
std::map<std::int32_t, kv::BlockTable> stale_tables(Group& g, std::int64_t tokens) {
  std::map<std::int32_t, kv::BlockTable> tables;
  kv::BlockTable home(kBlockSize, 0, kLayers);
  KUN_CHECK_OK(home.append_tokens(tokens, g.device(0)));
  kv::BlockTable none(kBlockSize, 0, 0);
  KUN_CHECK_OK(none.append_tokens(tokens, g.device(1)));
  tables.emplace(0, std::move(home));
  tables.emplace(1, std::move(none));
  return tables;
}

TEST(KvManagerExchange, ImportGrowAndMoveLayersHome) {
  Group g(8);
  const RequestId id(1);
  g.kv->import_tables(id, 20, stale_tables(g, 20));  // 2 token-blocks x 4 layers, all on device 0
  EXPECT_EQ(g.kv->misplaced_layers(id), (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(g.kv->requests_with_misplaced_layers(), std::vector<RequestId>{id});
  EXPECT_EQ(g.device(0).num_used(), 8);
  EXPECT_EQ(g.device(1).num_used(), 0);
  // Growing past a block boundary allocates where each layer lives now: all on device 0.
  ASSERT_TRUE(g.kv->grow(id, 33).ok());
  EXPECT_EQ(g.device(0).num_used(), 12);
  g.kv->check_integrity();

  std::vector<std::pair<std::int32_t, std::int32_t>> copies;
  const auto copy = [&](std::int32_t from, const std::vector<kv::BlockId>& from_blocks, std::int32_t to,
                        const std::vector<kv::BlockId>& to_blocks) {
    EXPECT_EQ(from_blocks.size(), 3u);
    EXPECT_EQ(to_blocks.size(), 3u);
    EXPECT_TRUE(g.device(from).is_allocated(from_blocks[0]));
    EXPECT_TRUE(g.device(to).is_allocated(to_blocks[0]));
    copies.emplace_back(from, to);
  };
  ASSERT_TRUE(g.kv->move_layer(id, 2, copy).ok());
  EXPECT_EQ(g.kv->misplaced_layers(id), std::vector<std::int64_t>{3});
  EXPECT_EQ(g.device(0).num_used(), 9);
  EXPECT_EQ(g.device(1).num_used(), 3);
  ASSERT_TRUE(g.kv->move_layer(id, 3, copy).ok());
  EXPECT_TRUE(g.kv->misplaced_layers(id).empty());
  EXPECT_TRUE(g.kv->requests_with_misplaced_layers().empty());
  EXPECT_EQ(copies, (std::vector<std::pair<std::int32_t, std::int32_t>>{{0, 1}, {0, 1}}));
  // Where every layer lives now is what the executor is told.
  for (const LayerBlockList& list : g.kv->block_lists(id)) EXPECT_EQ(list.device, list.layer < 2 ? 0 : 1) << list.layer;
  g.kv->check_integrity();
  g.kv->release(id);
  EXPECT_EQ(g.device(0).num_used() + g.device(1).num_used(), 0);
}

// A copy that fails (a transfer error) changes nothing: the destination's blocks go back to its
// pool, the layer stays where it was, and a later move succeeds.
TEST(KvManagerExchange, FailedCopyLeavesTheLayerWhereItWas) {
  Group g(8);
  const RequestId id(3);
  g.kv->import_tables(id, 20, stale_tables(g, 20));
  const Status s = g.kv->try_move_layer(id, 2, [&](std::int32_t, const std::vector<kv::BlockId>&, std::int32_t to,
                                                   const std::vector<kv::BlockId>& to_blocks) {
    EXPECT_TRUE(g.device(to).is_allocated(to_blocks[0]));
    return unavailable("link down");
  });
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_EQ(g.kv->misplaced_layers(id), (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(g.device(0).num_used(), 8);
  EXPECT_EQ(g.device(1).num_used(), 0);
  g.kv->check_integrity();
  ASSERT_TRUE(g.kv->try_move_layer(id, 2, [](auto, const auto&, auto, const auto&) { return ok_status(); }).ok());
  EXPECT_EQ(g.kv->misplaced_layers(id), std::vector<std::int64_t>{3});
  EXPECT_EQ(g.device(1).num_used(), 2);
  g.kv->check_integrity();
}

TEST(KvManagerExchange, MoveToAFullDeviceChangesNothing) {
  Group g(1);  // device 1 holds 4 blocks
  const RequestId id(7);
  g.kv->import_tables(id, 40, stale_tables(g, 40));  // 3 token-blocks per layer
  ASSERT_TRUE(g.kv->move_layer(id, 2, [](auto, const auto&, auto, const auto&) {}).ok());
  EXPECT_EQ(g.device(1).num_free(), 1);
  bool copied = false;
  const Status s = g.kv->move_layer(id, 3, [&](auto, const auto&, auto, const auto&) { copied = true; });
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_FALSE(copied);
  EXPECT_EQ(g.kv->misplaced_layers(id), std::vector<std::int64_t>{3});
  EXPECT_EQ(g.device(1).num_free(), 1);
  g.kv->check_integrity();
}

// Reverse exchange before a split: once the request has a home, every layer held elsewhere is
// misplaced, move_layer gathers it there, and growth then allocates only on the home device.
TEST(KvManagerExchange, HomeGathersEveryLayerOntoOneDevice) {
  Group g(8);
  const RequestId id(4);
  ASSERT_TRUE(g.kv->grow(id, 20).ok());  // a request admitted in the group: layers 0-1 on 0, 2-3 on 1
  EXPECT_TRUE(g.kv->misplaced_layers(id).empty());
  EXPECT_EQ(g.kv->home(id), -1);
  g.kv->set_home(id, 1);
  EXPECT_EQ(g.kv->home(id), 1);
  EXPECT_EQ(g.kv->misplaced_layers(id), (std::vector<std::int64_t>{0, 1}));
  std::vector<std::pair<std::int32_t, std::int32_t>> copies;
  const auto copy = [&](std::int32_t from, const std::vector<kv::BlockId>&, std::int32_t to, const std::vector<kv::BlockId>&) {
    copies.emplace_back(from, to);
  };
  for (std::int64_t l : g.kv->misplaced_layers(id)) ASSERT_TRUE(g.kv->move_layer(id, l, copy).ok());
  EXPECT_EQ(copies, (std::vector<std::pair<std::int32_t, std::int32_t>>{{0, 1}, {0, 1}}));
  EXPECT_TRUE(g.kv->requests_with_misplaced_layers().empty());
  EXPECT_EQ(g.device(0).num_used(), 0);
  EXPECT_EQ(g.device(1).num_used(), 8);
  ASSERT_TRUE(g.kv->grow(id, 40).ok());  // a third token-block on each of the 4 layers, all on device 1
  EXPECT_EQ(g.device(0).num_used(), 0);
  EXPECT_EQ(g.device(1).num_used(), 12);
  for (const LayerBlockList& list : g.kv->block_lists(id)) EXPECT_EQ(list.device, 1) << list.layer;
  g.kv->check_integrity();
  // Back to the placement: layers 0-1 are misplaced again.
  g.kv->set_home(id, -1);
  EXPECT_EQ(g.kv->misplaced_layers(id), (std::vector<std::int64_t>{0, 1}));
}

// A shrink's live gather: with home layouts a home spreads the request over several devices
// (here layout 0 puts layers 0 and 2 on device 1, 1 and 3 on device 0) and misplaced_layers and
// move_layer follow the layout.
TEST(KvManagerExchange, HomeLayoutSpreadsLayersOverDevices) {
  Group g(8);
  const RequestId id(5);
  ASSERT_TRUE(g.kv->grow(id, 20).ok());  // layers 0-1 on device 0, 2-3 on device 1
  g.kv->set_home_layouts({{1, 0, 1, 0}, {0, 0, 1, 1}});
  g.kv->set_home(id, 0);
  EXPECT_EQ(g.kv->home(id), 0);
  EXPECT_EQ(g.kv->misplaced_layers(id), (std::vector<std::int64_t>{0, 3}));
  std::vector<std::pair<std::int32_t, std::int32_t>> copies;
  const auto copy = [&](std::int32_t from, const std::vector<kv::BlockId>&, std::int32_t to, const std::vector<kv::BlockId>&) {
    copies.emplace_back(from, to);
  };
  for (std::int64_t l : g.kv->misplaced_layers(id)) ASSERT_TRUE(g.kv->move_layer(id, l, copy).ok());
  EXPECT_EQ(copies, (std::vector<std::pair<std::int32_t, std::int32_t>>{{0, 1}, {1, 0}}));
  EXPECT_TRUE(g.kv->requests_with_misplaced_layers().empty());
  for (const LayerBlockList& list : g.kv->block_lists(id)) EXPECT_EQ(list.device, list.layer % 2 == 0 ? 1 : 0) << list.layer;
  g.kv->check_integrity();
  // Layout 1 is the placement: homed there, the layers the layout-0 gather moved are misplaced.
  g.kv->set_home(id, 1);
  EXPECT_EQ(g.kv->misplaced_layers(id), (std::vector<std::int64_t>{0, 3}));
  g.kv->set_home(id, -1);
  g.kv->set_home_layouts({});
  EXPECT_EQ(g.kv->misplaced_layers(id), (std::vector<std::int64_t>{0, 3}));  // away from the placement
}

TEST(KvManagerExchangeDeathTest, ChangingHomeLayoutsWhileARequestHasAHomeAborts) {
  Group g(8);
  ASSERT_TRUE(g.kv->grow(RequestId(6), 20).ok());
  g.kv->set_home_layouts({{1, 0, 1, 0}});
  g.kv->set_home(RequestId(6), 0);
  EXPECT_DEATH(g.kv->set_home_layouts({}), "has a home");
}

TEST(KvManagerExchangeDeathTest, ImportHoldingALayerTwiceAborts) {
  Group g(8);
  auto tables = stale_tables(g, 20);
  ASSERT_TRUE(tables.at(1).add_layer(2, g.device(1)).ok());  // layer 2 on both devices
  EXPECT_DEATH(g.kv->import_tables(RequestId(3), 20, std::move(tables)), "layer 2");
}

}  // namespace
}  // namespace kun::engine

namespace kun::engine {
namespace {

// Counts-only devices (the simulator): a decode inside the last block touches only the request's
// record, its tables lag behind; every read that hands tables out or checks them sees them
// caught up (export), block counts stay exact, and the next block is allocated on every device.
TEST(KvManagerCountsOnly, TablesLagInsideTheirLastBlockAndCatchUpWhenReadOut) {
  std::vector<std::unique_ptr<kv::KvBlockAllocator>> allocators;
  std::vector<kv::KvBlockAllocator*> devices;
  for (int d = 0; d < 2; ++d) {
    auto a = std::make_unique<kv::KvBlockAllocator>(4, kv::AllocationOrder::kDeterministic, 0, kv::BlockNaming::kCountsOnly);
    std::vector<kv::PageId> ids;
    for (std::int64_t p = 0; p < 8; ++p) ids.emplace_back(p);
    KUN_CHECK_OK(a->add_pages(ids));
    devices.push_back(a.get());
    allocators.push_back(std::move(a));
  }
  KvManager kv(kBlockSize, devices, std::vector<std::int32_t>{0, 0, 1, 1}, 0);
  const RequestId id(7);
  ASSERT_TRUE(kv.try_grow(id, 5));  // one token-block on each of the 4 layers
  EXPECT_EQ(allocators[0]->num_used(), 2);
  EXPECT_EQ(allocators[1]->num_used(), 2);
  for (std::int64_t t = 6; t <= kBlockSize; ++t) {
    ASSERT_TRUE(kv.try_grow(id, t));  // inside the block: nothing allocated
    kv.check_integrity();
  }
  EXPECT_EQ(kv.tokens_held(id), kBlockSize);
  EXPECT_EQ(allocators[0]->num_used(), 2);
  ASSERT_TRUE(kv.try_grow(id, kBlockSize + 3));  // the next block, on both devices
  EXPECT_EQ(allocators[0]->num_used(), 4);
  EXPECT_EQ(allocators[1]->num_used(), 4);
  ASSERT_TRUE(kv.try_grow(id, kBlockSize + 9));
  kv.check_integrity();
  const std::map<std::int32_t, kv::BlockTable> tables = kv.export_tables(id);
  ASSERT_EQ(tables.size(), 2u);
  for (const auto& [d, t] : tables) {
    EXPECT_EQ(t.num_tokens(), kBlockSize + 9) << "device " << d << ": an exported table must hold every token";
    EXPECT_EQ(t.num_blocks(), 4) << "device " << d;
  }
  EXPECT_EQ(kv.tokens_held(id), 0);
  // Imported back, it grows on from where it was.
  std::map<std::int32_t, kv::BlockTable> back(tables.begin(), tables.end());
  kv.import_tables(id, kBlockSize + 9, std::move(back));
  ASSERT_TRUE(kv.try_grow(id, 2 * kBlockSize));
  kv.check_integrity();
  kv.release(id);
  EXPECT_EQ(allocators[0]->num_used(), 0);
  EXPECT_EQ(allocators[1]->num_used(), 0);
}

}  // namespace
}  // namespace kun::engine
