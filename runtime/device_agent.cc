#include "runtime/device_agent.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>
#include <type_traits>

#include "common/check.h"
#include "model/sampling.h"
#include "runtime/wire_format.h"

namespace kun::runtime {

namespace {
using wire::put;
using wire::put_ids;
using wire::Reader;

std::span<const std::byte> as_bytes_of(std::span<const float> f) { return std::as_bytes(f); }

Status status_from_reply(const Message& m) {
  if (m.header.error == 0) return ok_status();
  std::string text(reinterpret_cast<const char*>(m.payload.data()), m.payload.size());
  return Status(static_cast<StatusCode>(m.header.error), text);
}
}  // namespace

std::vector<std::byte> encode_snapshot(const DeviceSnapshot& s) {
  std::vector<std::byte> out;
  put(out, static_cast<std::int32_t>(s.device));
  put(out, s.page_bytes);
  put(out, s.num_pages);
  put(out, s.free_pages);
  put(out, s.kv_pages);
  put(out, s.param_pages);
  put(out, s.workspace_pages);
  put(out, s.blocks_per_page);
  put_ids(out, s.resident_layers);
  put_ids(out, s.layer_checksums);
  put_ids(out, s.kv_page_ids);
  put(out, s.counters);
  put(out, s.process_cpu_s);
  return out;
}

StatusOr<DeviceSnapshot> decode_snapshot(std::span<const std::byte> bytes) {
  Reader r(bytes);
  DeviceSnapshot s;
  std::int32_t device = 0;
  const bool ok = r.get(&device) && r.get(&s.page_bytes) && r.get(&s.num_pages) && r.get(&s.free_pages) &&
                  r.get(&s.kv_pages) && r.get(&s.param_pages) && r.get(&s.workspace_pages) && r.get(&s.blocks_per_page) &&
                  r.get_ids(&s.resident_layers) && r.get_ids(&s.layer_checksums) && r.get_ids(&s.kv_page_ids) &&
                  r.get(&s.counters) && r.get(&s.process_cpu_s) && r.at_end();
  if (!ok) return data_loss("malformed device snapshot (" + std::to_string(bytes.size()) + " bytes)");
  s.device = device;
  return s;
}

std::vector<std::byte> encode_geometry(const DeviceGeometry& g) {
  std::vector<std::byte> out;
  put(out, static_cast<std::int32_t>(g.device));
  put(out, g.num_layers);
  put(out, g.page_bytes);
  put(out, g.num_pages);
  put(out, g.blocks_per_page);
  put(out, g.block_bytes);
  put(out, g.block_stride_bytes);
  put(out, g.kv_block_size);
  put(out, g.pages_per_layer);
  put(out, g.layer_segment_bytes);
  put(out, g.host_swap_blocks);
  put(out, g.workspace_bytes);
  put(out, g.max_batched_tokens);
  put(out, g.max_sequences);
  put(out, g.max_context_tokens);
  put(out, g.kv_dtype);
  put_ids(out, g.resident_layers);
  put_ids(out, g.kv_page_ids);
  return out;
}

StatusOr<DeviceGeometry> decode_geometry(std::span<const std::byte> bytes) {
  Reader r(bytes);
  DeviceGeometry g;
  std::int32_t device = 0;
  const bool ok = r.get(&device) && r.get(&g.num_layers) && r.get(&g.page_bytes) && r.get(&g.num_pages) &&
                  r.get(&g.blocks_per_page) && r.get(&g.block_bytes) && r.get(&g.block_stride_bytes) &&
                  r.get(&g.kv_block_size) && r.get(&g.pages_per_layer) && r.get(&g.layer_segment_bytes) &&
                  r.get(&g.host_swap_blocks) && r.get(&g.workspace_bytes) && r.get(&g.max_batched_tokens) &&
                  r.get(&g.max_sequences) && r.get(&g.max_context_tokens) && r.get(&g.kv_dtype) && r.get_ids(&g.resident_layers) &&
                  r.get_ids(&g.kv_page_ids) && r.at_end();
  if (!ok) return data_loss("malformed device geometry (" + std::to_string(bytes.size()) + " bytes)");
  g.device = device;
  return g;
}

double process_cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  const auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) * 1e-6; };
  return sec(u.ru_utime) + sec(u.ru_stime);
}

// ---- DeviceAgent -----------------------------------------------------------------------------

static std::int64_t steady_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

DeviceAgent::DeviceAgent(VirtualDevice& device, MessageTransport& endpoint, AgentOptions options)
    : device_(device), endpoint_(endpoint), options_(std::move(options)) {
  const DeviceOwnerScope scope(device_);  // the creator hands the device over here
  stage_sample_scratch_.reserve(static_cast<std::size_t>(device_.config().vocab_size));  // the most top-k keeps
  stage_sampled_.reserve(static_cast<std::size_t>(device_.options().max_batched_tokens));
  host_swap_.resize(static_cast<std::size_t>(options_.host_swap_blocks * device_.kv_storage().block_bytes()));
}

DeviceAgent::~DeviceAgent() { stop(); }

void DeviceAgent::start() {
  KUN_CHECK(!thread_.joinable()) << "agent of device " << device_id() << " already started";
  thread_ = std::thread([this] { serve_loop(); });
  stage_thread_ = std::thread([this] { stage_loop(); });
}

void DeviceAgent::stop() {
  if (!thread_.joinable()) return;
  stopping_.store(true, std::memory_order_release);
  for (Port port : {Port::kStage, Port::kAgent}) {
    MessageHeader h;
    h.dst = endpoint_.device();
    h.kind = TransferKind::kControl;
    h.port = port;
    h.op = static_cast<std::uint16_t>(AgentOp::kStop);
    endpoint_.send_owned(std::move(h), {});
  }
  stage_thread_.join();
  thread_.join();
}

AgentCounters DeviceAgent::counters() const {
  AgentCounters c;
  c.attention_requests_for_others = attention_requests_for_others_.load();
  c.attention_tokens_for_others = attention_tokens_for_others_.load();
  c.blocks_written = blocks_written_.load();
  c.blocks_read = blocks_read_.load();
  c.requests_refused = requests_refused_.load();
  c.stages_run = stages_run_.load();
  c.swap_out_bytes = swap_out_bytes_.load();
  c.swap_in_bytes = swap_in_bytes_.load();
  c.swap_out_messages = swap_out_messages_.load();
  c.swap_in_messages = swap_in_messages_.load();
  c.table_executors = table_executors_.load();
  return c;
}

bool DeviceAgent::wait_for_shutdown_request(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(shutdown_mu_);
  return shutdown_cv_.wait_for(lock, timeout, [&] { return shutdown_requested_; });
}

void DeviceAgent::serve_loop() {
  RecvMatch match;
  match.port = Port::kAgent;
  while (true) {
    RecvHandle h = endpoint_.recv(match);
    const Status s = h.wait();
    if (!s.ok()) return;  // the transport is gone: nothing more will arrive
    Message m = h.take();
    bool go_on = true;
    {
      const std::lock_guard<std::mutex> lock(device_mu_);
      const DeviceOwnerScope scope(device_);
      go_on = handle(m);
    }
    if (!go_on) return;
    endpoint_.recycle(std::move(m.payload));  // its bytes are in the arena now (or not needed)
  }
}

// ---- Pipeline stages -------------------------------------------------------------------------

void DeviceAgent::stage_loop() {
  RecvMatch match;
  match.port = Port::kStage;
  while (true) {
    RecvHandle h = endpoint_.recv(match);
    if (!h.wait().ok()) return;  // the transport is gone
    Message m = h.take();
    const auto op = static_cast<AgentOp>(m.header.op);
    if (op == AgentOp::kStop && m.header.src == device_id()) return;
    if (op == AgentOp::kRunStage) {
      run_stage(m);
    } else if (op == AgentOp::kDropTables) {
      stage_tables_.erase({m.header.src, static_cast<std::uint64_t>(m.header.request_id)});
      table_executors_.store(static_cast<std::int64_t>(stage_tables_.size()), std::memory_order_relaxed);
    } else {
      requests_refused_.fetch_add(1, std::memory_order_relaxed);
    }
    endpoint_.recycle(std::move(m.payload));
  }
}

void DeviceAgent::run_stage(Message& m) {
  const MessageHeader& h = m.header;
  StageTrailer trailer;
  stage_sampled_.clear();
  StatusOr<StageRequest> req = decode_stage_request(m.payload);
  Status s = req.status();
  const StageKvTables* tables = nullptr;
  if (s.ok()) {
    // Table changes apply in message order, before waiting for the input, whatever the step's fate.
    const std::lock_guard<std::mutex> lock(device_mu_);
    const DeviceOwnerScope scope(device_);
    StatusOr<const StageKvTables*> applied = apply_tables(h.src, *req);
    s = applied.status();
    if (s.ok()) tables = *applied;
  }
  Message im;  // the previous stage's output, read into the workspace under the device lock
  std::size_t input_at = 0;
  if (s.ok() && !req->first) {
    // The previous stage's activations (or its error), straight from its agent.
    RecvMatch in;
    in.port = Port::kUser;
    in.src = req->prev_endpoint;
    in.tag = h.tag;
    RecvHandle ih = endpoint_.recv(in);
    // No deadline: the previous stage always sends its output or its error (a lost peer fails the
    // receive through the transport); only stop() ends the wait early.
    while (!ih.wait_for(std::chrono::milliseconds(100))) {
      if (stopping_.load(std::memory_order_acquire)) break;
    }
    s = ih.ready() ? ih.wait() : cancelled("device " + std::to_string(device_id()) + " stopped while a stage waited for its input");
    if (s.ok()) {
      im = ih.take();
      s = status_from_reply(im);
      if (s.ok()) {
        StatusOr<std::size_t> at = decode_stage_output(im.payload, &trailer);
        s = at.status();
        if (s.ok()) input_at = *at;
      }
    }
  }
  const std::int64_t start_ns = steady_now_ns();
  const bool to_next = req.ok() && !req->last;
  std::vector<std::byte> payload;
  if (s.ok()) {
    std::unique_lock<std::mutex> lock(device_mu_);
    auto scope = std::make_unique<DeviceOwnerScope>(device_);
    const std::span<const std::byte> input = std::span<const std::byte>(im.payload).subspan(std::min(input_at, im.payload.size()));
    std::int64_t out_floats = 0;
    s = compute_stage(*req, *tables, input, scope, lock, &out_floats);
    trailer.stage_times_ns.push_back(start_ns);
    trailer.stage_times_ns.push_back(steady_now_ns());
    if (s.ok()) {
      // The output is copied out of the workspace while the device is still held.
      const std::span<const std::byte> body =
          to_next ? std::as_bytes(device_.stage_activations().first(static_cast<std::size_t>(out_floats)))
                  : std::as_bytes(std::span<const std::int32_t>(stage_sampled_));
      payload = encode_stage_output(trailer, body);
    }
  }
  endpoint_.recycle(std::move(im.payload));
  stages_run_.fetch_add(1, std::memory_order_relaxed);
  MessageHeader out;
  out.tag = h.tag;
  out.request_id = h.request_id;
  if (to_next) {
    out.dst = req->next_endpoint;
    out.port = Port::kUser;
    out.op = static_cast<std::uint16_t>(AgentOp::kStageInput);
    out.kind = TransferKind::kActivation;
  } else {
    out.dst = req.ok() ? req->reply_endpoint : (h.reply_to >= 0 ? h.reply_to : h.src);
    out.port = Port::kReply;
    out.op = static_cast<std::uint16_t>(AgentOp::kReply);
    out.kind = TransferKind::kControl;
  }
  if (!s.ok()) {
    requests_refused_.fetch_add(1, std::memory_order_relaxed);
    out.error = static_cast<std::int32_t>(s.code());
    const std::string text = "device " + std::to_string(device_id()) + " stage: " + s.message();
    payload.assign(reinterpret_cast<const std::byte*>(text.data()), reinterpret_cast<const std::byte*>(text.data()) + text.size());
  }
  endpoint_.send_owned(std::move(out), std::move(payload));
}

StatusOr<const StageKvTables*> DeviceAgent::apply_tables(int sender, const StageRequest& req) {
  const std::pair<int, std::uint64_t> key{sender, req.executor};
  auto it = stage_tables_.find(key);
  if (it == stage_tables_.end()) {
    if (!req.reset_tables) {
      return failed_precondition("stage: device " + std::to_string(device_id()) + " has no block tables of executor " +
                                 std::to_string(req.executor) + " of endpoint " + std::to_string(sender) +
                                 " and the request is not a resync (a lost message, or tables already dropped)");
    }
    it = stage_tables_.try_emplace(key, req.layer_begin, req.layer_end).first;
    table_executors_.store(static_cast<std::int64_t>(stage_tables_.size()), std::memory_order_relaxed);
  }
  StageKvTables& mirror = it->second;
  if (mirror.layer_begin() != req.layer_begin || mirror.layer_end() != req.layer_end) {
    return invalid_argument("stage: executor " + std::to_string(req.executor) + " ran layers [" +
                            std::to_string(mirror.layer_begin()) + ", " + std::to_string(mirror.layer_end()) +
                            ") here, this request [" + std::to_string(req.layer_begin) + ", " + std::to_string(req.layer_end) + ")");
  }
  if (req.reset_tables) mirror.clear();
  for (std::int64_t id : req.released) mirror.release(RequestId(id));
  std::size_t next_list = 0;
  std::size_t next_block = 0;
  for (const StageTableUpdate& u : req.updates) {
    const RequestId id(u.request_id);
    std::vector<StageKvTables::Layer>* table = u.replace ? &mirror.reset_table(id) : mirror.mutable_table(id);
    if (table == nullptr) {
      return failed_precondition("stage: blocks appended to request " + std::to_string(u.request_id) +
                                 "'s table, which device " + std::to_string(device_id()) + " never got from executor " +
                                 std::to_string(req.executor));
    }
    for (std::int32_t k = 0; k < u.num_lists; ++k) {
      const StageLayerList& list = req.lists[next_list++];
      const std::span<const std::int64_t> blocks(req.blocks.data() + next_block, static_cast<std::size_t>(list.num_blocks));
      next_block += blocks.size();
      StageKvTables::Layer& entry = (*table)[static_cast<std::size_t>(list.layer - req.layer_begin)];
      if (u.replace) {
        if (entry.device >= 0) {
          return invalid_argument("stage: request " + std::to_string(u.request_id) + " lists layer " + std::to_string(list.layer) + " twice");
        }
        entry.device = list.holder;
      } else if (entry.device != list.holder) {
        return invalid_argument("stage: request " + std::to_string(u.request_id) + " layer " + std::to_string(list.layer) +
                                ": blocks appended on endpoint " + std::to_string(list.holder) + ", its KV is on " +
                                std::to_string(entry.device));
      }
      // Blocks held here are checked once, when they arrive (the front end re-sends a table
      // whenever its blocks change other than by an append).
      if (list.holder == device_id()) KUN_RETURN_IF_ERROR(check_blocks(blocks));
      entry.blocks.insert(entry.blocks.end(), blocks.begin(), blocks.end());
    }
    if (!u.replace) continue;
    for (std::size_t k = 0; k < table->size(); ++k) {
      if ((*table)[k].device < 0) {
        return invalid_argument("stage: request " + std::to_string(u.request_id) + "'s table lacks layer " +
                                std::to_string(req.layer_begin + static_cast<std::int64_t>(k)));
      }
    }
  }
  return &mirror;
}

Status DeviceAgent::do_swaps(const StageRequest& req) {
  if (req.swap_out.empty() && req.swap_in.empty()) return ok_status();
  kv::KvStorage& store = device_.kv_storage();
  const std::int64_t bb = store.block_bytes();
  const std::int64_t slots = static_cast<std::int64_t>(host_swap_.size()) / bb;
  const auto check = [&](const std::vector<SwapCopy>& copies, bool out) -> Status {
    for (const SwapCopy& c : copies) {
      const std::int64_t slot = out ? c.dst : c.src;
      const std::int64_t block = out ? c.src : c.dst;
      if (slot < 0 || slot >= slots) {
        return invalid_argument("swap: host slot " + std::to_string(slot) + " outside " + std::to_string(slots));
      }
      KUN_RETURN_IF_ERROR(check_blocks(std::span<const std::int64_t>(&block, 1)));
    }
    return ok_status();
  };
  KUN_RETURN_IF_ERROR(check(req.swap_out, true));
  KUN_RETURN_IF_ERROR(check(req.swap_in, false));
  // One host-link message per direction: swap-outs first (they free blocks swap-ins may reuse).
  const auto run = [&](const std::vector<SwapCopy>& copies, bool out) {
    if (copies.empty()) return;
    const auto start = std::chrono::steady_clock::now();
    for (const SwapCopy& c : copies) {
      std::byte* host = host_swap_.data() + (out ? c.dst : c.src) * bb;
      std::byte* dev = store.block_data(kv::BlockId(out ? c.src : c.dst));
      if (out) {
        std::memcpy(host, dev, static_cast<std::size_t>(bb));
      } else {
        std::memcpy(dev, host, static_cast<std::size_t>(bb));
      }
    }
    const std::int64_t bytes = static_cast<std::int64_t>(copies.size()) * bb;
    (out ? swap_out_bytes_ : swap_in_bytes_).fetch_add(bytes, std::memory_order_relaxed);
    (out ? swap_out_messages_ : swap_in_messages_).fetch_add(1, std::memory_order_relaxed);
    const LinkModel& link = options_.host_link;
    if (link.enabled()) {
      double seconds = static_cast<double>(link.latency_us) * 1e-6;
      if (link.bandwidth_bytes_per_s > 0) seconds += static_cast<double>(bytes) / link.bandwidth_bytes_per_s;
      std::this_thread::sleep_until(start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                std::chrono::duration<double>(seconds)));
    }
  };
  run(req.swap_out, true);
  run(req.swap_in, false);
  return ok_status();
}

Status DeviceAgent::compute_stage(const StageRequest& req, const StageKvTables& tables, std::span<const std::byte> input,
                                  std::unique_ptr<DeviceOwnerScope>& scope, std::unique_lock<std::mutex>& lock,
                                  std::int64_t* stage_out_floats) {
  const model::ModelConfig& c = device_.config();
  const DeviceOptions& limits = device_.options();
  const std::int64_t H = c.hidden_size;
  const std::int64_t n = req.num_tokens();
  *stage_out_floats = 0;
  KUN_RETURN_IF_ERROR(do_swaps(req));
  if (req.layer_end > c.num_layers) return invalid_argument("stage: layers beyond the model's " + std::to_string(c.num_layers));
  for (std::int64_t l = req.layer_begin; l < req.layer_end; ++l) {
    if (!device_.has_layer(l)) {
      return failed_precondition("stage: layer " + std::to_string(l) + " is not resident on device " + std::to_string(device_id()));
    }
  }
  // The workspace holds steps up to the device's limits (DeviceOptions, set from the scheduler).
  if (n > limits.max_batched_tokens) {
    return invalid_argument("stage: a step of " + std::to_string(n) + " tokens exceeds device " + std::to_string(device_id()) +
                            "'s workspace of " + std::to_string(limits.max_batched_tokens) + " tokens (max_batched_tokens)");
  }
  for (const StageSequence& q : req.sequences) {
    if (q.start_pos + q.num_tokens > limits.max_context_tokens) {
      return invalid_argument("stage: a context of " + std::to_string(q.start_pos + q.num_tokens) + " tokens exceeds device " +
                              std::to_string(device_id()) + "'s workspace of " + std::to_string(limits.max_context_tokens) +
                              " (max_context_tokens)");
    }
  }
  if (n == 0) return ok_status();
  model::ForwardPass& fwd = device_.forward();
  const std::span<float> hidden = device_.stage_activations().first(static_cast<std::size_t>(n * H));
  if (req.first) {
    fwd.embed(device_.head_weights(), req.tokens.data(), n, hidden.data());
  } else if (input.size() != hidden.size_bytes()) {
    return invalid_argument("stage: " + std::to_string(input.size() / sizeof(float)) + " input activations for " +
                            std::to_string(n) + " tokens");
  } else {
    std::memcpy(hidden.data(), input.data(), input.size());
  }
  *stage_out_floats = n * H;
  // Each (sequence, layer) cell's holder and blocks, from this executor's mirror (the tables the
  // stage messages kept up to date); pointers for the blocks held here.
  const std::int64_t nl = req.num_layers();
  const std::size_t cells = req.sequences.size() * static_cast<std::size_t>(nl);
  stage_block_ptrs_.resize(cells);
  stage_cells_.assign(cells, nullptr);
  std::vector<model::SequenceSlice>& slices = stage_slices_;
  slices.clear();
  for (const StageSequence& q : req.sequences) slices.push_back({q.start_pos, q.num_tokens});
  const auto cell_blocks = [&](std::size_t cell) { return std::span<const std::int64_t>(stage_cells_[cell]->blocks); };
  kv::KvStorage& store = device_.kv_storage();
  for (std::size_t seq = 0; seq < req.sequences.size(); ++seq) {
    const std::vector<StageKvTables::Layer>* table = tables.table(RequestId(req.sequences[seq].request_id));
    const model::SequenceSlice& sl = slices[seq];
    if (table == nullptr) {
      if (sl.num_tokens == 0) continue;
      return failed_precondition("stage: device " + std::to_string(device_id()) + " has no block table for request " +
                                 std::to_string(req.sequences[seq].request_id) + " of executor " + std::to_string(req.executor));
    }
    for (std::int64_t k = 0; k < nl; ++k) {
      const std::size_t cell = seq * static_cast<std::size_t>(nl) + static_cast<std::size_t>(k);
      const StageKvTables::Layer& entry = (*table)[static_cast<std::size_t>(k)];
      auto& ptrs = stage_block_ptrs_[cell];
      ptrs.clear();
      stage_cells_[cell] = &entry;
      if (static_cast<std::int64_t>(entry.blocks.size()) * device_.options().kv_block_size < sl.start_pos + sl.num_tokens) {
        return invalid_argument("stage: request " + std::to_string(req.sequences[seq].request_id) + " layer " +
                                std::to_string(req.layer_begin + k) + ": " + std::to_string(entry.blocks.size()) +
                                " blocks do not hold " + std::to_string(sl.start_pos + sl.num_tokens) + " tokens");
      }
      if (entry.device != device_id()) continue;  // the holder uses its own blocks
      for (std::int64_t b : entry.blocks) ptrs.push_back(store.block_data(kv::BlockId(b)));
    }
  }
  AgentClient client(endpoint_, std::chrono::minutes(5));
  Status remote_status;
  const auto cell_of = [&](std::int64_t l, std::int64_t i) {
    return static_cast<std::size_t>(i) * static_cast<std::size_t>(nl) + static_cast<std::size_t>(l - req.layer_begin);
  };
  fwd.run_layers(
      req.layer_begin, req.layer_end, slices, hidden.data(), [&](std::int64_t l) { return device_.layer_weights(l); },
      [&](std::int64_t l, std::int64_t i, const model::SequenceSlice& slice, const float* qkv, float* out) {
        const std::size_t cell = cell_of(l, i);
        const int holder = stage_cells_[cell]->device;
        KUN_CHECK_NE(holder, device_id()) << "local attention goes through the batch (local_kv)";
        const std::size_t out_floats = static_cast<std::size_t>(slice.num_tokens * c.q_dim());
        if (!remote_status.ok()) {
          std::fill(out, out + out_floats, 0.0f);
          return;
        }
        // Remote attention (DESIGN.md 3.5): the holder appends this slice's k/v to its blocks and
        // attends on its own threads; only q/k/v go out and the output comes back. The device is
        // let go while waiting, so this agent keeps serving others (the holder may be waiting on
        // us), and the kernel pool is never entered by two threads.
        scope.reset();
        lock.unlock();
        auto r = client.append_attend(holder, -1, l, slice, cell_blocks(cell),
                                      std::span<const float>(qkv, static_cast<std::size_t>(slice.num_tokens * fwd.qkv_row())));
        lock.lock();
        scope = std::make_unique<DeviceOwnerScope>(device_);
        if (!r.ok() || r->size() != out_floats) {
          remote_status = r.ok() ? data_loss("remote attention: wrong output size from device " + std::to_string(holder)) : r.status();
          std::fill(out, out + out_floats, 0.0f);
          return;
        }
        std::memcpy(out, r->data(), out_floats * sizeof(float));
      },
      // The cells held here: their sequences are attended together, one kernel call per layer.
      [&](std::int64_t l, std::int64_t i, model::LayerKv* kv) {
        const std::size_t cell = cell_of(l, i);
        if (stage_cells_[cell]->device != device_id()) return false;
        const auto& ptrs = stage_block_ptrs_[cell];
        *kv = model::LayerKv{ptrs.data(), static_cast<std::int64_t>(ptrs.size())};
        return true;
      });
  KUN_RETURN_IF_ERROR(remote_status);
  if (!req.last) return ok_status();
  std::vector<std::int64_t>& rows = stage_rows_;
  rows.clear();
  std::int64_t row = 0;
  for (const StageSequence& q : req.sequences) {
    row += q.num_tokens;
    if (q.sample) {
      if (q.num_tokens == 0) return invalid_argument("stage: sampling a sequence with no tokens");
      rows.push_back(row - 1);
    }
  }
  // Logits in passes of as many rows as the workspace's logits buffer holds (max_sequences).
  const std::int64_t V = c.vocab_size;
  const std::span<float> logits = device_.stage_logits();
  const std::size_t pass_rows = logits.size() / static_cast<std::size_t>(V);
  std::size_t next = 0;  // index into req.sequences of the next sampled sequence
  for (std::size_t first = 0; first < rows.size(); first += pass_rows) {
    const std::size_t m = std::min(pass_rows, rows.size() - first);
    fwd.logits(device_.head_weights(), hidden.data(), std::span<const std::int64_t>(rows).subspan(first, m), logits.data());
    for (std::size_t r = 0; r < m; ++r) {
      while (!req.sequences[next].sample) ++next;
      const StageSequence& q = req.sequences[next++];
      stage_sampled_.push_back(model::sample_token(logits.data() + static_cast<std::int64_t>(r) * V, V, q.sampling,
                                                   q.sample_index, &stage_sample_scratch_));
    }
  }
  return ok_status();
}

Status DeviceAgent::check_blocks(std::span<const std::int64_t> ids) const {
  const memory::DeviceArena& arena = device_.arena();
  const std::int64_t per_page = device_.kv_storage().blocks_per_page();
  for (std::int64_t id : ids) {
    const std::int64_t page = id / per_page;
    if (id < 0 || page >= arena.num_pages() || arena.page_owner(memory::PageId(page)).kind != memory::PageOwnerKind::kKv) {
      return invalid_argument("device " + std::to_string(device_id()) + ": block " + std::to_string(id) +
                              " is not in a KV page");
    }
  }
  return ok_status();
}

Status DeviceAgent::append_attend(const Message& m, std::vector<std::byte>* out) {
  const MessageHeader& h = m.header;
  const model::ModelConfig& c = device_.config();
  model::ForwardPass& fwd = device_.serve_forward();
  const std::int64_t block_tokens = device_.options().kv_block_size;
  if (h.num_tokens <= 0 || h.start_pos < 0) return invalid_argument("remote attention: empty or negative slice");
  const model::ForwardLimits& limits = fwd.limits();
  if (h.num_tokens > limits.max_tokens || h.start_pos + h.num_tokens > limits.max_context_tokens) {
    return invalid_argument("remote attention: " + std::to_string(h.num_tokens) + " tokens at " + std::to_string(h.start_pos) +
                            " exceed device " + std::to_string(device_id()) + "'s workspace (" +
                            std::to_string(limits.max_tokens) + " tokens, " + std::to_string(limits.max_context_tokens) +
                            "-token contexts)");
  }
  const std::int64_t want = h.num_tokens * fwd.qkv_row() * static_cast<std::int64_t>(sizeof(float));
  if (static_cast<std::int64_t>(m.payload.size()) != want) {
    return invalid_argument("remote attention: " + std::to_string(m.payload.size()) + " bytes of q/k/v, expected " +
                            std::to_string(want));
  }
  if (static_cast<std::int64_t>(h.block_ids.size()) * block_tokens < h.start_pos + h.num_tokens) {
    return invalid_argument("remote attention: " + std::to_string(h.block_ids.size()) + " blocks do not hold " +
                            std::to_string(h.start_pos + h.num_tokens) + " tokens");
  }
  KUN_RETURN_IF_ERROR(check_blocks(h.block_ids));
  block_ptrs_.clear();
  for (std::int64_t b : h.block_ids) block_ptrs_.push_back(device_.kv_storage().key_block(kv::BlockId(b)));
  // The payload's floats are copied into the workspace first: a byte vector's storage is not
  // guaranteed to be aligned for floats.
  const std::span<float> qkv = device_.remote_qkv().first(static_cast<std::size_t>(h.num_tokens * fwd.qkv_row()));
  const std::span<float> result = device_.remote_out().first(static_cast<std::size_t>(h.num_tokens * c.q_dim()));
  std::memcpy(qkv.data(), m.payload.data(), m.payload.size());
  const model::LayerKv kv{block_ptrs_.data(), static_cast<std::int64_t>(block_ptrs_.size())};
  fwd.attend_local(model::SequenceSlice{h.start_pos, h.num_tokens}, qkv.data(), kv, result.data());
  const auto bytes = std::as_bytes(result);
  out->assign(bytes.begin(), bytes.end());
  if (h.src != device_id()) {
    attention_requests_for_others_.fetch_add(1, std::memory_order_relaxed);
    attention_tokens_for_others_.fetch_add(h.num_tokens, std::memory_order_relaxed);
  }
  return ok_status();
}

void DeviceAgent::reply(const MessageHeader& request, const Status& status, std::vector<std::byte> payload,
                        TransferKind kind) {
  MessageHeader r;
  r.dst = request.reply_to >= 0 ? request.reply_to : request.src;
  r.kind = kind;
  r.port = Port::kReply;
  r.op = static_cast<std::uint16_t>(AgentOp::kReply);
  r.tag = request.tag;
  r.request_id = request.request_id;
  r.layer = request.layer;
  if (!status.ok()) {
    requests_refused_.fetch_add(1, std::memory_order_relaxed);
    r.error = static_cast<std::int32_t>(status.code());
    const std::string& text = status.message();
    payload.assign(reinterpret_cast<const std::byte*>(text.data()), reinterpret_cast<const std::byte*>(text.data()) + text.size());
  }
  endpoint_.send_owned(std::move(r), std::move(payload));
}

DeviceSnapshot DeviceAgent::snapshot(bool with_checksums) const {
  const memory::DeviceArena& arena = device_.arena();
  DeviceSnapshot s;
  s.device = device_id();
  s.page_bytes = arena.page_bytes();
  s.num_pages = arena.num_pages();
  s.free_pages = arena.num_free_pages();
  s.kv_pages = arena.num_kv_pages();
  s.workspace_pages = device_.workspace_pages();
  s.param_pages = arena.num_param_pages() - s.workspace_pages;  // the workspace is a segment too
  s.blocks_per_page = device_.kv_storage().blocks_per_page();
  for (std::int64_t l = 0; l < device_.config().num_layers; ++l) {
    if (!device_.has_layer(l)) continue;
    s.resident_layers.push_back(l);
    if (!with_checksums) continue;
    std::uint64_t hash = 1469598103934665603ull;
    for (std::byte b : device_.layer_bytes(l)) hash = (hash ^ static_cast<std::uint64_t>(b)) * 1099511628211ull;
    s.layer_checksums.push_back(static_cast<std::int64_t>(hash));
  }
  for (memory::PageId p : arena.kv_pages()) s.kv_page_ids.push_back(p.value);
  s.counters = counters();
  s.process_cpu_s = process_cpu_seconds();
  return s;
}

DeviceGeometry DeviceAgent::describe() const {
  const memory::DeviceArena& arena = device_.arena();
  DeviceGeometry g;
  g.device = device_id();
  g.num_layers = device_.config().num_layers;
  g.page_bytes = arena.page_bytes();
  g.num_pages = arena.num_pages();
  g.blocks_per_page = device_.kv_storage().blocks_per_page();
  g.block_bytes = device_.kv_storage().block_bytes();
  g.block_stride_bytes = device_.kv_geometry().block_stride_bytes();
  g.kv_block_size = device_.options().kv_block_size;
  g.pages_per_layer = device_.pages_per_layer();
  g.layer_segment_bytes = device_.layer_segment_bytes();
  g.host_swap_blocks = options_.host_swap_blocks;
  g.workspace_bytes = device_.workspace_bytes();
  g.max_batched_tokens = device_.options().max_batched_tokens;
  g.max_sequences = device_.options().max_sequences;
  g.max_context_tokens = device_.options().max_context_tokens;
  g.kv_dtype = static_cast<std::int32_t>(device_.options().kv_dtype);
  for (std::int64_t l = 0; l < device_.config().num_layers; ++l) {
    if (device_.has_layer(l)) g.resident_layers.push_back(l);
  }
  for (memory::PageId p : arena.kv_pages()) g.kv_page_ids.push_back(p.value);
  return g;
}

bool DeviceAgent::handle(Message& m) {
  const MessageHeader& h = m.header;
  const std::int64_t block_bytes = device_.kv_storage().block_bytes();
  if (options_.fault) {  // tests only: an injected transfer error (AgentOptions::fault)
    const auto op = static_cast<AgentOp>(h.op);
    if (op == AgentOp::kWriteBlocks || op == AgentOp::kDropLayer || op == AgentOp::kPullLayer || op == AgentOp::kMoveBlocks) {
      if (Status injected = options_.fault(op, h.layer); !injected.ok()) {
        reply(h, injected, {});
        return true;
      }
    }
  }
  switch (static_cast<AgentOp>(h.op)) {
    case AgentOp::kStop:
      if (h.src == device_id()) return false;
      reply(h, failed_precondition("only the agent's own process may stop it"), {});
      return true;
    case AgentOp::kAppendAttend: {
      std::vector<std::byte> out;
      const Status s = append_attend(m, &out);
      reply(h, s, std::move(out), TransferKind::kRemoteAttention);
      return true;
    }
    case AgentOp::kWriteBlocks: {
      Status s = check_blocks(h.block_ids);
      if (s.ok() && static_cast<std::int64_t>(m.payload.size()) != block_bytes * static_cast<std::int64_t>(h.block_ids.size())) {
        s = invalid_argument("write blocks: " + std::to_string(m.payload.size()) + " bytes for " +
                             std::to_string(h.block_ids.size()) + " blocks of " + std::to_string(block_bytes));
      }
      if (s.ok()) {
        for (std::size_t i = 0; i < h.block_ids.size(); ++i) {
          device_.kv_storage().write_block(kv::BlockId(h.block_ids[i]),
                                           std::span<const std::byte>(m.payload).subspan(i * static_cast<std::size_t>(block_bytes),
                                                                                         static_cast<std::size_t>(block_bytes)));
        }
        blocks_written_.fetch_add(static_cast<std::int64_t>(h.block_ids.size()), std::memory_order_relaxed);
      }
      reply(h, s, {});
      return true;
    }
    case AgentOp::kReadBlocks:
    case AgentOp::kSendBlocks: {
      const bool send = static_cast<AgentOp>(h.op) == AgentOp::kSendBlocks;
      Status s = check_blocks(h.block_ids);
      if (s.ok() && send && (h.peer < 0 || h.peer >= endpoint_.num_devices() || h.peer_block_ids.size() != h.block_ids.size())) {
        s = invalid_argument("send blocks: bad peer " + std::to_string(h.peer) + " or " +
                             std::to_string(h.peer_block_ids.size()) + " destination blocks for " +
                             std::to_string(h.block_ids.size()));
      }
      std::vector<std::byte> bytes;
      if (s.ok()) {
        bytes.resize(h.block_ids.size() * static_cast<std::size_t>(block_bytes));
        for (std::size_t i = 0; i < h.block_ids.size(); ++i) {
          device_.kv_storage().read_block(kv::BlockId(h.block_ids[i]),
                                          std::span<std::byte>(bytes).subspan(i * static_cast<std::size_t>(block_bytes),
                                                                              static_cast<std::size_t>(block_bytes)));
        }
        blocks_read_.fetch_add(static_cast<std::int64_t>(h.block_ids.size()), std::memory_order_relaxed);
      }
      if (!s.ok() || !send) {
        reply(h, s, std::move(bytes), h.kind);
        return true;
      }
      // The peer writes them and acks to whoever asked for the send.
      MessageHeader w;
      w.dst = h.peer;
      w.kind = h.kind;
      w.port = Port::kAgent;
      w.op = static_cast<std::uint16_t>(AgentOp::kWriteBlocks);
      w.tag = h.tag;
      w.reply_to = h.reply_to >= 0 ? h.reply_to : h.src;
      w.request_id = h.request_id;
      w.layer = h.layer;
      w.block_ids = h.peer_block_ids;
      endpoint_.send_owned(std::move(w), std::move(bytes));
      return true;
    }
    case AgentOp::kDropLayer: {
      if (h.layer < 0 || h.layer >= device_.config().num_layers) {
        reply(h, invalid_argument("drop layer: no layer " + std::to_string(h.layer)), {});
        return true;
      }
      auto pages = device_.drop_layer(h.layer);  // its pages become KV pages, no copy
      std::vector<std::byte> out;
      if (pages.ok()) {
        out.resize(pages->size() * sizeof(std::int64_t));
        for (std::size_t i = 0; i < pages->size(); ++i) {
          const std::int64_t id = (*pages)[i].value;
          std::memcpy(out.data() + i * sizeof(std::int64_t), &id, sizeof(id));
        }
      }
      reply(h, pages.status(), std::move(out));
      return true;
    }
    case AgentOp::kPullLayer:
      pull_layer(m);
      return true;
    case AgentOp::kSendLayer:
      send_layer(m);
      return true;
    case AgentOp::kLayerData:
      layer_data(m);
      return true;
    case AgentOp::kSnapshot:
      reply(h, ok_status(), encode_snapshot(snapshot()));
      return true;
    case AgentOp::kMoveBlocks: {
      Status s = check_blocks(h.block_ids);
      if (s.ok()) s = check_blocks(h.peer_block_ids);
      if (s.ok() && h.block_ids.size() != h.peer_block_ids.size()) s = invalid_argument("move blocks: unequal lists");
      if (s.ok()) {
        kv::KvStorage& store = device_.kv_storage();
        for (std::size_t i = 0; i < h.block_ids.size(); ++i) {
          std::memcpy(store.block_data(kv::BlockId(h.peer_block_ids[i])), store.block_data(kv::BlockId(h.block_ids[i])),
                      static_cast<std::size_t>(block_bytes));
        }
      }
      reply(h, s, {});
      return true;
    }
    case AgentOp::kRunStage:
    case AgentOp::kStageInput:
    case AgentOp::kDropTables:
      reply(h, invalid_argument("stage ops go to the stage port"), {});
      return true;
    case AgentOp::kCheckIntegrity:
      device_.arena().check_integrity();
      reply(h, ok_status(), encode_snapshot(snapshot(/*with_checksums=*/false)));
      return true;
    case AgentOp::kDescribe:
      reply(h, ok_status(), encode_geometry(describe()));
      return true;
    case AgentOp::kCancelPull: {
      // pull_layer() keys a pending pull by its requester and tag; layer_data() drops weights
      // that nobody waits for, so once this answers, a cancelled pull writes nothing.
      const auto it = pulls_.find({h.src, static_cast<std::uint64_t>(h.request_id)});
      const bool pending = it != pulls_.end();
      if (pending) pulls_.erase(it);
      reply(h, ok_status(), {pending ? std::byte{1} : std::byte{0}});
      return true;
    }
    case AgentOp::kShutdownNode:
      reply(h, ok_status(), {});
      {
        std::lock_guard<std::mutex> lock(shutdown_mu_);
        shutdown_requested_ = true;
      }
      shutdown_cv_.notify_all();
      return true;
    case AgentOp::kReply:
      break;
  }
  reply(h, invalid_argument("device " + std::to_string(device_id()) + ": unknown agent op " + std::to_string(h.op)), {});
  return true;
}

void DeviceAgent::pull_layer(const Message& m) {
  const MessageHeader& h = m.header;
  const memory::DeviceArena& arena = device_.arena();
  Status s;
  if (h.layer < 0 || h.layer >= device_.config().num_layers) {
    s = invalid_argument("pull layer: no layer " + std::to_string(h.layer));
  } else if (device_.has_layer(h.layer)) {
    s = failed_precondition("pull layer: layer " + std::to_string(h.layer) + " is resident on device " +
                            std::to_string(device_id()));
  } else if (h.peer < 0 || h.peer >= endpoint_.num_devices() || h.peer == device_id()) {
    s = invalid_argument("pull layer: bad source device " + std::to_string(h.peer));
  } else if (static_cast<std::int64_t>(h.block_ids.size()) != device_.pages_per_layer()) {
    s = invalid_argument("pull layer: " + std::to_string(h.block_ids.size()) + " pages for a layer of " +
                         std::to_string(device_.pages_per_layer()));
  } else {
    for (std::int64_t p : h.block_ids) {
      if (p < 0 || p >= arena.num_pages() || arena.page_owner(memory::PageId(p)).kind != memory::PageOwnerKind::kKv) {
        s = invalid_argument("pull layer: page " + std::to_string(p) + " is not a KV page of device " +
                             std::to_string(device_id()));
        break;
      }
    }
  }
  if (!s.ok()) {
    reply(h, s, {});
    return;
  }
  pulls_[{h.reply_to >= 0 ? h.reply_to : h.src, h.tag}] = PendingPull{h};
  MessageHeader ask;
  ask.dst = h.peer;
  ask.kind = TransferKind::kWeights;
  ask.port = Port::kAgent;
  ask.op = static_cast<std::uint16_t>(AgentOp::kSendLayer);
  ask.tag = h.tag;
  ask.reply_to = h.reply_to >= 0 ? h.reply_to : h.src;  // the original requester
  ask.peer = device_id();
  ask.layer = h.layer;
  endpoint_.send_owned(std::move(ask), {});
}

void DeviceAgent::send_layer(const Message& m) {
  const MessageHeader& h = m.header;
  MessageHeader data;
  data.dst = h.peer;
  data.kind = TransferKind::kWeights;
  data.port = Port::kAgent;
  data.op = static_cast<std::uint16_t>(AgentOp::kLayerData);
  data.tag = h.tag;
  data.reply_to = h.reply_to;
  data.layer = h.layer;
  std::vector<std::byte> payload;
  const Status injected = options_.fault ? options_.fault(AgentOp::kSendLayer, h.layer) : ok_status();
  if (!injected.ok()) {
    data.error = static_cast<std::int32_t>(injected.code());
    const std::string& text = injected.message();
    payload.assign(reinterpret_cast<const std::byte*>(text.data()), reinterpret_cast<const std::byte*>(text.data()) + text.size());
    requests_refused_.fetch_add(1, std::memory_order_relaxed);
  } else if (h.layer < 0 || h.layer >= device_.config().num_layers || !device_.has_layer(h.layer)) {
    const std::string text = "device " + std::to_string(device_id()) + " does not hold layer " + std::to_string(h.layer);
    data.error = static_cast<std::int32_t>(StatusCode::kFailedPrecondition);
    payload.assign(reinterpret_cast<const std::byte*>(text.data()), reinterpret_cast<const std::byte*>(text.data()) + text.size());
    requests_refused_.fetch_add(1, std::memory_order_relaxed);
  } else {
    const auto bytes = device_.layer_bytes(h.layer);
    payload.assign(bytes.begin(), bytes.end());
  }
  endpoint_.send_owned(std::move(data), std::move(payload));
}

void DeviceAgent::layer_data(Message& m) {
  const MessageHeader& h = m.header;
  auto it = pulls_.find({h.reply_to, h.tag});
  if (it == pulls_.end()) {
    requests_refused_.fetch_add(1, std::memory_order_relaxed);
    return;  // nobody asked (a duplicate): nothing to answer
  }
  const MessageHeader request = it->second.request;
  pulls_.erase(it);
  Status s = status_from_reply(m);
  if (s.ok() && static_cast<std::int64_t>(m.payload.size()) != device_.layer_segment_bytes()) {
    s = data_loss("pulled layer " + std::to_string(h.layer) + ": " + std::to_string(m.payload.size()) + " bytes, expected " +
                  std::to_string(device_.layer_segment_bytes()));
  }
  if (s.ok()) {
    std::vector<memory::PageId> pages;
    for (std::int64_t p : request.block_ids) pages.push_back(memory::PageId(p));
    s = device_.restore_layer(request.layer, pages);
  }
  if (s.ok()) {
    const std::span<std::byte> dst = device_.restored_layer_data(request.layer);
    std::memcpy(dst.data(), m.payload.data(), m.payload.size());
  }
  reply(request, s, {});
}

// ---- AgentClient -----------------------------------------------------------------------------

RecvHandle AgentClient::request(MessageHeader h, std::vector<std::byte> payload, std::uint64_t* tag) {
  h.port = Port::kAgent;
  h.tag = endpoint_.next_tag();
  if (tag != nullptr) *tag = h.tag;
  RecvMatch match;
  match.port = Port::kReply;
  match.tag = h.tag;
  // The reply comes from the device that finishes the op: the send's destination for kSendBlocks.
  match.src = static_cast<AgentOp>(h.op) == AgentOp::kSendBlocks ? h.peer : h.dst;
  RecvHandle reply = endpoint_.recv(match);  // posted before the request leaves
  endpoint_.send_owned(std::move(h), std::move(payload));
  return reply;
}

StatusOr<Message> AgentClient::wait_reply(RecvHandle& handle, const char* what, int device) {
  if (!handle.wait_for(timeout_)) {
    return deadline_exceeded(std::string(what) + ": device " + std::to_string(device) + " did not answer within " +
                             std::to_string(timeout_.count()) + " ms");
  }
  KUN_RETURN_IF_ERROR(handle.wait());
  Message m = handle.take();
  KUN_RETURN_IF_ERROR(status_from_reply(m));
  return m;
}

RecvHandle AgentClient::append_attend_async(int holder, std::int64_t request_id, std::int64_t layer,
                                            const model::SequenceSlice& slice, std::span<const std::int64_t> blocks,
                                            std::span<const float> qkv) {
  MessageHeader h;
  h.dst = holder;
  h.kind = TransferKind::kRemoteAttention;
  h.op = static_cast<std::uint16_t>(AgentOp::kAppendAttend);
  h.request_id = request_id;
  h.layer = layer;
  h.start_pos = slice.start_pos;
  h.num_tokens = slice.num_tokens;
  h.block_ids.assign(blocks.begin(), blocks.end());
  const auto bytes = as_bytes_of(qkv);
  return request(std::move(h), std::vector<std::byte>(bytes.begin(), bytes.end()));
}

StatusOr<std::vector<float>> AgentClient::append_attend(int holder, std::int64_t request_id, std::int64_t layer,
                                                        const model::SequenceSlice& slice,
                                                        std::span<const std::int64_t> blocks, std::span<const float> qkv) {
  RecvHandle handle = append_attend_async(holder, request_id, layer, slice, blocks, qkv);
  KUN_ASSIGN_OR_RETURN(Message m, wait_reply(handle, "remote attention", holder));
  std::vector<float> out(m.payload.size() / sizeof(float));
  std::memcpy(out.data(), m.payload.data(), out.size() * sizeof(float));
  return out;
}

Status AgentClient::write_blocks(int device, std::span<const std::int64_t> blocks, std::span<const std::byte> bytes,
                                 TransferKind kind) {
  MessageHeader h;
  h.dst = device;
  h.kind = kind;
  h.op = static_cast<std::uint16_t>(AgentOp::kWriteBlocks);
  h.block_ids.assign(blocks.begin(), blocks.end());
  RecvHandle handle = request(std::move(h), std::vector<std::byte>(bytes.begin(), bytes.end()));
  return wait_reply(handle, "write blocks", device).status();
}

StatusOr<std::vector<std::byte>> AgentClient::read_blocks(int device, std::span<const std::int64_t> blocks) {
  MessageHeader h;
  h.dst = device;
  h.kind = TransferKind::kKvMigration;
  h.op = static_cast<std::uint16_t>(AgentOp::kReadBlocks);
  h.block_ids.assign(blocks.begin(), blocks.end());
  RecvHandle handle = request(std::move(h), {});
  KUN_ASSIGN_OR_RETURN(Message m, wait_reply(handle, "read blocks", device));
  return std::move(m.payload);
}

Status AgentClient::send_blocks(int from, std::span<const std::int64_t> blocks, int to,
                                std::span<const std::int64_t> to_blocks, TransferKind kind) {
  MessageHeader h;
  h.dst = from;
  h.kind = kind;
  h.op = static_cast<std::uint16_t>(AgentOp::kSendBlocks);
  h.peer = to;
  h.block_ids.assign(blocks.begin(), blocks.end());
  h.peer_block_ids.assign(to_blocks.begin(), to_blocks.end());
  RecvHandle handle = request(std::move(h), {});
  return wait_reply(handle, "send blocks", to).status();
}

StatusOr<std::vector<std::int64_t>> AgentClient::drop_layer(int device, std::int64_t layer) {
  MessageHeader h;
  h.dst = device;
  h.kind = TransferKind::kControl;
  h.op = static_cast<std::uint16_t>(AgentOp::kDropLayer);
  h.layer = layer;
  RecvHandle handle = request(std::move(h), {});
  KUN_ASSIGN_OR_RETURN(Message m, wait_reply(handle, "drop layer", device));
  std::vector<std::int64_t> pages(m.payload.size() / sizeof(std::int64_t));
  if (!pages.empty()) std::memcpy(pages.data(), m.payload.data(), pages.size() * sizeof(std::int64_t));
  return pages;
}

Status AgentClient::pull_layer(int device, std::int64_t layer, int from, std::span<const std::int64_t> pages,
                               bool* pages_may_be_written) {
  if (pages_may_be_written != nullptr) *pages_may_be_written = false;
  MessageHeader h;
  h.dst = device;
  h.kind = TransferKind::kControl;  // the request is small; the weights go as kWeights
  h.op = static_cast<std::uint16_t>(AgentOp::kPullLayer);
  h.layer = layer;
  h.peer = from;
  h.block_ids.assign(pages.begin(), pages.end());
  std::uint64_t tag = 0;
  RecvHandle handle = request(std::move(h), {}, &tag);
  StatusOr<Message> pulled = wait_reply(handle, "pull layer", device);
  if (pulled.ok() || pulled.status().code() != StatusCode::kDeadlineExceeded) return pulled.status();
  // No answer in time, but the weights may still come and be written into `pages`, which the
  // caller is about to give back to the KV pool. The puller forgets the pull first; its answer
  // says whether the pull was still pending (then nothing will be written) or had ended (then
  // its reply, sent before this one, says how).
  MessageHeader c;
  c.dst = device;
  c.kind = TransferKind::kControl;
  c.op = static_cast<std::uint16_t>(AgentOp::kCancelPull);
  c.request_id = static_cast<std::int64_t>(tag);
  RecvHandle cancel = request(std::move(c), {});
  StatusOr<Message> cancelled = wait_reply(cancel, "cancel of a pull", device);
  if (!cancelled.ok()) {
    if (pages_may_be_written != nullptr) *pages_may_be_written = true;
    return unavailable("pull layer " + std::to_string(layer) + ": device " + std::to_string(device) +
                       " answered neither the pull nor its cancel: its pages " +
                       "may still be written (" + cancelled.status().to_string() + ")");
  }
  if (!cancelled->payload.empty() && cancelled->payload.front() == std::byte{1}) {
    return pulled.status().with_context("cancelled, nothing written");
  }
  return wait_reply(handle, "pull layer", device).status();
}

StatusOr<DeviceSnapshot> AgentClient::snapshot(int device) {
  MessageHeader h;
  h.dst = device;
  h.kind = TransferKind::kControl;
  h.op = static_cast<std::uint16_t>(AgentOp::kSnapshot);
  RecvHandle handle = request(std::move(h), {});
  KUN_ASSIGN_OR_RETURN(Message m, wait_reply(handle, "snapshot", device));
  return decode_snapshot(m.payload);
}

StatusOr<DeviceSnapshot> AgentClient::check_integrity(int device) {
  MessageHeader h;
  h.dst = device;
  h.kind = TransferKind::kControl;
  h.op = static_cast<std::uint16_t>(AgentOp::kCheckIntegrity);
  RecvHandle handle = request(std::move(h), {});
  KUN_ASSIGN_OR_RETURN(Message m, wait_reply(handle, "check integrity", device));
  return decode_snapshot(m.payload);
}

Status AgentClient::move_blocks(int device, std::span<const std::int64_t> from, std::span<const std::int64_t> to) {
  MessageHeader h;
  h.dst = device;
  h.kind = TransferKind::kControl;
  h.op = static_cast<std::uint16_t>(AgentOp::kMoveBlocks);
  h.block_ids.assign(from.begin(), from.end());
  h.peer_block_ids.assign(to.begin(), to.end());
  RecvHandle handle = request(std::move(h), {});
  return wait_reply(handle, "move blocks", device).status();
}

StatusOr<DeviceGeometry> AgentClient::describe(int device) {
  MessageHeader h;
  h.dst = device;
  h.kind = TransferKind::kControl;
  h.op = static_cast<std::uint16_t>(AgentOp::kDescribe);
  RecvHandle handle = request(std::move(h), {});
  KUN_ASSIGN_OR_RETURN(Message m, wait_reply(handle, "describe", device));
  return decode_geometry(m.payload);
}

Status AgentClient::shutdown_node(int device) {
  MessageHeader h;
  h.dst = device;
  h.kind = TransferKind::kControl;
  h.op = static_cast<std::uint16_t>(AgentOp::kShutdownNode);
  RecvHandle handle = request(std::move(h), {});
  return wait_reply(handle, "shutdown", device).status();
}

}  // namespace kun::runtime
