// KvManager: the engine's bookkeeping of KV blocks (which layer blocks each request holds on
// which device, and host swap slots). Pure bookkeeping over kv::KvBlockAllocator: no memory, no
// threads; the executor maps block ids to bytes. Owned by the engine thread.
//
// Placement: layer l's KV of a newly admitted request lives on device layer_device[l] (all on
// device 0 for an independent instance; device i holds layers [i*L/g, (i+1)*L/g) in a fused
// group). A request holds, for each layer, blocks covering `tokens_held(id)` tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "common/id_map.h"
#include "common/ids.h"
#include "common/status.h"
#include "engine/step.h"
#include "kv/block_allocator.h"
#include "kv/block_table.h"

namespace kun::engine {

class KvManager {
 public:
  // `devices[d]` is device d's allocator (not owned). `host_swap_blocks` is the number of layer
  // blocks the host swap space holds (0: no swap space).
  KvManager(std::int64_t block_size_tokens, std::vector<kv::KvBlockAllocator*> devices,
            std::vector<std::int32_t> layer_device, std::int64_t host_swap_blocks);

  std::int64_t block_size_tokens() const { return block_size_tokens_; }
  std::int64_t num_layers() const { return static_cast<std::int64_t>(layer_device_.size()); }
  std::int64_t token_blocks(std::int64_t tokens) const;
  // Layer blocks a request of `tokens` tokens needs in total (over all devices).
  std::int64_t layer_blocks_for(std::int64_t tokens) const { return token_blocks(tokens) * num_layers(); }

  std::int64_t tokens_held(RequestId id) const;  // 0 if none
  // A hint that the request is asked about soon: starts loading its record (a batch walks
  // thousands of requests whose records are cache misses; loading several at once overlaps them).
  void prefetch(RequestId id) const {
    if (const RequestKv* r = requests_.find(id)) __builtin_prefetch(r);
  }
  bool can_grow(RequestId id, std::int64_t new_tokens) const;
  // Extends the request's blocks to cover new_tokens on every layer; all or nothing
  // (kResourceExhausted when any device is short).
  Status grow(RequestId id, std::int64_t new_tokens);
  // grow() when can_grow(), in one lookup: false (nothing changes) when blocks are short.
  bool try_grow(RequestId id, std::int64_t new_tokens);
  // Frees every device block and host slot of the request.
  void release(RequestId id);
  std::vector<LayerBlockList> block_lists(RequestId id) const;
  // Fills a planned sequence's `kv` and `kv_kind` (step.h) for `mode`. kChanges sends the whole
  // table (kTable) the first time a request is planned and after any rewrite of its blocks
  // (swap-in, move_layer, remap_blocks, import), else only the blocks appended since its
  // previous plan (kAppended): each call assumes the executor applies every plan it is given.
  void describe_for_plan(RequestId id, PlanKv mode, ScheduledSequence* s);
  // Requests whose KV left this manager (release, export_tables) since the last call: the
  // executor forgets their tables (StepPlan::kv_released).
  std::vector<RequestId> take_released();
  // The layers the request holds on a device other than their placement device (the one whose
  // stage runs the layer; a restore home does not count), each with the device holding it and no
  // block ids, ascending by layer; empty on a one-device manager.
  std::vector<LayerBlockList> offsite_block_lists(RequestId id) const;

  // Moving a request's KV between managers without freeing it (KV exchange on drop): export
  // hands over its tables (device index -> table) and forgets the request; import adopts tables
  // whose blocks the caller allocated from this manager's devices and filled. The request must
  // not be swapped.
  std::map<std::int32_t, kv::BlockTable> export_tables(RequestId id);
  // Imported tables may hold a layer on a device other than the one this manager places it on
  // (a stale request keeps its KV where it was and is served by remote attention); each layer is
  // held exactly once and each placement device has a table (possibly holding no layers).
  void import_tables(RequestId id, std::int64_t tokens, std::map<std::int32_t, kv::BlockTable> tables);
  // Requests holding some layer away from where it belongs, in id order.
  std::vector<RequestId> requests_with_misplaced_layers() const;
  // Layers the request holds away from where they belong, ascending.
  std::vector<std::int64_t> misplaced_layers(RequestId id) const;
  // Reverse exchange before a group splits: every layer of the request now belongs on `device`
  // (it continues there after the split); misplaced_layers and move_layer follow it. -1 goes back
  // to the placement. The request must hold KV here.
  void set_home(RequestId id, std::int32_t device);
  std::int32_t home(RequestId id) const;  // -1: placement; also for an unknown request
  // Homes that spread a request over several devices (a shrink's live gather: a request continues
  // on a half of the group, each layer on the half's member whose new stage holds it): with
  // layouts set, home h means layer l belongs on layouts[h][l]; set_home then takes a layout
  // index. Empty (the default): home d means device d for every layer. Change them only while no
  // request has a home.
  void set_home_layouts(std::vector<std::vector<std::int32_t>> layouts);
  // Live KV exchange, one layer: allocates the layer's blocks on the device it belongs on, calls
  // copy(from_device, from_blocks, to_device, to_blocks) to move the bytes, then frees the source
  // blocks. kResourceExhausted (nothing changes) when the destination is short of blocks. With
  // counts-only allocators (kv::BlockNaming::kCountsOnly) both lists are empty: the layer's
  // blocks per layer are token_blocks(tokens_held(id)).
  using LayerCopyFn = std::function<void(std::int32_t, const std::vector<kv::BlockId>&, std::int32_t,
                                         const std::vector<kv::BlockId>&)>;
  Status move_layer(RequestId id, std::int64_t layer, const LayerCopyFn& copy);
  // As move_layer, for a copy that can fail (a transfer error): on its error the destination
  // blocks are freed, the layer stays where it was, and the error is returned.
  using FallibleLayerCopyFn = std::function<Status(std::int32_t, const std::vector<kv::BlockId>&, std::int32_t,
                                                   const std::vector<kv::BlockId>&)>;
  Status try_move_layer(RequestId id, std::int64_t layer, const FallibleLayerCopyFn& copy);

  // Repack inside device `device` (pages going back to parameters): rewrites every request's
  // blocks by `moves` (from -> to); returns how many it rewrote.
  std::int64_t remap_blocks(std::int32_t device, std::span<const kv::BlockMove> moves);

  // Swap: moves all of a request's device blocks to host slots, appending the copies to `out`.
  // False (nothing changes) when the host space is short.
  bool swap_out(RequestId id, std::vector<BlockCopy>* out);
  bool is_swapped(RequestId id) const;
  // Brings a swapped request back: allocates device blocks, appends host->device copies. False
  // (nothing changes) when device blocks are short. Host slots are freed at the next
  // begin_step() so a slot read this step is not overwritten by this step's swap-outs.
  bool swap_in(RequestId id, std::vector<BlockCopy>* out);
  bool can_swap_in(RequestId id) const;
  void begin_step();

  // Capacity figures in layer blocks (the unit a device allocates).
  std::int64_t total_blocks() const;
  std::int64_t free_blocks() const;
  std::int64_t used_blocks() const { return total_blocks() - free_blocks(); }
  std::int64_t host_free_slots() const;
  // Every request's blocks are distinct allocated blocks of the right device, and allocators
  // agree with the tables; aborts with context otherwise.
  void check_integrity() const;

 private:
  struct RequestKv {
    std::int64_t tokens = 0;
    bool swapped = false;
    std::int32_t home = -1;  // every layer belongs on this device; -1: on its placement device
    // Token blocks per layer the executor has been sent (describe_for_plan); -1: it must be
    // sent the whole table (never planned here, or blocks rewritten since).
    std::int64_t planned_blocks = -1;
    // Layers held on a device other than their placement device (an imported stale request
    // before its exchange, or one gathered onto a restore home). 0 for almost every request, and
    // then the per-layer walks (can_grow, offsite_block_lists, misplaced_layers) are skipped.
    std::int64_t offsite_layers = 0;
    // By device, ascending (a small vector: grow walks it for every request every step, which a
    // std::map made a pointer chase per device).
    std::vector<std::pair<std::int32_t, kv::BlockTable>> tables;
    // While swapped: host slots per (device, layer), in token order.
    std::map<std::pair<std::int32_t, std::int64_t>, std::vector<kv::BlockId>> host_slots;
  };
  RequestKv& entry(RequestId id);
  // requests_.find with a one-entry cache: the scheduler asks about the same request several
  // times in a row (try_grow, then describe_for_plan), and each hash lookup was a cache miss.
  // IdMap values stay where they are until erased (release, export).
  const RequestKv* lookup(RequestId id) const;
  RequestKv* lookup(RequestId id) { return const_cast<RequestKv*>(static_cast<const KvManager*>(this)->lookup(id)); }
  void forget_cached() const { cached_ = nullptr; }
  // Counts-only devices (the simulator): a request's tables may lag RequestKv::tokens inside
  // their last block (a decode that needs no new block touches only the RequestKv, not the g
  // tables); sync_tables brings them to RequestKv::tokens before they are read or handed out.
  void sync_tables(RequestKv& r);
  bool can_grow(const RequestKv* r, std::int64_t new_tokens) const;  // r: nullptr for a request holding nothing
  static kv::BlockTable* table_on(RequestKv& r, std::int32_t device);  // nullptr: none there
  static const kv::BlockTable* table_on(const RequestKv& r, std::int32_t device);
  std::int32_t wanted_device(const RequestKv& r, std::int64_t layer) const {
    if (r.home < 0) return layer_device_[static_cast<std::size_t>(layer)];
    return home_layouts_.empty() ? r.home : home_layouts_[static_cast<std::size_t>(r.home)][static_cast<std::size_t>(layer)];
  }

  std::int64_t block_size_tokens_;
  std::vector<kv::KvBlockAllocator*> devices_;
  std::vector<std::int32_t> layer_device_;
  std::vector<std::vector<std::int32_t>> home_layouts_;  // set_home_layouts; empty: a home is a device
  std::vector<std::int64_t> layers_per_device_;  // by device: layers placed there (can_grow)
  kv::KvBlockAllocator host_;  // host swap slots: bookkeeping only, the executor owns the bytes
  std::vector<kv::BlockId> host_pending_free_;
  std::vector<RequestId> released_;  // take_released()
  // Recount of RequestKv::offsite_layers after its tables changed shape (import, move_layer).
  void count_offsite(RequestKv& r) const;

  // Looked up several times per request per step (can_grow, grow, describe_for_plan): an IdMap
  // (common/id_map.h); walks that need an order sort the ids.
  IdMap<RequestId, RequestKv> requests_;
  mutable RequestId cached_id_;
  mutable const RequestKv* cached_ = nullptr;
  bool counts_only_ = false;  // every device allocator counts blocks (no ids): tables may lag
};

}  // namespace kun::engine
