// BlockTable (a.k.a. SequenceKv): one request's KV on one device.
//
// It records how many tokens are stored and, for each layer the device holds for this request,
// the list of that layer's layer-block ids (token t of layer l lives in
// layer_blocks(l)[t / block_size] at slot t % block_size). It starts with a layer range
// [layer_begin, layer_end); layers can later leave one at a time (live KV exchange moves a stale
// request's layers to the devices that own them) or arrive (the receiving side).
//
// A table drawing from a counts-only allocator (BlockNaming::kCountsOnly, the simulator) keeps
// its layers and token count but no block ids: has_block_ids() is false, the allocator moves
// numbers, and whatever names blocks (layer_blocks, block_for_token, adopt_layer) aborts. Which
// kind a table is follows from the first allocator it draws from.
//
// Invariant (verify()): every held layer has exactly blocks_for_tokens(num_tokens) blocks (as ids,
// or counted).
// Appends are atomic over all held layers: either every layer gets its new blocks or nothing
// changes and the allocator's kResourceExhausted comes back.
//
// Threads: owned by the thread that owns the allocator it draws from (engine thread).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <vector>

#include "common/status.h"
#include "kv/block_allocator.h"
#include "kv/kv_geometry.h"

namespace kun::kv {

class BlockTable {
 public:
  BlockTable(std::int64_t block_size_tokens, std::int64_t layer_begin, std::int64_t layer_end);

  std::int64_t block_size_tokens() const { return block_size_tokens_; }
  std::int64_t num_tokens() const { return num_tokens_; }
  // Blocks each held layer has: ceil(num_tokens / block_size).
  std::int64_t blocks_per_layer() const { return blocks_for_tokens(num_tokens_); }
  std::int64_t blocks_for_tokens(std::int64_t tokens) const { return ceil_div(tokens, block_size_tokens_); }
  std::int64_t num_layers() const { return static_cast<std::int64_t>(layer_ids_.size()); }
  // Total layer blocks held (blocks_per_layer() * num_layers()).
  std::int64_t num_blocks() const { return blocks_per_layer() * num_layers(); }
  bool holds_layer(std::int64_t layer) const { return find(layer) >= 0; }
  // False when the table draws from a counts-only allocator (its blocks are counted, not named).
  bool has_block_ids() const { return !counts_only_; }
  // Held layers, ascending (a reference: the scheduler walks it for every planned sequence; it
  // changes when a layer is released, dropped, added or adopted).
  const std::vector<std::int64_t>& layers() const { return layer_ids_; }
  const std::vector<BlockId>& layer_blocks(std::int64_t layer) const;
  // The block and slot holding token `position` of `layer`.
  BlockId block_for_token(std::int64_t layer, std::int64_t position) const;
  std::int64_t slot_for_token(std::int64_t position) const { return position % block_size_tokens_; }

  // Additional layer blocks (over all held layers) appending `tokens` tokens would take.
  std::int64_t blocks_needed_to_append(std::int64_t tokens) const;
  // Appends `tokens` tokens, allocating blocks for every held layer at once (all or nothing).
  Status append_tokens(std::int64_t tokens, KvBlockAllocator& allocator);
  // Keeps the first `num_tokens` tokens and frees the blocks past them.
  void truncate(std::int64_t num_tokens, KvBlockAllocator& allocator);
  // Frees every block; the table keeps its layers and holds 0 tokens.
  void free_all(KvBlockAllocator& allocator);

  // Removes `layer` from the table WITHOUT freeing its blocks: the caller owns them (e.g. sends
  // them to a peer, then frees them). CHECKs the layer is held and the table names its blocks.
  std::vector<BlockId> release_layer(std::int64_t layer);
  // Removes `layer` and frees its blocks.
  void drop_layer(std::int64_t layer, KvBlockAllocator& allocator);
  // Adds a new layer with blocks_per_layer() freshly allocated blocks (the receiving side of an
  // exchange; the caller then fills them). kInvalidArgument if held, kResourceExhausted if short.
  Status add_layer(std::int64_t layer, KvBlockAllocator& allocator);
  // Adds a new layer with the given, already allocated blocks. CHECKs the count and that the
  // layer is not held.
  void adopt_layer(std::int64_t layer, std::vector<BlockId> blocks);

  // Rewrites references after a repack (every `from` becomes `to`). Returns how many entries
  // changed.
  std::int64_t remap_blocks(std::span<const BlockMove> moves);
  // Calls fn(layer, index, block) for every block.
  void for_each_block(const std::function<void(std::int64_t, std::int64_t, BlockId)>& fn) const;

  Status verify() const;

 private:
  // Index of `layer` in layer_ids_, -1 if not held.
  std::int64_t find(std::int64_t layer) const;
  // Inserts a layer (not held) with its blocks, keeping layer_ids_ ascending.
  void insert_layer(std::int64_t layer, std::vector<BlockId> blocks);
  // Fixes the table's kind by the allocator it draws from (CHECKs it never changes once blocks
  // exist).
  void bind(const KvBlockAllocator& allocator);

  std::int64_t block_size_tokens_;
  std::int64_t num_tokens_ = 0;
  bool counts_only_ = false;
  // Held layers ascending and their blocks, side by side (a std::map here cost a tree walk per
  // layer on every append, and the scheduler appends for every running request every step).
  std::vector<std::int64_t> layer_ids_;
  std::vector<std::vector<BlockId>> blocks_;
};

using SequenceKv = BlockTable;

}  // namespace kun::kv
