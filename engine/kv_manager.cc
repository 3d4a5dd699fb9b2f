#include "engine/kv_manager.h"

#include <algorithm>
#include <string>

#include "common/check.h"
#include "common/units.h"
#include "kv/integrity.h"

namespace kun::engine {

KvManager::KvManager(std::int64_t block_size_tokens, std::vector<kv::KvBlockAllocator*> devices,
                     std::vector<std::int32_t> layer_device, std::int64_t host_swap_blocks)
    : block_size_tokens_(block_size_tokens),
      devices_(std::move(devices)),
      layer_device_(std::move(layer_device)),
      host_(/*blocks_per_page=*/1) {
  KUN_CHECK_GT(block_size_tokens_, 0);
  KUN_CHECK(!devices_.empty() && !layer_device_.empty());
  for (std::int32_t d : layer_device_) {
    KUN_CHECK(d >= 0 && d < static_cast<std::int32_t>(devices_.size())) << "layer placed on device " << d;
  }
  counts_only_ = std::all_of(devices_.begin(), devices_.end(), [](const kv::KvBlockAllocator* a) { return a->counts_only(); });
  layers_per_device_.assign(devices_.size(), 0);
  for (std::int32_t d : layer_device_) ++layers_per_device_[static_cast<std::size_t>(d)];
  std::vector<kv::PageId> slots;
  for (std::int64_t i = 0; i < host_swap_blocks; ++i) slots.push_back(kv::PageId(i));
  KUN_CHECK_OK(host_.add_pages(slots));
}

std::int64_t KvManager::token_blocks(std::int64_t tokens) const { return ceil_div(tokens, block_size_tokens_); }

const KvManager::RequestKv* KvManager::lookup(RequestId id) const {
  if (cached_ != nullptr && cached_id_ == id) return cached_;
  const RequestKv* r = requests_.find(id);
  if (r == nullptr) return nullptr;
  cached_id_ = id;
  cached_ = r;
  return cached_;
}

void KvManager::sync_tables(RequestKv& r) {
  if (r.swapped) return;  // tables hold nothing while swapped
  for (auto& [d, table] : r.tables) {
    if (table.num_tokens() == r.tokens) continue;
    KUN_CHECK(counts_only_ && table.blocks_for_tokens(table.num_tokens()) == token_blocks(r.tokens))
        << "table on device " << d << " holds " << table.num_tokens() << " tokens, the request " << r.tokens;
    KUN_CHECK_OK(table.append_tokens(r.tokens - table.num_tokens(), *devices_[static_cast<std::size_t>(d)]));  // no new block
  }
}

KvManager::RequestKv& KvManager::entry(RequestId id) {
  if (RequestKv* found = lookup(id)) return *found;
  RequestKv r;
  // One table per device over the contiguous layer range placed on it.
  for (std::int32_t d = 0; d < static_cast<std::int32_t>(devices_.size()); ++d) {
    std::int64_t begin = -1, end = -1;
    for (std::int64_t l = 0; l < num_layers(); ++l) {
      if (layer_device_[static_cast<std::size_t>(l)] != d) continue;
      if (begin < 0) begin = l;
      KUN_CHECK(end < 0 || end == l) << "layers of device " << d << " are not contiguous";
      end = l + 1;
    }
    if (begin >= 0) r.tables.emplace_back(d, kv::BlockTable(block_size_tokens_, begin, end));
  }
  return *requests_.emplace(id, std::move(r)).first;
}

kv::BlockTable* KvManager::table_on(RequestKv& r, std::int32_t device) {
  for (auto& [d, table] : r.tables) {
    if (d == device) return &table;
  }
  return nullptr;
}

const kv::BlockTable* KvManager::table_on(const RequestKv& r, std::int32_t device) {
  for (const auto& [d, table] : r.tables) {
    if (d == device) return &table;
  }
  return nullptr;
}

std::int64_t KvManager::tokens_held(RequestId id) const {
  const RequestKv* r = lookup(id);
  return r == nullptr || r->swapped ? 0 : r->tokens;
}

bool KvManager::can_grow(RequestId id, std::int64_t new_tokens) const { return can_grow(lookup(id), new_tokens); }

bool KvManager::can_grow(const RequestKv* r, std::int64_t new_tokens) const {
  const std::int64_t have = r == nullptr ? 0 : r->tokens;
  if (r != nullptr && r->swapped) return false;
  if (new_tokens <= have) return true;
  const std::int64_t add_blocks = token_blocks(new_tokens) - token_blocks(have);
  if (add_blocks == 0) return true;  // a decode inside its last block (15 steps in 16)
  // Called for every running request every step: no allocation. Each device appears once in
  // `tables` and in layers_per_device_.
  if (r == nullptr || r->offsite_layers == 0) {
    for (std::size_t d = 0; d < devices_.size(); ++d) {
      if (devices_[d]->num_free() < add_blocks * layers_per_device_[d]) return false;
    }
    return true;
  }
  // An imported request may hold layers away from their placement (remote attention).
  for (const auto& [d, table] : r->tables) {
    if (devices_[static_cast<std::size_t>(d)]->num_free() < add_blocks * table.num_layers()) return false;
  }
  return true;
}

Status KvManager::grow(RequestId id, std::int64_t new_tokens) {
  if (!try_grow(id, new_tokens)) {
    return resource_exhausted("not enough free KV blocks to hold " + std::to_string(new_tokens) +
                              " tokens of request " + std::to_string(id.value));
  }
  return ok_status();
}

bool KvManager::try_grow(RequestId id, std::int64_t new_tokens) {
  RequestKv* found = lookup(id);  // one lookup: this runs for every running request every step
  if (!can_grow(found, new_tokens)) return false;
  RequestKv& r = found == nullptr ? entry(id) : *found;
  if (new_tokens <= r.tokens) return true;
  if (counts_only_ && token_blocks(new_tokens) == token_blocks(r.tokens)) {
    r.tokens = new_tokens;  // inside the last block: the tables catch up when read (sync_tables)
    return true;
  }
  for (auto& [d, table] : r.tables) {
    // can_grow checked every device, so this cannot fail part-way. A counts-only table may lag
    // inside its last block, so each appends from its own count.
    KUN_CHECK_OK(table.append_tokens(new_tokens - table.num_tokens(), *devices_[static_cast<std::size_t>(d)]));
  }
  r.tokens = new_tokens;
  return true;
}

void KvManager::release(RequestId id) {
  RequestKv* r = lookup(id);
  if (r == nullptr) return;
  for (auto& [d, table] : r->tables) table.free_all(*devices_[static_cast<std::size_t>(d)]);
  for (auto& [key, slots] : r->host_slots) host_.free(slots);
  forget_cached();
  requests_.erase(id);
  released_.push_back(id);
}

std::vector<RequestId> KvManager::take_released() {
  std::vector<RequestId> out;
  out.swap(released_);
  return out;
}

void KvManager::describe_for_plan(RequestId id, PlanKv mode, ScheduledSequence* s) {
  s->kv.clear();
  if (mode == PlanKv::kOffsiteOnly) {
    s->kv_kind = KvListKind::kOffsite;
    s->kv = offsite_block_lists(id);
    return;
  }
  RequestKv* found = lookup(id);
  KUN_CHECK(found != nullptr && !found->swapped) << "request " << id << " planned without KV here";
  RequestKv& r = *found;
  const std::int64_t have = token_blocks(r.tokens);
  const bool whole = mode == PlanKv::kFullTables || r.planned_blocks < 0;
  KUN_CHECK(whole || r.planned_blocks <= have) << "request " << id << " lost blocks without a rewrite";
  s->kv_kind = whole ? KvListKind::kTable : KvListKind::kAppended;
  const std::int64_t from = whole ? 0 : r.planned_blocks;
  r.planned_blocks = have;
  if (from == have && !whole) return;  // decode inside a block: nothing new
  for (const auto& [d, table] : r.tables) {
    for (std::int64_t l : table.layers()) {
      const std::vector<kv::BlockId>& blocks = table.layer_blocks(l);
      LayerBlockList list;
      list.layer = static_cast<std::int32_t>(l);
      list.device = d;
      list.blocks.reserve(static_cast<std::size_t>(have - from));
      for (std::int64_t i = from; i < have; ++i) list.blocks.push_back(blocks[static_cast<std::size_t>(i)].value);
      s->kv.push_back(std::move(list));
    }
  }
}

std::vector<LayerBlockList> KvManager::block_lists(RequestId id) const {
  std::vector<LayerBlockList> out;
  const RequestKv* r = lookup(id);
  if (r == nullptr) return out;
  for (const auto& [d, table] : r->tables) {
    for (std::int64_t l : table.layers()) {
      LayerBlockList list;
      list.layer = static_cast<std::int32_t>(l);
      list.device = d;
      if (table.has_block_ids()) {
        for (kv::BlockId b : table.layer_blocks(l)) list.blocks.push_back(b.value);
      }
      out.push_back(std::move(list));
    }
  }
  return out;
}

std::vector<LayerBlockList> KvManager::offsite_block_lists(RequestId id) const {
  std::vector<LayerBlockList> out;
  if (devices_.size() == 1) return out;  // every layer is on the only device
  const RequestKv* r = lookup(id);
  if (r == nullptr || r->swapped || r->offsite_layers == 0) return out;
  for (const auto& [d, table] : r->tables) {
    for (std::int64_t l : table.layers()) {
      if (layer_device_[static_cast<std::size_t>(l)] == d) continue;
      LayerBlockList list;
      list.layer = static_cast<std::int32_t>(l);
      list.device = d;
      out.push_back(std::move(list));
    }
  }
  std::sort(out.begin(), out.end(), [](const LayerBlockList& a, const LayerBlockList& b) { return a.layer < b.layer; });
  return out;
}

std::map<std::int32_t, kv::BlockTable> KvManager::export_tables(RequestId id) {
  RequestKv* r = lookup(id);
  KUN_CHECK(r != nullptr) << "request " << id << " holds no KV here";
  KUN_CHECK(!r->swapped) << "request " << id << " is swapped out";
  sync_tables(*r);
  std::map<std::int32_t, kv::BlockTable> tables;
  for (auto& [d, table] : r->tables) tables.emplace(d, std::move(table));
  forget_cached();
  requests_.erase(id);
  released_.push_back(id);
  return tables;
}

void KvManager::import_tables(RequestId id, std::int64_t tokens, std::map<std::int32_t, kv::BlockTable> tables) {
  KUN_CHECK(requests_.count(id) == 0) << "request " << id << " already holds KV here";
  // Every layer held exactly once, on any device (away from its placement: remote attention
  // until move_layer brings it home); every placement device has a table, maybe with no layers.
  for (std::int64_t l = 0; l < num_layers(); ++l) {
    int holders = 0;
    for (const auto& [d, table] : tables) holders += table.holds_layer(l) ? 1 : 0;
    KUN_CHECK_EQ(holders, 1) << "imported request " << id << " layer " << l;
  }
  for (const auto& [d, table] : tables) {
    KUN_CHECK(d >= 0 && d < static_cast<std::int32_t>(devices_.size())) << "device " << d;
    KUN_CHECK_EQ(table.num_tokens(), tokens) << "request " << id << " device " << d;
    for (std::int64_t l : table.layers()) KUN_CHECK(l < num_layers()) << "request " << id << " layer " << l;
  }
  for (std::int32_t d : layer_device_) {
    KUN_CHECK(tables.count(d) != 0) << "imported request " << id << " has no table on device " << d;
  }
  RequestKv r;
  r.tokens = tokens;
  for (auto& [d, table] : tables) r.tables.emplace_back(d, std::move(table));  // ascending: a map's order
  count_offsite(r);
  requests_.emplace(id, std::move(r));
}

void KvManager::count_offsite(RequestKv& r) const {
  r.offsite_layers = 0;
  for (const auto& [d, table] : r.tables) {
    for (std::int64_t l : table.layers()) r.offsite_layers += layer_device_[static_cast<std::size_t>(l)] != d ? 1 : 0;
  }
}

std::vector<RequestId> KvManager::requests_with_misplaced_layers() const {
  std::vector<RequestId> out;
  for (const auto& [id, r] : requests_) {
    if (r.home < 0 && r.offsite_layers == 0) continue;
    if (!misplaced_layers(id).empty()) out.push_back(id);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::int64_t> KvManager::misplaced_layers(RequestId id) const {
  std::vector<std::int64_t> out;
  const RequestKv* r = lookup(id);
  if (r == nullptr || r->swapped) return out;
  if (r->home < 0 && r->offsite_layers == 0) return out;  // every layer at its placement
  for (const auto& [d, table] : r->tables) {
    for (std::int64_t l : table.layers()) {
      if (wanted_device(*r, l) != d) out.push_back(l);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

void KvManager::set_home(RequestId id, std::int32_t device) {
  RequestKv* r = lookup(id);
  KUN_CHECK(r != nullptr) << "request " << id << " holds no KV here";
  if (!home_layouts_.empty()) {
    KUN_CHECK(device >= -1 && device < static_cast<std::int32_t>(home_layouts_.size())) << "request " << id << " home layout " << device;
    if (device >= 0) {
      for (std::int32_t d : home_layouts_[static_cast<std::size_t>(device)]) {
        KUN_CHECK(table_on(*r, d) != nullptr) << "request " << id << " has no table on device " << d;
      }
    }
    r->home = device;
    return;
  }
  KUN_CHECK(device >= -1 && device < static_cast<std::int32_t>(devices_.size())) << "request " << id << " home " << device;
  KUN_CHECK(device < 0 || table_on(*r, device) != nullptr) << "request " << id << " has no table on device " << device;
  r->home = device;
}

void KvManager::set_home_layouts(std::vector<std::vector<std::int32_t>> layouts) {
  for (const auto& [id, r] : requests_) KUN_CHECK_EQ(r.home, -1) << "request " << id << " has a home while the layouts change";
  for (const auto& layout : layouts) {
    KUN_CHECK_EQ(static_cast<std::int64_t>(layout.size()), num_layers());
    for (std::int32_t d : layout) KUN_CHECK(d >= 0 && d < static_cast<std::int32_t>(devices_.size())) << "home layout device " << d;
  }
  home_layouts_ = std::move(layouts);
}

std::int32_t KvManager::home(RequestId id) const {
  const RequestKv* r = lookup(id);
  return r == nullptr ? -1 : r->home;
}

Status KvManager::move_layer(RequestId id, std::int64_t layer, const LayerCopyFn& copy) {
  return try_move_layer(id, layer,
                        [&](std::int32_t from, const std::vector<kv::BlockId>& from_blocks, std::int32_t to,
                            const std::vector<kv::BlockId>& to_blocks) {
                          copy(from, from_blocks, to, to_blocks);
                          return ok_status();
                        });
}

Status KvManager::try_move_layer(RequestId id, std::int64_t layer, const FallibleLayerCopyFn& copy) {
  RequestKv* found = lookup(id);
  KUN_CHECK(found != nullptr && !found->swapped) << "request " << id << " holds no KV to move";
  RequestKv& r = *found;
  KUN_CHECK(layer >= 0 && layer < num_layers()) << "layer " << layer;
  const std::int32_t to = wanted_device(r, layer);
  std::int32_t from = -1;
  for (const auto& [d, table] : r.tables) {
    if (table.holds_layer(layer)) from = d;
  }
  KUN_CHECK_GE(from, 0) << "request " << id << " does not hold layer " << layer;
  if (from == to) return ok_status();
  kv::BlockTable* dst_table = table_on(r, to);
  kv::BlockTable* src_table = table_on(r, from);
  KUN_CHECK(dst_table != nullptr && src_table != nullptr) << "request " << id << " has no table on device " << to;
  kv::BlockTable& dst = *dst_table;
  KUN_RETURN_IF_ERROR(dst.add_layer(layer, *devices_[static_cast<std::size_t>(to)]));
  kv::BlockTable& src = *src_table;
  const Status copied = src.has_block_ids() ? copy(from, src.layer_blocks(layer), to, dst.layer_blocks(layer))
                                            : copy(from, {}, to, {});  // counts-only allocators: no ids to copy between
  if (!copied.ok()) {
    dst.drop_layer(layer, *devices_[static_cast<std::size_t>(to)]);  // the layer stays on `from`
    return copied;
  }
  src.drop_layer(layer, *devices_[static_cast<std::size_t>(from)]);
  count_offsite(r);
  r.planned_blocks = -1;  // the layer changed device and blocks: send the whole table next
  return ok_status();
}

std::int64_t KvManager::remap_blocks(std::int32_t device, std::span<const kv::BlockMove> moves) {
  std::int64_t remapped = 0;
  for (const auto& [id, r] : requests_) {
    kv::BlockTable* t = table_on(r, device);
    if (t == nullptr) continue;
    const std::int64_t n = t->remap_blocks(moves);
    if (n > 0) r.planned_blocks = -1;  // block ids rewritten: send the whole table next
    remapped += n;
  }
  return remapped;
}

bool KvManager::swap_out(RequestId id, std::vector<BlockCopy>* out) {
  RequestKv* found = lookup(id);
  if (found == nullptr || found->swapped) return false;
  RequestKv& r = *found;
  std::int64_t needed = 0;
  for (const auto& [d, table] : r.tables) needed += table.num_blocks();
  if (host_.num_free() < needed) return false;
  for (auto& [d, table] : r.tables) {
    for (std::int64_t l : table.layers()) {
      auto slots = host_.allocate(table.blocks_per_layer());
      KUN_CHECK(slots.ok()) << slots.status().to_string();
      for (std::size_t i = 0; i < slots->size(); ++i) {
        // A counts-only table names no device block: the copy says only that one happens.
        const std::int64_t src = table.has_block_ids() ? table.layer_blocks(l)[i].value : -1;
        out->push_back(BlockCopy{d, src, (*slots)[i].value});
      }
      r.host_slots[{d, l}] = std::move(slots).value();
    }
    table.free_all(*devices_[static_cast<std::size_t>(d)]);
  }
  r.swapped = true;
  r.planned_blocks = -1;  // swap-in allocates new blocks: send the whole table next
  return true;
}

bool KvManager::is_swapped(RequestId id) const {
  const RequestKv* r = lookup(id);
  return r != nullptr && r->swapped;
}

bool KvManager::can_swap_in(RequestId id) const {
  const RequestKv* r = lookup(id);
  if (r == nullptr || !r->swapped) return false;
  for (const auto& [d, table] : r->tables) {
    if (devices_[static_cast<std::size_t>(d)]->num_free() < table.blocks_needed_to_append(r->tokens)) return false;
  }
  return true;
}

bool KvManager::swap_in(RequestId id, std::vector<BlockCopy>* out) {
  if (!can_swap_in(id)) return false;
  RequestKv& r = *lookup(id);
  for (auto& [d, table] : r.tables) {
    KUN_CHECK_OK(table.append_tokens(r.tokens, *devices_[static_cast<std::size_t>(d)]));
    for (std::int64_t l : table.layers()) {
      auto& slots = r.host_slots.at({d, l});
      KUN_CHECK_EQ(static_cast<std::int64_t>(slots.size()), table.blocks_per_layer());
      for (std::size_t i = 0; i < slots.size(); ++i) {
        const std::int64_t dst = table.has_block_ids() ? table.layer_blocks(l)[i].value : -1;
        out->push_back(BlockCopy{d, slots[i].value, dst});
      }
      host_pending_free_.insert(host_pending_free_.end(), slots.begin(), slots.end());
    }
  }
  r.host_slots.clear();
  r.swapped = false;
  return true;
}

void KvManager::begin_step() {
  if (!host_pending_free_.empty()) {
    host_.free(host_pending_free_);
    host_pending_free_.clear();
  }
}

std::int64_t KvManager::total_blocks() const {
  std::int64_t n = 0;
  for (auto* a : devices_) n += a->num_total();
  return n;
}

std::int64_t KvManager::free_blocks() const {
  std::int64_t n = 0;
  for (auto* a : devices_) n += a->num_free();
  return n;
}

std::int64_t KvManager::host_free_slots() const { return host_.num_free(); }

void KvManager::check_integrity() const {
  for (std::int32_t d = 0; d < static_cast<std::int32_t>(devices_.size()); ++d) {
    std::vector<kv::TableRef> refs;
    for (const auto& [id, r] : requests_) {
      const kv::BlockTable* t = table_on(r, d);
      if (t == nullptr) continue;
      if (!r.swapped && !counts_only_) KUN_CHECK_EQ(t->num_tokens(), r.tokens) << "request " << id << " device " << d;
      // Counts-only tables may lag inside their last block (try_grow), never by a block.
      if (!r.swapped && counts_only_) {
        KUN_CHECK_EQ(t->blocks_per_layer(), token_blocks(r.tokens)) << "request " << id << " device " << d;
      }
      refs.push_back(kv::TableRef{id, t});
    }
    const kv::KvBlockAllocator& alloc = *devices_[static_cast<std::size_t>(d)];
    if (alloc.counts_only()) {  // no ids to own: the tables' counts must add up to the allocator's
      KUN_CHECK_OK(alloc.verify());
      std::int64_t held = 0;
      for (const kv::TableRef& ref : refs) {
        KUN_CHECK_OK(ref.table->verify());
        held += ref.table->num_blocks();
      }
      KUN_CHECK_EQ(held, alloc.num_used()) << "device " << d << ": KV blocks held by requests against the allocator's count";
      continue;
    }
    Status s = kv::verify_block_ownership(alloc, refs);
    KUN_CHECK(s.ok()) << "device " << d << ": " << s.to_string();
  }
  std::vector<kv::BlockId> host_held(host_pending_free_.begin(), host_pending_free_.end());
  for (const auto& [id, r] : requests_) {
    for (const auto& [key, slots] : r.host_slots) host_held.insert(host_held.end(), slots.begin(), slots.end());
  }
  KUN_CHECK_EQ(static_cast<std::int64_t>(host_held.size()), host_.num_used()) << "host swap slots leaked";
}

}  // namespace kun::engine
