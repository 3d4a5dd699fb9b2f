// KvStorage: the bridge from block ids to bytes in a DeviceArena's KV pages.
//
// Block b lives in page page_of(b) at offset slot_of(b) * geometry.block_stride_bytes(); inside
// it K is [num_kv_heads][block_size][head_dim] elements of geometry.dtype (bf16 or f32) and V
// follows at value_offset_bytes() (the layout kernels::PagedKvCache reads). Copies (swap,
// exchange, repack) move whole layer blocks of block_bytes() (half as many for bf16 as for f32).
//
// Threads: used on the thread that owns the arena (the device executor); kernels may read the
// block pointers from worker threads during a step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "kv/kv_geometry.h"
#include "memory/device_arena.h"

namespace kun::kv {

class KvStorage {
 public:
  // CHECKs geometry.validate_for_page(arena.page_bytes()). The arena must outlive the storage.
  KvStorage(memory::DeviceArena& arena, KvGeometry geometry);

  const KvGeometry& geometry() const { return geometry_; }
  std::int64_t blocks_per_page() const { return blocks_per_page_; }
  std::int64_t block_bytes() const { return geometry_.layer_block_bytes(); }

  // Start of a layer block; CHECKs that its page is a KV page of the arena.
  std::byte* block_data(BlockId block) const;
  std::byte* key_block(BlockId block) const { return block_data(block); }
  std::byte* value_block(BlockId block) const { return block_data(block) + geometry_.value_offset_bytes(); }
  // K (or V) row of one kv head and one token slot: head_dim elements of geometry().dtype
  // (head_dim * element_bytes() bytes).
  std::byte* key_row(BlockId block, std::int64_t kv_head, std::int64_t slot) const;
  std::byte* value_row(BlockId block, std::int64_t kv_head, std::int64_t slot) const;
  // Element i of a row as f32 (widened exactly from bf16), and the store of `value` into it
  // (rounded to nearest even for bf16): for tests and integrity checks, not the hot path.
  float read_element(const std::byte* row, std::int64_t i) const;
  void write_element(std::byte* row, std::int64_t i, float value) const;

  void copy_block(BlockId from, BlockId to) const;
  // Executes a repack plan's copies (the caller still rewrites tables and frees the sources).
  void copy_blocks(std::span<const BlockMove> moves) const;
  // out/in must be block_bytes() long.
  void read_block(BlockId block, std::span<std::byte> out) const;
  void write_block(BlockId block, std::span<const std::byte> in) const;

 private:
  memory::DeviceArena* arena_;
  KvGeometry geometry_;
  std::int64_t blocks_per_page_;
};

}  // namespace kun::kv
