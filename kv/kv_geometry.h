// KV geometry and block ids shared by the allocator, block tables and storage.
//
// The unit of KV allocation is a *layer block*: one layer's K and V for block_size_tokens tokens,
//   [K: num_kv_heads][block_size_tokens][head_dim] elements, then [V: same],
// elements in `dtype` (bf16 by default, f32 as an option for numerics tests), which is how
// kernels::PagedKvCache reads it. A DESIGN.md "block" (block_size tokens x the layers
// resident on a device) is layers_resident layer blocks; after a fusion of degree g a device holds
// L/g layers, so the same bytes hold g times more token-blocks.
//
// Block ids are derived from page ids: block = page * blocks_per_page + slot, so they are stable
// for as long as the page stays in the KV pool and map to addresses without a table.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/ids.h"
#include "common/status.h"
#include "common/units.h"
#include "memory/device_arena.h"

namespace kun::kv {

struct BlockTag {};
using BlockId = Id<BlockTag>;  // a layer block
using memory::PageId;

// Layer blocks start on this alignment inside a page (cache line / AVX-512 vector).
inline constexpr std::int64_t kKvBlockAlignBytes = 64;

struct KvGeometry {
  std::int64_t block_size_tokens = 16;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
  // Element type of K and V: kBF16 (default; rounded to nearest even when appended) or kF32.
  DType dtype = DType::kBF16;

  // Bytes of one K (or V) element: 2 for bf16, 4 for f32.
  std::int64_t element_bytes() const { return dtype_bytes(dtype); }
  // Bytes of K and V of one token in one layer (2 * num_kv_heads * head_dim * element_bytes).
  std::int64_t bytes_per_token_per_layer() const { return 2 * num_kv_heads * head_dim * element_bytes(); }
  // Bytes of K (or V) of one layer block.
  std::int64_t half_block_bytes() const { return block_size_tokens * num_kv_heads * head_dim * element_bytes(); }
  // 2 * block_size * num_kv_heads * head_dim * element_bytes.
  std::int64_t layer_block_bytes() const { return 2 * half_block_bytes(); }
  // Offset of V inside a layer block.
  std::int64_t value_offset_bytes() const { return half_block_bytes(); }
  // Distance between consecutive layer blocks in a page (layer_block_bytes rounded up to 64).
  std::int64_t block_stride_bytes() const { return round_up(layer_block_bytes(), kKvBlockAlignBytes); }
  // Layer blocks one page holds (the remainder of the page is unused).
  std::int64_t blocks_per_page(std::int64_t page_bytes) const { return page_bytes / block_stride_bytes(); }
  // Layer blocks per layer for `tokens` tokens.
  std::int64_t blocks_for_tokens(std::int64_t tokens) const { return ceil_div(tokens, block_size_tokens); }

  // kInvalidArgument when a field is not positive or dtype is neither kBF16 nor kF32.
  Status validate() const;
  // Also checks that at least one layer block fits in a page.
  Status validate_for_page(std::int64_t page_bytes) const;
};

inline PageId page_of(BlockId block, std::int64_t blocks_per_page) { return PageId(block.value / blocks_per_page); }
inline std::int64_t slot_of(BlockId block, std::int64_t blocks_per_page) { return block.value % blocks_per_page; }
inline BlockId block_id(PageId page, std::int64_t slot, std::int64_t blocks_per_page) {
  return BlockId(page.value * blocks_per_page + slot);
}

// One step of a repack plan: copy `from`'s bytes to `to` and make every reference to `from` point
// at `to`; then free `from`.
struct BlockMove {
  BlockId from;
  BlockId to;
  friend bool operator==(const BlockMove&, const BlockMove&) = default;
};

}  // namespace kun::kv
