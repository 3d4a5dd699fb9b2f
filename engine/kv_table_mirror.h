// KvTableMirror: an executor's copy of each request's block table, kept up to date from the
// plans it runs (StepPlan::kv_released, ScheduledSequence::kv_kind / kv). The scheduler sends a
// request's whole table once (kTable) and then only appended blocks (kAppended), so an executor
// that keeps this mirror does per-step work in the number of new blocks, not in layers x context.
//
// A mirror covers a layer range [layer_begin, layer_end) (a pipeline stage keeps only its own
// layers) and stores, per request and layer, the device holding the layer's KV and one `Block`
// per layer block: the block id itself (Block = std::int64_t) or whatever the executor derives
// from it once (a pointer into the holder's arena), through `to_block(device, block_id)`.
//
// Every plan must be applied, in the order the scheduler made them for each request (a plan
// skipped leaves the mirror short of blocks; a kAppended for a request the mirror never saw, or
// on a layer it holds elsewhere, aborts with context).
//
// Threads: owned by whoever applies the plans (one pipeline stage's thread, or the engine thread).
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "common/check.h"
#include "common/ids.h"
#include "engine/step.h"

namespace kun::engine {

template <typename Block>
class KvTableMirror {
 public:
  struct Layer {
    std::int32_t device = -1;  // -1: not held (only before a table arrives)
    std::vector<Block> blocks;
  };

  KvTableMirror(std::int64_t layer_begin, std::int64_t layer_end) : layer_begin_(layer_begin), layer_end_(layer_end) {
    KUN_CHECK(layer_begin >= 0 && layer_begin < layer_end) << "layer range [" << layer_begin << ", " << layer_end << ")";
  }

  // Applies a plan's table changes: forgets released requests, then replaces or extends the
  // tables of its sequences. `to_block(std::int32_t device, std::int64_t block_id) -> Block`.
  template <typename ToBlock>
  void apply(const StepPlan& plan, ToBlock&& to_block) {
    for (RequestId id : plan.kv_released) tables_.erase(id);
    for (const ScheduledSequence& s : plan.sequences) {
      KUN_CHECK(s.kv_kind != KvListKind::kOffsite) << "request " << s.id << ": a block table mirror needs block ids";
      std::vector<Layer>* table = nullptr;
      if (s.kv_kind == KvListKind::kTable) {
        table = &reset_table(s.id);
      } else {
        auto it = tables_.find(s.id);
        KUN_CHECK(it != tables_.end()) << "request " << s.id << ": blocks appended to a table this executor never got";
        table = &it->second;
      }
      for (const LayerBlockList& list : s.kv) {
        if (list.layer < layer_begin_ || list.layer >= layer_end_) continue;
        Layer& l = (*table)[static_cast<std::size_t>(list.layer - layer_begin_)];
        if (s.kv_kind == KvListKind::kTable) {
          KUN_CHECK_EQ(l.device, -1) << "request " << s.id << " lists layer " << list.layer << " twice";
          l.device = list.device;
        } else {
          KUN_CHECK_EQ(l.device, list.device) << "request " << s.id << " layer " << list.layer << ": appended on another device";
        }
        l.blocks.reserve(l.blocks.size() + list.blocks.size());
        for (std::int64_t b : list.blocks) l.blocks.push_back(to_block(list.device, b));
      }
      if (s.kv_kind != KvListKind::kTable) continue;
      for (std::size_t i = 0; i < table->size(); ++i) {  // a request holds every layer somewhere
        KUN_CHECK_GE((*table)[i].device, 0) << "request " << s.id << ": table without layer " << layer_begin_ + static_cast<std::int64_t>(i);
      }
    }
  }

  // The request's layer, or nullptr when the mirror has no table for the request or the layer
  // is outside the range or not held.
  const Layer* find(RequestId id, std::int64_t layer) const {
    if (layer < layer_begin_ || layer >= layer_end_) return nullptr;
    auto it = tables_.find(id);
    if (it == tables_.end()) return nullptr;
    const Layer& l = it->second[static_cast<std::size_t>(layer - layer_begin_)];
    return l.device < 0 ? nullptr : &l;
  }
  // All layers of the range for a request (index layer - layer_begin), or nullptr.
  const std::vector<Layer>* table(RequestId id) const {
    auto it = tables_.find(id);
    return it == tables_.end() ? nullptr : &it->second;
  }
  // Primitives for an executor that gets the same changes in another form than a StepPlan (a
  // device agent decoding stage messages, runtime/stage_message.h); it checks them itself.
  void release(RequestId id) { tables_.erase(id); }
  void clear() { tables_.clear(); }
  // The request's table with every layer unheld and empty, to be filled (a kTable change).
  std::vector<Layer>& reset_table(RequestId id) {
    std::vector<Layer>& table = tables_[id];
    table.resize(static_cast<std::size_t>(layer_end_ - layer_begin_));
    for (Layer& l : table) {
      l.device = -1;
      l.blocks.clear();
    }
    return table;
  }
  // The request's table to extend (a kAppended change), or nullptr when the mirror has none.
  std::vector<Layer>* mutable_table(RequestId id) {
    auto it = tables_.find(id);
    return it == tables_.end() ? nullptr : &it->second;
  }
  // fn(RequestId, const std::vector<Layer>&) for every table, in no particular order.
  template <typename Fn>
  void for_each(Fn&& fn) const {
    for (const auto& [id, table] : tables_) fn(id, table);
  }

  std::int64_t layer_begin() const { return layer_begin_; }
  std::int64_t layer_end() const { return layer_end_; }
  std::size_t num_requests() const { return tables_.size(); }

 private:
  std::int64_t layer_begin_;
  std::int64_t layer_end_;
  std::unordered_map<RequestId, std::vector<Layer>> tables_;
};

}  // namespace kun::engine
