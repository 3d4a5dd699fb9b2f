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

std::vector<std::byte> encode_stage_request(const engine::StepPlan& plan, const StageKvTables& tables, std::size_t stage,
                                            std::span<const StageSpec> stages, int reply_endpoint) {
  KUN_CHECK(stage < stages.size()) << "stage " << stage << " of " << stages.size();
  const StageSpec& me = stages[stage];
  StageRequest r;
  r.layer_begin = me.layer_begin;
  r.layer_end = me.layer_end;
  r.first = stage == 0 ? 1 : 0;
  r.last = stage + 1 == stages.size() ? 1 : 0;
  r.prev_endpoint = stage > 0 ? stages[stage - 1].endpoint : -1;
  r.next_endpoint = r.last ? -1 : stages[stage + 1].endpoint;
  r.reply_endpoint = reply_endpoint;
  const std::int64_t nl = r.num_layers();
  r.holder.assign(plan.sequences.size() * static_cast<std::size_t>(nl), -1);
  std::vector<const std::vector<std::int64_t>*> cell_blocks(r.holder.size(), nullptr);
  for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
    const engine::ScheduledSequence& seq = plan.sequences[i];
    r.sequences.push_back(StageSequence{seq.start_pos, static_cast<std::int64_t>(seq.tokens.size()),
                                        static_cast<std::uint8_t>(seq.sample ? 1 : 0), seq.sampling, seq.sample_index});
    if (r.first) r.tokens.insert(r.tokens.end(), seq.tokens.begin(), seq.tokens.end());
    const auto* table = tables.table(seq.id);
    KUN_CHECK(table != nullptr) << "request " << seq.id << " planned without a KV table";
    for (std::int64_t layer = me.layer_begin; layer < me.layer_end; ++layer) {
      const auto& entry = (*table)[static_cast<std::size_t>(layer - tables.layer_begin())];
      KUN_CHECK(entry.device >= 0 && static_cast<std::size_t>(entry.device) < stages.size())
          << "request " << seq.id << " layer " << layer << " KV on device " << entry.device << " of a " << stages.size()
          << "-stage pipeline";
      const std::size_t cell = i * static_cast<std::size_t>(nl) + static_cast<std::size_t>(layer - me.layer_begin);
      r.holder[cell] = stages[static_cast<std::size_t>(entry.device)].endpoint;
      cell_blocks[cell] = &entry.blocks;
    }
  }
  r.block_begin.push_back(0);
  for (const auto* b : cell_blocks) {
    if (b != nullptr) r.blocks.insert(r.blocks.end(), b->begin(), b->end());
    r.block_begin.push_back(static_cast<std::int64_t>(r.blocks.size()));
  }
  for (const auto* copies : {&plan.swap_out, &plan.swap_in}) {
    for (const engine::BlockCopy& c : *copies) {
      KUN_CHECK(c.device >= 0 && static_cast<std::size_t>(c.device) < stages.size()) << "swap on device " << c.device;
      if (static_cast<std::size_t>(c.device) != stage) continue;
      (copies == &plan.swap_out ? r.swap_out : r.swap_in).push_back(SwapCopy{c.src, c.dst});
    }
  }
  std::vector<std::byte> out;
  put(out, r.layer_begin);
  put(out, r.layer_end);
  put(out, r.first);
  put(out, r.last);
  put(out, r.prev_endpoint);
  put(out, r.next_endpoint);
  put(out, r.reply_endpoint);
  put_vec(out, r.sequences);
  put_vec(out, r.tokens);
  put_vec(out, r.holder);
  put_ids(out, r.block_begin);
  put_ids(out, r.blocks);
  put_vec(out, r.swap_out);
  put_vec(out, r.swap_in);
  return out;
}

StatusOr<StageRequest> decode_stage_request(std::span<const std::byte> bytes) {
  Reader r(bytes);
  StageRequest s;
  const bool ok = r.get(&s.layer_begin) && r.get(&s.layer_end) && r.get(&s.first) && r.get(&s.last) &&
                  r.get(&s.prev_endpoint) && r.get(&s.next_endpoint) && r.get(&s.reply_endpoint) &&
                  get_vec(r, bytes, &s.sequences) && get_vec(r, bytes, &s.tokens) && get_vec(r, bytes, &s.holder) &&
                  r.get_ids(&s.block_begin) && r.get_ids(&s.blocks) && get_vec(r, bytes, &s.swap_out) &&
                  get_vec(r, bytes, &s.swap_in) && r.at_end();
  if (!ok) return data_loss("malformed stage request (" + std::to_string(bytes.size()) + " bytes)");
  const std::size_t cells = s.sequences.size() * static_cast<std::size_t>(std::max<std::int64_t>(s.num_layers(), 0));
  if (s.layer_begin < 0 || s.layer_end <= s.layer_begin || s.holder.size() != cells || s.block_begin.size() != cells + 1 ||
      s.block_begin.front() != 0 || s.block_begin.back() != static_cast<std::int64_t>(s.blocks.size())) {
    return data_loss("stage request: inconsistent layer range or block table");
  }
  for (std::size_t c = 0; c < cells; ++c) {
    if (s.block_begin[c] > s.block_begin[c + 1]) return data_loss("stage request: block table offsets go backwards");
  }
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
