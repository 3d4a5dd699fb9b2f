#include "runtime/pipeline_executor.h"

#include <chrono>
#include <cstring>

#include "common/check.h"
#include "model/sampling.h"

namespace kun::runtime {
namespace {
std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

PipelineExecutor::PipelineExecutor(std::vector<PipelineStage> stages, Transport* transport, std::int64_t host_swap_blocks)
    : stages_(std::move(stages)), transport_(transport), state_(stages_.size()) {
  KUN_CHECK(!stages_.empty());
  KUN_CHECK(stages_.size() == 1 || transport_ != nullptr) << "a pipeline needs a transport";
  block_bytes_ = stages_.front().device->kv_storage().block_bytes();
  for (std::size_t s = 0; s < stages_.size(); ++s) {
    const PipelineStage& st = stages_[s];
    KUN_CHECK(st.layer_begin < st.layer_end) << "stage " << s << " has no layers";
    if (s > 0) KUN_CHECK_EQ(st.layer_begin, stages_[s - 1].layer_end) << "stages must cover consecutive layers";
    for (std::int64_t l = st.layer_begin; l < st.layer_end; ++l) {
      KUN_CHECK(st.device->has_layer(l)) << "stage " << s << " lacks layer " << l;
    }
    state_[s].host_swap.resize(static_cast<std::size_t>(host_swap_blocks * block_bytes_));
    state_[s].tables = std::make_unique<engine::KvTableMirror<std::byte*>>(st.layer_begin, st.layer_end);
  }
  KUN_CHECK_EQ(stages_.front().layer_begin, 0);
  KUN_CHECK_EQ(stages_.back().layer_end, stages_.front().device->config().num_layers);
  slots_.resize(stages_.size());
  for (std::size_t s = 0; s < stages_.size(); ++s) stage_cv_.push_back(std::make_unique<std::condition_variable>());
  for (SlotState& slot : slots_) slot.input.resize(stages_.size());
  if (stages_.size() > 1) {
    for (std::size_t s = 0; s < stages_.size(); ++s) workers_.emplace_back([this, s] { worker_loop(s); });
  }
}

PipelineExecutor::~PipelineExecutor() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    shutting_down_ = true;
  }
  for (auto& cv : stage_cv_) cv->notify_all();
  for (auto& t : workers_) t.join();
}

PipelineExecutor::StageTime PipelineExecutor::stage_time() const {
  StageTime t;
  for (const StageState& st : state_) {
    t.add({st.busy_ns.load(std::memory_order_relaxed), st.idle_ns.load(std::memory_order_relaxed)});
  }
  return t;
}

void PipelineExecutor::do_swaps(const engine::StepPlan& plan) {
  const auto host_slot = [&](int device, std::int64_t index) {
    auto& host = state_[static_cast<std::size_t>(device)].host_swap;
    KUN_CHECK(index >= 0 && (index + 1) * block_bytes_ <= static_cast<std::int64_t>(host.size())) << "host swap slot " << index;
    return host.data() + index * block_bytes_;
  };
  const auto device_block = [&](int device, std::int64_t block) {  // devices checked below
    return stages_[static_cast<std::size_t>(device)].device->kv_storage().block_data(kv::BlockId(block));
  };
  // One host-link message per device and direction: swap-outs first (they free the blocks that
  // swap-ins of the same step may reuse).
  const auto run = [&](const std::vector<engine::BlockCopy>& copies, TransferKind kind) {
    for (std::size_t d = 0; d < stages_.size(); ++d) {
      swap_batch_.clear();
      for (const engine::BlockCopy& c : copies) {
        if (static_cast<std::size_t>(c.device) != d) continue;
        if (kind == TransferKind::kSwapOut) {
          swap_batch_.push_back({device_block(c.device, c.src), host_slot(c.device, c.dst), block_bytes_});
        } else {
          swap_batch_.push_back({host_slot(c.device, c.src), device_block(c.device, c.dst), block_bytes_});
        }
      }
      if (swap_batch_.empty()) continue;
      if (transport_ != nullptr) {
        transport_->host_transfer(stages_[d].global_device, swap_batch_, kind);
      } else {
        for (const CopySpan& c : swap_batch_) std::memcpy(c.dst, c.src, static_cast<std::size_t>(c.bytes));
      }
    }
  };
  // run() visits devices by index, so a copy naming no stage would be skipped silently.
  for (const auto* copies : {&plan.swap_out, &plan.swap_in}) {
    for (const engine::BlockCopy& c : *copies) {
      KUN_CHECK(c.device >= 0 && static_cast<std::size_t>(c.device) < stages_.size()) << "swap on device " << c.device;
    }
  }
  run(plan.swap_out, TransferKind::kSwapOut);
  run(plan.swap_in, TransferKind::kSwapIn);
}

void PipelineExecutor::prepare(int index, const engine::StepPlan& plan) {
  SlotState& slot = slots_[static_cast<std::size_t>(index)];
  slot.tokens.clear();
  slot.slices.clear();
  slot.logit_rows.clear();
  slot.num_tokens = 0;
  slot.result = engine::StepResult{};
  for (const engine::ScheduledSequence& seq : plan.sequences) {
    const auto len = static_cast<std::int64_t>(seq.tokens.size());
    slot.tokens.insert(slot.tokens.end(), seq.tokens.begin(), seq.tokens.end());
    slot.slices.push_back({seq.start_pos, len});
    slot.num_tokens += len;
    if (seq.sample) slot.logit_rows.push_back(slot.num_tokens - 1);
  }
}

void PipelineExecutor::run_stage(std::size_t s, const Work& w) {
  const PipelineStage& stage = stages_[s];
  StageState& st = state_[s];
  SlotState& slot = slots_[static_cast<std::size_t>(w.slot)];
  const engine::StepPlan& plan = *w.plan;
  VirtualDevice& dev = *stage.device;
  const model::ModelConfig& c = dev.config();
  const std::int64_t H = c.hidden_size;
  model::ForwardPass& fwd = dev.forward();
  // Every plan updates the tables, even one with no tokens (it may release requests).
  st.tables->apply(plan, [&](std::int32_t device, std::int64_t block) {
    KUN_CHECK(device >= 0 && static_cast<std::size_t>(device) < stages_.size()) << "KV on device " << device;
    return stages_[static_cast<std::size_t>(device)].device->kv_storage().block_data(kv::BlockId(block));
  });
  if (slot.num_tokens > 0) {
    if (s == 0) {
      st.work.resize(static_cast<std::size_t>(slot.num_tokens * H));
      fwd.embed(dev.head_weights(), slot.tokens.data(), slot.num_tokens, st.work.data());
    } else {
      std::swap(st.work, slot.input[s]);
    }
    const std::int64_t nl = stage.layer_end - stage.layer_begin;
    st.cells.clear();
    st.cells.reserve(plan.sequences.size() * static_cast<std::size_t>(nl));
    for (const engine::ScheduledSequence& seq : plan.sequences) {
      const auto* table = st.tables->table(seq.id);
      KUN_CHECK(table != nullptr) << "no KV table for request " << seq.id;
      for (const auto& layer : *table) st.cells.push_back(&layer);
    }
    fwd.run_layers(
        stage.layer_begin, stage.layer_end, slot.slices, st.work.data(), [&](std::int64_t l) { return dev.layer_weights(l); },
        [&](std::int64_t l, std::int64_t i, const model::SequenceSlice& slice, const float* qkv, float* out) {
          const std::size_t cell = static_cast<std::size_t>(i) * static_cast<std::size_t>(nl) + static_cast<std::size_t>(l - stage.layer_begin);
          const auto& layer = *st.cells[cell];
          const model::LayerKv kv{layer.blocks.data(), static_cast<std::int64_t>(layer.blocks.size())};
          const int holder = layer.device;
          KUN_CHECK_GE(holder, 0) << "no KV for layer " << l << " of sequence " << i;
          if (static_cast<std::size_t>(holder) == s) {
            fwd.attend_local(slice, qkv, kv, out);
            return;
          }
          // Remote attention (DESIGN.md 3.5): the KV stays on its holder. This slice's q/k/v rows
          // go there, its k/v are appended and attention runs against that device's blocks, and
          // only the attention output comes back. The buffers stand for the holder's memory set
          // aside for this peer (one pair per calling stage, so concurrent stages never share).
          const int here = stage.global_device;
          const int there = stages_[static_cast<std::size_t>(holder)].global_device;
          const std::int64_t qkv_floats = slice.num_tokens * fwd.qkv_row();
          const std::int64_t out_floats = slice.num_tokens * c.q_dim();
          st.remote_qkv.resize(static_cast<std::size_t>(qkv_floats));
          st.remote_out.resize(static_cast<std::size_t>(out_floats));
          transport_->transfer(here, there, qkv, st.remote_qkv.data(), qkv_floats * static_cast<std::int64_t>(sizeof(float)),
                               TransferKind::kRemoteAttention);
          fwd.attend_local(slice, st.remote_qkv.data(), kv, st.remote_out.data());
          transport_->transfer(there, here, st.remote_out.data(), out, out_floats * static_cast<std::int64_t>(sizeof(float)),
                               TransferKind::kRemoteAttention);
        });
  }
  if (s + 1 < stages_.size()) {
    auto& dst = slot.input[s + 1];
    dst.resize(static_cast<std::size_t>(slot.num_tokens * H));
    if (slot.num_tokens > 0) {
      transport_->transfer(stage.global_device, stages_[s + 1].global_device, st.work.data(), dst.data(),
                           slot.num_tokens * H * static_cast<std::int64_t>(sizeof(float)), TransferKind::kActivation);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      state_[s + 1].queue.push_back(w);
    }
    stage_cv_[s + 1]->notify_one();
    return;
  }
  // Last stage: logits and sampling, in plan order.
  const std::int64_t V = c.vocab_size;
  const auto R = static_cast<std::int64_t>(slot.logit_rows.size());
  if (R > 0) {
    st.logits.resize(static_cast<std::size_t>(R * V));
    fwd.logits(dev.head_weights(), st.work.data(), slot.logit_rows, st.logits.data());
    std::int64_t r = 0;
    for (const engine::ScheduledSequence& seq : plan.sequences) {
      if (!seq.sample) continue;
      slot.result.sampled_tokens.push_back(
          model::sample_token(st.logits.data() + r * V, V, seq.sampling, seq.sample_index, &st.sample_scratch));
      ++r;
    }
  }
  slot.result.duration_us = (now_ns() - w.start_ns) / 1000;
  if (!workers_.empty()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_.push_back(w.slot);
      --in_flight_;
    }
    done_cv_.notify_one();
  }
}

void PipelineExecutor::worker_loop(std::size_t s) {
  StageState& st = state_[s];
  while (true) {
    Work w;
    {
      std::unique_lock<std::mutex> lock(mu_);
      const std::int64_t wait_start = now_ns();
      const bool had_work = in_flight_ > 0;
      stage_cv_[s]->wait(lock, [&] { return shutting_down_ || !st.queue.empty(); });
      if (shutting_down_) return;
      if (had_work) st.idle_ns += now_ns() - wait_start;
      w = st.queue.front();
      st.queue.pop_front();
    }
    const std::int64_t start = now_ns();
    run_stage(s, w);
    st.busy_ns += now_ns() - start;
  }
}

void PipelineExecutor::submit(int slot, const engine::StepPlan* plan) {
  KUN_CHECK(slot >= 0 && slot < max_in_flight()) << "slot " << slot;
  do_swaps(*plan);
  prepare(slot, *plan);
  Work w{slot, plan, now_ns()};
  {
    std::lock_guard<std::mutex> lock(mu_);
    state_[0].queue.push_back(w);
    ++in_flight_;
  }
  stage_cv_[0]->notify_one();
}

std::pair<int, engine::StepResult> PipelineExecutor::wait_any() {
  if (workers_.empty()) {
    // One stage: run the oldest submitted step here, on the engine thread.
    Work w;
    {
      std::lock_guard<std::mutex> lock(mu_);
      KUN_CHECK(!state_[0].queue.empty()) << "wait_any with nothing submitted";
      w = state_[0].queue.front();
      state_[0].queue.pop_front();
      --in_flight_;
    }
    const std::int64_t start = now_ns();
    run_stage(0, w);
    state_[0].busy_ns += now_ns() - start;
    return {w.slot, std::move(slots_[static_cast<std::size_t>(w.slot)].result)};
  }
  int slot;
  {
    std::unique_lock<std::mutex> lock(mu_);
    KUN_CHECK(in_flight_ > 0 || !done_.empty()) << "wait_any with nothing submitted";
    done_cv_.wait(lock, [&] { return !done_.empty(); });
    slot = done_.front();
    done_.pop_front();
  }
  return {slot, std::move(slots_[static_cast<std::size_t>(slot)].result)};
}

engine::StepResult PipelineExecutor::execute(const engine::StepPlan& plan) {
  submit(0, &plan);
  return wait_any().second;
}

}  // namespace kun::runtime
