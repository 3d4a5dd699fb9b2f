// Randomized property test over a real arena: parameter segments are created, dropped into the
// KV pool and restored (with repack), sequences append / truncate / free / exchange layers, and
// after every operation the arena's page accounting, the block ownership and every byte of KV and
// parameter contents are checked.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <random>

#include "kv/block_allocator.h"
#include "kv/block_table.h"
#include "kv/integrity.h"
#include "kv/kv_storage.h"
#include "memory/device_arena.h"

namespace kun::kv {
namespace {

const std::int64_t kOsPage = static_cast<std::int64_t>(::sysconf(_SC_PAGESIZE));
constexpr std::int64_t kNumLayers = 4;

struct Params {
  AllocationOrder order;
  std::uint64_t seed;
};

class KvPropertyTest : public ::testing::TestWithParam<Params> {};

float key_tag(std::int64_t req, std::int64_t layer, std::int64_t token) {
  return static_cast<float>(req * 10007 + layer * 101 + token);
}

std::byte seg_byte(std::uint32_t seed, std::int64_t i) {
  return static_cast<std::byte>((seed * 17u + static_cast<std::uint32_t>(i) * 13u) & 0xffu);
}

TEST_P(KvPropertyTest, RandomOpsKeepEveryInvariant) {
  const Params params = GetParam();
  std::mt19937_64 rng(params.seed);
  auto arena_or = memory::DeviceArena::create(40 * kOsPage, kOsPage);
  ASSERT_TRUE(arena_or.ok());
  memory::DeviceArena& arena = **arena_or;
  const KvGeometry geometry{4, 2, 8};  // bf16 (the default): 256-byte layer blocks
  KvStorage storage(arena, geometry);
  KvBlockAllocator alloc(storage.blocks_per_page(), params.order, params.seed);
  const std::int64_t bs = geometry.block_size_tokens;

  // Segments: the model's layers plus embedding, with contents we can recognise.
  std::map<std::int64_t, std::uint32_t> seg_seed;  // resident segment -> fill seed
  std::uint32_t next_seed = 1;
  auto fill_segment = [&](memory::SegmentId s) {
    std::byte* d = arena.segment_data(s);
    for (std::int64_t i = 0; i < arena.segment_bytes(s); ++i) d[i] = seg_byte(next_seed, i);
    seg_seed[s.value] = next_seed++;
  };
  for (int i = 0; i < 7; ++i) {
    auto s = arena.create_segment("seg." + std::to_string(i), 1 + static_cast<std::int64_t>(rng() % (3 * kOsPage)));
    ASSERT_TRUE(s.ok());
    fill_segment(*s);
  }
  {
    auto kv = arena.add_kv_pages(6);
    ASSERT_TRUE(kv.ok());
    ASSERT_TRUE(alloc.add_pages(*kv).ok());
  }

  std::map<std::int64_t, BlockTable> seqs;
  std::int64_t next_req = 0;
  auto write_token = [&](std::int64_t req, const BlockTable& t, std::int64_t layer, std::int64_t pos) {
    const BlockId b = t.block_for_token(layer, pos);
    const std::int64_t slot = t.slot_for_token(pos);
    // The tag's f32 bytes at the start of the row (dtype-agnostic: a bf16 row of 8 is 16 bytes).
    const float k = key_tag(req, layer, pos), v = -key_tag(req, layer, pos);
    std::memcpy(storage.key_row(b, 0, slot), &k, sizeof k);
    std::memcpy(storage.value_row(b, 1, slot) + geometry.head_dim * geometry.element_bytes() - sizeof v, &v, sizeof v);
  };
  auto write_tokens = [&](std::int64_t req, const BlockTable& t, std::int64_t from) {
    for (std::int64_t l : t.layers()) {
      for (std::int64_t p = from; p < t.num_tokens(); ++p) write_token(req, t, l, p);
    }
  };

  auto check_all = [&](int op) {
    const Status a = arena.verify_integrity();
    ASSERT_TRUE(a.ok()) << "op " << op << ": " << a.to_string();
    std::vector<TableRef> refs;
    for (const auto& [r, t] : seqs) refs.push_back({RequestId(r), &t});
    const Status o = verify_block_ownership(alloc, refs);
    ASSERT_TRUE(o.ok()) << "op " << op << ": " << o.to_string();
    // Every KV page of the arena is in the block pool and vice versa.
    std::vector<PageId> pool = alloc.pages();
    std::sort(pool.begin(), pool.end());
    ASSERT_EQ(pool, arena.kv_pages()) << "op " << op;
    for (const auto& [r, t] : seqs) {
      for (std::int64_t l : t.layers()) {
        for (std::int64_t p = 0; p < t.num_tokens(); ++p) {
          const BlockId b = t.block_for_token(l, p);
          const std::int64_t slot = t.slot_for_token(p);
          // Plain comparisons in the hot loop; an assertion only on a mismatch.
          float k = 0, v = 0;
          std::memcpy(&k, storage.key_row(b, 0, slot), sizeof k);
          std::memcpy(&v, storage.value_row(b, 1, slot) + geometry.head_dim * geometry.element_bytes() - sizeof v, sizeof v);
          if (k != key_tag(r, l, p) || v != -key_tag(r, l, p)) {
            FAIL() << "op " << op << ": KV of request " << r << " layer " << l << " token " << p << " lost";
          }
        }
      }
    }
    for (const auto& [sid, seed] : seg_seed) {
      const memory::SegmentId s(sid);
      const std::byte* d = arena.segment_data(s);
      const std::int64_t n = arena.segment_bytes(s);
      for (std::int64_t i = 0; i < n; i += 61) {
        if (d[i] != seg_byte(seed, i)) FAIL() << "op " << op << ": segment " << sid << " byte " << i << " changed";
      }
      ASSERT_EQ(d[n - 1], seg_byte(seed, n - 1));
    }
  };

  // Runs reclaim to completion (executing repack plans) or returns its error.
  auto reclaim = [&](std::int64_t n) -> StatusOr<std::vector<PageId>> {
    for (int round = 0; round < 2; ++round) {
      KUN_ASSIGN_OR_RETURN(ReclaimResult r, alloc.reclaim_pages(n));
      if (r.moves.empty()) return r.pages;
      EXPECT_EQ(round, 0) << "a repack plan must empty the pages in one round";
      storage.copy_blocks(r.moves);
      std::int64_t changed = 0;
      for (auto& [req, t] : seqs) changed += t.remap_blocks(r.moves);
      EXPECT_EQ(changed, static_cast<std::int64_t>(r.moves.size()));
      for (const BlockMove& m : r.moves) alloc.free(m.from);
    }
    return internal_error("reclaim did not converge");
  };

  int reclaims_with_repack = 0;
  int exhausted = 0;
  for (int op = 0; op < 2500; ++op) {
    const int kind = static_cast<int>(rng() % 10);
    auto pick_seq = [&]() -> std::map<std::int64_t, BlockTable>::iterator {
      if (seqs.empty()) return seqs.end();
      auto it = seqs.begin();
      std::advance(it, static_cast<std::ptrdiff_t>(rng() % seqs.size()));
      return it;
    };
    if (kind <= 1) {  // new sequence over a random layer range
      const auto l0 = static_cast<std::int64_t>(rng() % kNumLayers);
      const auto l1 = l0 + 1 + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(kNumLayers - l0));
      BlockTable t(bs, l0, l1);
      const auto tokens = 1 + static_cast<std::int64_t>(rng() % 12);
      const std::int64_t used = alloc.num_used();
      const Status s = t.append_tokens(tokens, alloc);
      if (s.ok()) {
        const std::int64_t req = next_req++;
        write_tokens(req, t, 0);
        seqs.emplace(req, std::move(t));
      } else {
        ASSERT_EQ(s.code(), StatusCode::kResourceExhausted);
        ASSERT_EQ(alloc.num_used(), used);
        ASSERT_EQ(t.num_tokens(), 0);
        ++exhausted;
      }
    } else if (kind == 2) {  // decode / prefill chunk
      auto it = pick_seq();
      if (it == seqs.end()) continue;
      const std::int64_t before = it->second.num_tokens();
      const std::int64_t blocks_before = it->second.num_blocks();
      const auto tokens = 1 + static_cast<std::int64_t>(rng() % 6);
      const Status s = it->second.append_tokens(tokens, alloc);
      if (s.ok()) {
        write_tokens(it->first, it->second, before);
      } else {
        ASSERT_EQ(s.code(), StatusCode::kResourceExhausted);
        ASSERT_EQ(it->second.num_tokens(), before);
        ASSERT_EQ(it->second.num_blocks(), blocks_before);
        ++exhausted;
      }
    } else if (kind == 3) {  // finish
      auto it = pick_seq();
      if (it == seqs.end()) continue;
      it->second.free_all(alloc);
      seqs.erase(it);
    } else if (kind == 4) {  // truncate
      auto it = pick_seq();
      if (it == seqs.end()) continue;
      it->second.truncate(static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(it->second.num_tokens() + 1)), alloc);
    } else if (kind == 5) {  // drop a layer's parameters into the KV pool
      std::vector<memory::SegmentId> resident;
      for (memory::SegmentId s : arena.segments()) {
        if (!arena.segment_dropped(s)) resident.push_back(s);
      }
      if (resident.empty()) continue;
      const memory::SegmentId s = resident[rng() % resident.size()];
      auto pages = arena.drop_segment(s);
      ASSERT_TRUE(pages.ok());
      ASSERT_TRUE(alloc.add_pages(*pages).ok());
      seg_seed.erase(s.value);
    } else if (kind == 6) {  // restore a dropped segment: reclaim (with repack), remap, pull weights
      std::vector<memory::SegmentId> dropped;
      for (memory::SegmentId s : arena.segments()) {
        if (arena.segment_dropped(s)) dropped.push_back(s);
      }
      if (dropped.empty()) continue;
      const memory::SegmentId s = dropped[rng() % dropped.size()];
      const std::int64_t n = arena.segment_num_pages(s);
      const std::int64_t moves_possible = alloc.num_empty_pages() < n ? 1 : 0;
      auto pages = reclaim(n);
      if (!pages.ok()) {
        ASSERT_EQ(pages.status().code(), StatusCode::kResourceExhausted) << pages.status().to_string();
        ++exhausted;
        continue;
      }
      reclaims_with_repack += static_cast<int>(moves_possible);
      ASSERT_EQ(static_cast<std::int64_t>(pages->size()), n);
      ASSERT_TRUE(arena.restore_segment(s, *pages).ok());
      fill_segment(s);
    } else if (kind == 7) {  // grow the pool from free pages
      auto pages = arena.add_kv_pages(1 + static_cast<std::int64_t>(rng() % 2));
      if (pages.ok()) {
        ASSERT_TRUE(alloc.add_pages(*pages).ok());
      }
    } else if (kind == 8) {  // shrink the pool back to free pages
      auto pages = reclaim(1);
      if (pages.ok()) {
        ASSERT_TRUE(arena.release_kv_pages(*pages).ok());
      }
    } else {  // live KV exchange: a layer leaves, or a layer arrives
      auto it = pick_seq();
      if (it == seqs.end()) continue;
      BlockTable& t = it->second;
      if (rng() % 2 == 0 && t.num_layers() > 0) {
        const std::vector<std::int64_t> ls = t.layers();
        alloc.free(t.release_layer(ls[rng() % ls.size()]));
      } else {
        const auto l = static_cast<std::int64_t>(rng() % kNumLayers);
        if (t.holds_layer(l)) continue;
        const Status s = t.add_layer(l, alloc);
        if (s.ok()) {
          for (std::int64_t p = 0; p < t.num_tokens(); ++p) write_token(it->first, t, l, p);
        } else {
          ASSERT_EQ(s.code(), StatusCode::kResourceExhausted);
          ASSERT_FALSE(t.holds_layer(l));
        }
      }
    }
    check_all(op);
    if (HasFatalFailure()) return;
  }
  // The run must have exercised the interesting paths.
  EXPECT_GT(reclaims_with_repack, 0);
  EXPECT_GT(exhausted, 0);
  // Drain: everything frees, all segments restore, pages balance.
  for (auto& [r, t] : seqs) t.free_all(alloc);
  seqs.clear();
  for (memory::SegmentId s : arena.segments()) {
    if (!arena.segment_dropped(s)) continue;
    const std::int64_t n = arena.segment_num_pages(s);
    if (alloc.num_pages() < n) {
      auto more = arena.add_kv_pages(n - alloc.num_pages());
      ASSERT_TRUE(more.ok()) << more.status().to_string();
      ASSERT_TRUE(alloc.add_pages(*more).ok());
    }
    auto pages = reclaim(n);
    ASSERT_TRUE(pages.ok()) << pages.status().to_string();
    ASSERT_TRUE(arena.restore_segment(s, *pages).ok());
    fill_segment(s);
  }
  EXPECT_EQ(alloc.num_used(), 0);
  check_all(-1);
}

INSTANTIATE_TEST_SUITE_P(Orders, KvPropertyTest,
                         ::testing::Values(Params{AllocationOrder::kDeterministic, 1},
                                           Params{AllocationOrder::kDeterministic, 2},
                                           Params{AllocationOrder::kShuffled, 3},
                                           Params{AllocationOrder::kShuffled, 4}),
                         [](const ::testing::TestParamInfo<Params>& param_info) {
                           const Params& p = param_info.param;
                           return std::string(p.order == AllocationOrder::kShuffled ? "Shuffled" : "Deterministic") +
                                  std::to_string(p.seed);
                         });

}  // namespace
}  // namespace kun::kv
