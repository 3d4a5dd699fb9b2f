#include "kv/block_table.h"

#include <algorithm>
#include <string>
#include <unordered_map>
#include <utility>

namespace kun::kv {

BlockTable::BlockTable(std::int64_t block_size_tokens, std::int64_t layer_begin, std::int64_t layer_end)
    : block_size_tokens_(block_size_tokens) {
  KUN_CHECK_GT(block_size_tokens, 0);
  KUN_CHECK(layer_begin >= 0 && layer_begin <= layer_end)
      << "bad layer range [" << layer_begin << ", " << layer_end << ")";
  layer_ids_.reserve(static_cast<std::size_t>(layer_end - layer_begin));
  for (std::int64_t l = layer_begin; l < layer_end; ++l) layer_ids_.push_back(l);
  blocks_.resize(layer_ids_.size());
}

std::int64_t BlockTable::find(std::int64_t layer) const {
  const auto it = std::lower_bound(layer_ids_.begin(), layer_ids_.end(), layer);
  if (it == layer_ids_.end() || *it != layer) return -1;
  return it - layer_ids_.begin();
}

void BlockTable::insert_layer(std::int64_t layer, std::vector<BlockId> blocks) {
  const auto it = std::lower_bound(layer_ids_.begin(), layer_ids_.end(), layer);
  const auto at = it - layer_ids_.begin();
  layer_ids_.insert(it, layer);
  blocks_.insert(blocks_.begin() + at, std::move(blocks));
}

void BlockTable::bind(const KvBlockAllocator& allocator) {
  if (allocator.counts_only() == counts_only_) return;
  KUN_CHECK(num_tokens_ == 0) << "a block table with " << num_tokens_ << " tokens changed allocator kind";
  counts_only_ = allocator.counts_only();
}

const std::vector<BlockId>& BlockTable::layer_blocks(std::int64_t layer) const {
  KUN_CHECK(!counts_only_) << "layer " << layer << ": a counts-only block table names no blocks";
  const std::int64_t i = find(layer);
  KUN_CHECK(i >= 0) << "block table does not hold layer " << layer;
  return blocks_[static_cast<std::size_t>(i)];
}

BlockId BlockTable::block_for_token(std::int64_t layer, std::int64_t position) const {
  KUN_CHECK(position >= 0 && position < num_tokens_)
      << "token " << position << " outside the " << num_tokens_ << " stored";
  return layer_blocks(layer)[static_cast<std::size_t>(position / block_size_tokens_)];
}

std::int64_t BlockTable::blocks_needed_to_append(std::int64_t tokens) const {
  KUN_CHECK_GE(tokens, 0);
  return (blocks_for_tokens(num_tokens_ + tokens) - blocks_per_layer()) * num_layers();
}

Status BlockTable::append_tokens(std::int64_t tokens, KvBlockAllocator& allocator) {
  if (tokens < 0) return invalid_argument("append_tokens: negative count " + std::to_string(tokens));
  bind(allocator);
  const std::int64_t per_layer = blocks_for_tokens(num_tokens_ + tokens) - blocks_per_layer();
  if (per_layer == 0) {  // inside the last block: a decode, 15 steps in 16
    num_tokens_ += tokens;
    return ok_status();
  }
  if (counts_only_) {
    KUN_RETURN_IF_ERROR(allocator.allocate_count(per_layer * num_layers()));
  } else if (per_layer > 0 && !layer_ids_.empty()) {
    KUN_ASSIGN_OR_RETURN(std::vector<BlockId> fresh, allocator.allocate(per_layer * num_layers()));
    std::size_t next = 0;
    for (auto& blocks : blocks_) {
      blocks.insert(blocks.end(), fresh.begin() + static_cast<std::ptrdiff_t>(next),
                    fresh.begin() + static_cast<std::ptrdiff_t>(next + static_cast<std::size_t>(per_layer)));
      next += static_cast<std::size_t>(per_layer);
    }
  }
  num_tokens_ += tokens;
  return ok_status();
}

void BlockTable::truncate(std::int64_t num_tokens, KvBlockAllocator& allocator) {
  KUN_CHECK(num_tokens >= 0 && num_tokens <= num_tokens_)
      << "truncate to " << num_tokens << " of " << num_tokens_ << " tokens";
  if (counts_only_) {
    KUN_CHECK(allocator.counts_only()) << "a counts-only block table freed to an allocator that names blocks";
    allocator.free_count((blocks_per_layer() - blocks_for_tokens(num_tokens)) * num_layers());
    num_tokens_ = num_tokens;
    return;
  }
  const auto keep = static_cast<std::size_t>(blocks_for_tokens(num_tokens));
  for (auto& blocks : blocks_) {
    if (blocks.size() <= keep) continue;
    allocator.free(std::span<const BlockId>(blocks).subspan(keep));
    blocks.resize(keep);
  }
  num_tokens_ = num_tokens;
}

void BlockTable::free_all(KvBlockAllocator& allocator) { truncate(0, allocator); }

std::vector<BlockId> BlockTable::release_layer(std::int64_t layer) {
  KUN_CHECK(!counts_only_) << "release of layer " << layer << ": a counts-only table hands over no ids (drop_layer)";
  const std::int64_t i = find(layer);
  KUN_CHECK(i >= 0) << "release of layer " << layer << " not held";
  std::vector<BlockId> blocks = std::move(blocks_[static_cast<std::size_t>(i)]);
  layer_ids_.erase(layer_ids_.begin() + i);
  blocks_.erase(blocks_.begin() + i);
  return blocks;
}

void BlockTable::drop_layer(std::int64_t layer, KvBlockAllocator& allocator) {
  if (!counts_only_) {
    allocator.free(release_layer(layer));
    return;
  }
  const std::int64_t i = find(layer);
  KUN_CHECK(i >= 0) << "drop of layer " << layer << " not held";
  allocator.free_count(blocks_per_layer());
  layer_ids_.erase(layer_ids_.begin() + i);
  blocks_.erase(blocks_.begin() + i);
}

Status BlockTable::add_layer(std::int64_t layer, KvBlockAllocator& allocator) {
  if (layer < 0 || holds_layer(layer)) {
    return invalid_argument("add_layer: layer " + std::to_string(layer) + " is invalid or already held");
  }
  bind(allocator);
  if (counts_only_) {
    KUN_RETURN_IF_ERROR(allocator.allocate_count(blocks_per_layer()));
    insert_layer(layer, {});
    return ok_status();
  }
  KUN_ASSIGN_OR_RETURN(std::vector<BlockId> blocks, allocator.allocate(blocks_per_layer()));
  insert_layer(layer, std::move(blocks));
  return ok_status();
}

void BlockTable::adopt_layer(std::int64_t layer, std::vector<BlockId> blocks) {
  KUN_CHECK(!counts_only_) << "adopt of named blocks into a counts-only table";
  KUN_CHECK(layer >= 0 && !holds_layer(layer)) << "adopt of layer " << layer << " already held";
  KUN_CHECK_EQ(static_cast<std::int64_t>(blocks.size()), blocks_per_layer()) << "blocks for layer " << layer;
  insert_layer(layer, std::move(blocks));
}

std::int64_t BlockTable::remap_blocks(std::span<const BlockMove> moves) {
  if (moves.empty() || counts_only_) return 0;
  std::unordered_map<std::int64_t, BlockId> to;
  to.reserve(moves.size());
  for (const BlockMove& m : moves) to.emplace(m.from.value, m.to);
  std::int64_t changed = 0;
  for (auto& blocks : blocks_) {
    for (BlockId& b : blocks) {
      auto it = to.find(b.value);
      if (it != to.end()) {
        b = it->second;
        ++changed;
      }
    }
  }
  return changed;
}

void BlockTable::for_each_block(const std::function<void(std::int64_t, std::int64_t, BlockId)>& fn) const {
  for (std::size_t k = 0; k < layer_ids_.size(); ++k) {
    const std::vector<BlockId>& blocks = blocks_[k];
    for (std::size_t i = 0; i < blocks.size(); ++i) fn(layer_ids_[k], static_cast<std::int64_t>(i), blocks[i]);
  }
}

Status BlockTable::verify() const {
  for (std::size_t k = 0; k < layer_ids_.size(); ++k) {
    const std::int64_t l = layer_ids_[k];
    const std::vector<BlockId>& blocks = blocks_[k];
    if (counts_only_) {
      if (!blocks.empty()) return internal_error("counts-only block table: layer " + std::to_string(l) + " names blocks");
      continue;
    }
    if (static_cast<std::int64_t>(blocks.size()) != blocks_per_layer()) {
      return internal_error("block table: layer " + std::to_string(l) + " has " + std::to_string(blocks.size()) +
                            " blocks for " + std::to_string(num_tokens_) + " tokens, wants " +
                            std::to_string(blocks_per_layer()));
    }
  }
  return ok_status();
}

}  // namespace kun::kv
