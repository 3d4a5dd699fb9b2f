#include "kv/kv_storage.h"

#include <cstring>

namespace kun::kv {

KvStorage::KvStorage(memory::DeviceArena& arena, KvGeometry geometry)
    : arena_(&arena), geometry_(geometry), blocks_per_page_(geometry.blocks_per_page(arena.page_bytes())) {
  const Status s = geometry_.validate_for_page(arena.page_bytes());
  KUN_CHECK(s.ok()) << s.to_string();
}

std::byte* KvStorage::block_data(BlockId block) const {
  KUN_CHECK(block.valid()) << "invalid kv block id";
  const PageId page = page_of(block, blocks_per_page_);
  KUN_CHECK(page.value < arena_->num_pages()) << "kv block " << block << " is on page " << page
                                              << " outside the arena";
  KUN_CHECK(arena_->page_owner(page).kind == memory::PageOwnerKind::kKv)
      << "kv block " << block << " is on page " << page << " which is not a KV page";
  return arena_->page_data(page) + slot_of(block, blocks_per_page_) * geometry_.block_stride_bytes();
}

std::byte* KvStorage::key_row(BlockId block, std::int64_t kv_head, std::int64_t slot) const {
  KUN_CHECK(kv_head >= 0 && kv_head < geometry_.num_kv_heads && slot >= 0 && slot < geometry_.block_size_tokens)
      << "kv head " << kv_head << " slot " << slot;
  return key_block(block) + (kv_head * geometry_.block_size_tokens + slot) * geometry_.head_dim * geometry_.element_bytes();
}

std::byte* KvStorage::value_row(BlockId block, std::int64_t kv_head, std::int64_t slot) const {
  KUN_CHECK(kv_head >= 0 && kv_head < geometry_.num_kv_heads && slot >= 0 && slot < geometry_.block_size_tokens)
      << "kv head " << kv_head << " slot " << slot;
  return value_block(block) + (kv_head * geometry_.block_size_tokens + slot) * geometry_.head_dim * geometry_.element_bytes();
}

float KvStorage::read_element(const std::byte* row, std::int64_t i) const {
  KUN_CHECK(i >= 0 && i < geometry_.head_dim) << "element " << i << " of a row of " << geometry_.head_dim;
  float f = 0;
  convert_dtype(row + i * geometry_.element_bytes(), geometry_.dtype, &f, DType::kF32, 1);
  return f;
}

void KvStorage::write_element(std::byte* row, std::int64_t i, float value) const {
  KUN_CHECK(i >= 0 && i < geometry_.head_dim) << "element " << i << " of a row of " << geometry_.head_dim;
  convert_dtype(&value, DType::kF32, row + i * geometry_.element_bytes(), geometry_.dtype, 1);
}

void KvStorage::copy_block(BlockId from, BlockId to) const {
  if (from == to) return;
  std::memcpy(block_data(to), block_data(from), static_cast<std::size_t>(block_bytes()));
}

void KvStorage::copy_blocks(std::span<const BlockMove> moves) const {
  for (const BlockMove& m : moves) copy_block(m.from, m.to);
}

void KvStorage::read_block(BlockId block, std::span<std::byte> out) const {
  KUN_CHECK_EQ(static_cast<std::int64_t>(out.size()), block_bytes());
  std::memcpy(out.data(), block_data(block), out.size());
}

void KvStorage::write_block(BlockId block, std::span<const std::byte> in) const {
  KUN_CHECK_EQ(static_cast<std::int64_t>(in.size()), block_bytes());
  std::memcpy(block_data(block), in.data(), in.size());
}

}  // namespace kun::kv
