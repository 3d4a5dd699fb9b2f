#include "runtime/stage_message.h"

#include <cstring>

#include "common/check.h"
#include "runtime/wire_format.h"

namespace kun::runtime {
namespace {
using wire::put;
using wire::put_ids;
using wire::Reader;

template <class T>
void put_vec(std::vector<std::byte>& out, const std::vector<T>& v) {
  static_assert(std::is_trivially_copyable_v<T>);
  put(out, static_cast<std::int64_t>(v.size()));
  const std::size_t at = out.size();
  out.resize(at + v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(out.data() + at, v.data(), v.size() * sizeof(T));
}

template <class T>
bool get_vec(Reader& r, std::span<const std::byte> bytes, std::vector<T>* v) {
  std::int64_t n = 0;
  if (!r.get(&n) || n < 0 || static_cast<std::uint64_t>(n) > bytes.size() / sizeof(T)) return false;
  v->resize(static_cast<std::size_t>(n));
  return r.get_bytes(v->data(), v->size() * sizeof(T));
}
}  // namespace

std::int64_t StageRequest::num_tokens() const {
  std::int64_t n = 0;
  for (const StageSequence& s : sequences) n += s.num_tokens;
  return n;
}

namespace {

// Appends one table update for `id` with the layers of [layer_begin, layer_end) that `lists`
// names (`replace`: all of them), holders translated from stage index to endpoint.
template <typename Lists, typename Blocks>
void add_update(StageRequest& r, std::int64_t id, bool replace, const Lists& lists, std::span<const StageSpec> stages,
                Blocks&& blocks_of) {
  StageTableUpdate u;
  u.request_id = id;
  u.replace = replace ? 1 : 0;
  for (const auto& list : lists) {
    const std::int64_t layer = list.layer;
    if (layer < r.layer_begin || layer >= r.layer_end) continue;
    const auto& blocks = blocks_of(list);
    if (!replace && blocks.empty()) continue;
    KUN_CHECK(list.device >= 0 && static_cast<std::size_t>(list.device) < stages.size())
        << "request " << id << " layer " << layer << " KV on device " << list.device << " of a " << stages.size()
        << "-stage pipeline";
    const int holder = stages[static_cast<std::size_t>(list.device)].endpoint;
    r.lists.push_back(StageLayerList{static_cast<std::int32_t>(layer), static_cast<std::int32_t>(holder),
                                     static_cast<std::int64_t>(blocks.size())});
    r.blocks.insert(r.blocks.end(), blocks.begin(), blocks.end());
    ++u.num_lists;
  }
  if (replace || u.num_lists > 0) r.updates.push_back(u);
}

}  // namespace

std::vector<std::byte> encode_stage_request(const engine::StepPlan& plan, const StageKvTables& tables, std::size_t stage,
                                            std::span<const StageSpec> stages, int reply_endpoint, std::uint64_t executor,
                                            bool resync) {
  KUN_CHECK(stage < stages.size()) << "stage " << stage << " of " << stages.size();
  const StageSpec& me = stages[stage];
  StageRequest r;
  r.executor = executor;
  r.reset_tables = resync ? 1 : 0;
  r.layer_begin = me.layer_begin;
  r.layer_end = me.layer_end;
  r.first = stage == 0 ? 1 : 0;
  r.last = stage + 1 == stages.size() ? 1 : 0;
  r.prev_endpoint = stage > 0 ? stages[stage - 1].endpoint : -1;
  r.next_endpoint = r.last ? -1 : stages[stage + 1].endpoint;
  r.reply_endpoint = reply_endpoint;
  KUN_CHECK(tables.layer_begin() <= me.layer_begin && me.layer_end <= tables.layer_end())
      << "stage layers [" << me.layer_begin << ", " << me.layer_end << ") outside the tables' [" << tables.layer_begin()
      << ", " << tables.layer_end() << ")";
  for (const engine::ScheduledSequence& seq : plan.sequences) {
    r.sequences.push_back(StageSequence{seq.id.value, seq.start_pos, static_cast<std::int64_t>(seq.tokens.size()),
                                        static_cast<std::uint8_t>(seq.sample ? 1 : 0), seq.sampling, seq.sample_index});
    if (r.first) r.tokens.insert(r.tokens.end(), seq.tokens.begin(), seq.tokens.end());
    KUN_CHECK(tables.table(seq.id) != nullptr) << "request " << seq.id << " planned without a KV table";
  }
  struct TableList {  // a mirror layer seen as a plan's list
    std::int64_t layer;
    std::int32_t device;
    const std::vector<std::int64_t>* blocks;
  };
  if (resync) {
    std::vector<TableList> lists;
    tables.for_each([&](RequestId id, const std::vector<StageKvTables::Layer>& table) {
      lists.clear();
      for (std::size_t i = 0; i < table.size(); ++i) {
        lists.push_back(TableList{tables.layer_begin() + static_cast<std::int64_t>(i), table[i].device, &table[i].blocks});
      }
      add_update(r, id.value, true, lists, stages, [](const TableList& l) -> const std::vector<std::int64_t>& { return *l.blocks; });
    });
  } else {
    for (RequestId id : plan.kv_released) r.released.push_back(id.value);
    for (const engine::ScheduledSequence& seq : plan.sequences) {
      KUN_CHECK(seq.kv_kind != engine::KvListKind::kOffsite) << "request " << seq.id << ": a stage needs block ids";
      add_update(r, seq.id.value, seq.kv_kind == engine::KvListKind::kTable, seq.kv, stages,
                 [](const engine::LayerBlockList& l) -> const std::vector<std::int64_t>& { return l.blocks; });
    }
  }
  for (const auto* copies : {&plan.swap_out, &plan.swap_in}) {
    for (const engine::BlockCopy& c : *copies) {
      KUN_CHECK(c.device >= 0 && static_cast<std::size_t>(c.device) < stages.size()) << "swap on device " << c.device;
      if (static_cast<std::size_t>(c.device) != stage) continue;
      (copies == &plan.swap_out ? r.swap_out : r.swap_in).push_back(SwapCopy{c.src, c.dst});
    }
  }
  std::vector<std::byte> out;
  put(out, r.executor);
  put(out, r.reset_tables);
  put(out, r.layer_begin);
  put(out, r.layer_end);
  put(out, r.first);
  put(out, r.last);
  put(out, r.prev_endpoint);
  put(out, r.next_endpoint);
  put(out, r.reply_endpoint);
  put_vec(out, r.sequences);
  put_vec(out, r.tokens);
  put_ids(out, r.released);
  put_vec(out, r.updates);
  put_vec(out, r.lists);
  put_ids(out, r.blocks);
  put_vec(out, r.swap_out);
  put_vec(out, r.swap_in);
  return out;
}

StatusOr<StageRequest> decode_stage_request(std::span<const std::byte> bytes) {
  Reader r(bytes);
  StageRequest s;
  const bool ok = r.get(&s.executor) && r.get(&s.reset_tables) && r.get(&s.layer_begin) && r.get(&s.layer_end) &&
                  r.get(&s.first) && r.get(&s.last) && r.get(&s.prev_endpoint) && r.get(&s.next_endpoint) &&
                  r.get(&s.reply_endpoint) && get_vec(r, bytes, &s.sequences) && get_vec(r, bytes, &s.tokens) &&
                  r.get_ids(&s.released) && get_vec(r, bytes, &s.updates) && get_vec(r, bytes, &s.lists) &&
                  r.get_ids(&s.blocks) && get_vec(r, bytes, &s.swap_out) && get_vec(r, bytes, &s.swap_in) && r.at_end();
  if (!ok) return data_loss("malformed stage request (" + std::to_string(bytes.size()) + " bytes)");
  if (s.layer_begin < 0 || s.layer_end <= s.layer_begin) return data_loss("stage request: bad layer range");
  std::uint64_t lists = 0;
  for (const StageTableUpdate& u : s.updates) {
    if (u.num_lists < 0) return data_loss("stage request: negative list count");
    lists += static_cast<std::uint64_t>(u.num_lists);
  }
  if (lists != s.lists.size()) return data_loss("stage request: table updates name " + std::to_string(lists) + " lists, " +
                                                std::to_string(s.lists.size()) + " sent");
  std::uint64_t blocks = 0;
  for (const StageLayerList& l : s.lists) {
    if (l.layer < s.layer_begin || l.layer >= s.layer_end || l.holder < 0 || l.num_blocks < 0) {
      return data_loss("stage request: a block list outside the stage's layers or without a holder");
    }
    blocks += static_cast<std::uint64_t>(l.num_blocks);
  }
  if (blocks != s.blocks.size()) return data_loss("stage request: block lists do not add up to the blocks sent");
  std::int64_t n = 0;
  for (const StageSequence& q : s.sequences) {
    if (q.num_tokens < 0 || q.start_pos < 0) return data_loss("stage request: negative slice");
    n += q.num_tokens;
  }
  if (s.first && static_cast<std::int64_t>(s.tokens.size()) != n) return data_loss("stage request: token count differs from the slices");
  return s;
}

std::vector<std::byte> encode_stage_output(const StageTrailer& t, std::span<const std::byte> body) {
  std::vector<std::byte> out;
  out.reserve(16 + t.stage_times_ns.size() * 8 + body.size());
  put_ids(out, t.stage_times_ns);
  out.insert(out.end(), body.begin(), body.end());
  return out;
}

StatusOr<std::size_t> decode_stage_output(std::span<const std::byte> bytes, StageTrailer* t) {
  std::int64_t n = 0;
  if (bytes.size() < sizeof(n)) return data_loss("stage output too short");
  std::memcpy(&n, bytes.data(), sizeof(n));
  if (n < 0 || static_cast<std::uint64_t>(n) > (bytes.size() - sizeof(n)) / sizeof(std::int64_t)) {
    return data_loss("stage output: bad timing count");
  }
  t->stage_times_ns.resize(static_cast<std::size_t>(n));
  if (n > 0) std::memcpy(t->stage_times_ns.data(), bytes.data() + sizeof(n), static_cast<std::size_t>(n) * sizeof(std::int64_t));
  return sizeof(n) + static_cast<std::size_t>(n) * sizeof(std::int64_t);
}

}  // namespace kun::runtime
