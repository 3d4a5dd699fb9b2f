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
    : stages_(std::move(stages)), transport_(transport) {
  KUN_CHECK(!stages_.empty());
  KUN_CHECK(stages_.size() == 1 || transport_ != nullptr) << "a pipeline needs a transport";
  block_bytes_ = stages_.front().device->kv_storage().block_bytes();
  state_.resize(stages_.size());
  for (std::size_t s = 0; s < stages_.size(); ++s) {
    const PipelineStage& st = stages_[s];
    KUN_CHECK(st.layer_begin < st.layer_end) << "stage " << s << " has no layers";
    if (s > 0) KUN_CHECK_EQ(st.layer_begin, stages_[s - 1].layer_end) << "stages must cover consecutive layers";
    for (std::int64_t l = st.layer_begin; l < st.layer_end; ++l) {
      KUN_CHECK(st.device->has_layer(l)) << "stage " << s << " lacks layer " << l;
    }
    state_[s].host_swap.resize(static_cast<std::size_t>(host_swap_blocks * block_bytes_));
  }
  KUN_CHECK_EQ(stages_.front().layer_begin, 0);
  KUN_CHECK_EQ(stages_.back().layer_end, stages_.front().device->config().num_layers);
  stages_done_.assign(stages_.size(), 0);
  ready_.assign(stages_.size(), {});
  for (std::size_t s = 1; s < stages_.size(); ++s) workers_.emplace_back([this, s] { worker_loop(s); });
}

PipelineExecutor::~PipelineExecutor() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    shutting_down_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

double PipelineExecutor::bubble_fraction() const {
  std::int64_t wait = 0, total = 0;
  for (const StageState& st : state_) {
    wait += st.wait_ns;
    total += st.wait_ns + st.busy_ns;
  }
  return total > 0 ? static_cast<double>(wait) / static_cast<double>(total) : 0.0;
}

void PipelineExecutor::do_swaps(const engine::StepPlan& plan) {
  const auto slot = [&](int device, std::int64_t index) {
    auto& host = state_[static_cast<std::size_t>(device)].host_swap;
    KUN_CHECK(index >= 0 && (index + 1) * block_bytes_ <= static_cast<std::int64_t>(host.size())) << "host swap slot " << index;
    return std::span<std::byte>(host.data() + index * block_bytes_, static_cast<std::size_t>(block_bytes_));
  };
  for (const engine::BlockCopy& c : plan.swap_out) {
    stages_[static_cast<std::size_t>(c.device)].device->kv_storage().read_block(kv::BlockId(c.src), slot(c.device, c.dst));
  }
  for (const engine::BlockCopy& c : plan.swap_in) {
    stages_[static_cast<std::size_t>(c.device)].device->kv_storage().write_block(kv::BlockId(c.dst), slot(c.device, c.src));
  }
}

void PipelineExecutor::split_micro_batches(const engine::StepPlan& plan) {
  micro_batches_.clear();
  const std::size_t n = plan.sequences.size();
  if (n == 0) return;
  const std::size_t parts = std::min(stages_.size(), n);
  const std::int64_t total = plan.num_tokens();
  micro_batches_.resize(parts);
  std::size_t mb = 0;
  std::int64_t filled = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const auto& seq = plan.sequences[i];
    const auto len = static_cast<std::int64_t>(seq.tokens.size());
    // Move on when this part reached its share and enough sequences remain for the rest.
    if (mb + 1 < parts && !micro_batches_[mb].seqs.empty() &&
        (filled >= total * static_cast<std::int64_t>(mb + 1) / static_cast<std::int64_t>(parts) || n - i <= parts - mb - 1)) {
      ++mb;
    }
    MicroBatch& m = micro_batches_[mb];
    m.seqs.push_back(i);
    m.tokens.insert(m.tokens.end(), seq.tokens.begin(), seq.tokens.end());
    m.slices.push_back({seq.start_pos, len});
    m.num_tokens += len;
    if (seq.sample) m.logit_rows.push_back(m.num_tokens - 1);
    filled += len;
  }
  micro_batches_.resize(mb + 1);
}

void PipelineExecutor::run_micro_batch(std::size_t s, std::size_t m, const engine::StepPlan& plan) {
  const PipelineStage& stage = stages_[s];
  StageState& st = state_[s];
  const MicroBatch& mb = micro_batches_[m];
  VirtualDevice& dev = *stage.device;
  const model::ModelConfig& c = dev.config();
  const std::int64_t H = c.hidden_size;
  model::ForwardPass& fwd = dev.forward();
  if (s == 0) {
    st.work.resize(static_cast<std::size_t>(mb.num_tokens * H));
    fwd.embed(dev.head_weights(), mb.tokens.data(), mb.num_tokens, st.work.data());
  } else {
    std::swap(st.work, st.input[m]);
  }
  const std::int64_t nl = stage.layer_end - stage.layer_begin;
  st.block_ptrs.resize(mb.seqs.size() * static_cast<std::size_t>(nl));
  for (auto& p : st.block_ptrs) p.clear();
  kv::KvStorage& storage = dev.kv_storage();
  for (std::size_t i = 0; i < mb.seqs.size(); ++i) {
    for (const engine::LayerBlockList& list : plan.sequences[mb.seqs[i]].kv) {
      if (list.layer < stage.layer_begin || list.layer >= stage.layer_end) continue;
      KUN_CHECK_EQ(static_cast<std::size_t>(list.device), s)
          << "layer " << list.layer << " KV lives on device " << list.device << ", not on its stage";
      auto& ptrs = st.block_ptrs[i * static_cast<std::size_t>(nl) + static_cast<std::size_t>(list.layer - stage.layer_begin)];
      for (std::int64_t b : list.blocks) ptrs.push_back(reinterpret_cast<float*>(storage.block_data(kv::BlockId(b))));
    }
  }
  fwd.run_layers(
      stage.layer_begin, stage.layer_end, mb.slices, st.work.data(), [&](std::int64_t l) { return dev.layer_weights(l); },
      [&](std::int64_t l, std::int64_t i, const model::SequenceSlice& slice, const float* qkv, float* out) {
        auto& ptrs = st.block_ptrs[static_cast<std::size_t>(i) * static_cast<std::size_t>(nl) +
                                   static_cast<std::size_t>(l - stage.layer_begin)];
        fwd.attend_local(slice, qkv, model::LayerKv{ptrs.data(), static_cast<std::int64_t>(ptrs.size())}, out);
      });
  if (s + 1 < stages_.size()) {
    StageState& next = state_[s + 1];
    auto& dst = next.input[m];
    dst.resize(static_cast<std::size_t>(mb.num_tokens * H));
    transport_->transfer(stage.global_device, stages_[s + 1].global_device, st.work.data(), dst.data(),
                         mb.num_tokens * H * static_cast<std::int64_t>(sizeof(float)), TransferKind::kActivation);
    {
      std::lock_guard<std::mutex> lock(mu_);
      ready_[s + 1][m] = step_generation_;
    }
    cv_.notify_all();
    return;
  }
  // Last stage: logits and sampling.
  const std::int64_t V = c.vocab_size;
  const auto R = static_cast<std::int64_t>(mb.logit_rows.size());
  if (R == 0) return;
  st.logits.resize(static_cast<std::size_t>(R * V));
  fwd.logits(dev.head_weights(), st.work.data(), mb.logit_rows, st.logits.data());
  std::int64_t r = 0;
  for (std::size_t i : mb.seqs) {
    const engine::ScheduledSequence& seq = plan.sequences[i];
    if (!seq.sample) continue;
    sampled_[i] = model::sample_token(st.logits.data() + r * V, V, seq.sampling, seq.sample_index, &st.sample_scratch);
    ++r;
  }
}

void PipelineExecutor::run_stage(std::size_t s, const engine::StepPlan& plan) {
  StageState& st = state_[s];
  std::int64_t generation;
  {
    std::lock_guard<std::mutex> lock(mu_);
    generation = step_generation_;
  }
  for (std::size_t m = 0; m < micro_batches_.size(); ++m) {
    if (s > 0) {
      const std::int64_t wait_start = now_ns();
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return ready_[s][m] == generation; });
      st.wait_ns += now_ns() - wait_start;
    }
    const std::int64_t start = now_ns();
    run_micro_batch(s, m, plan);
    st.busy_ns += now_ns() - start;
  }
}

void PipelineExecutor::worker_loop(std::size_t s) {
  std::int64_t seen = 0;
  while (true) {
    const engine::StepPlan* plan;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return shutting_down_ || step_generation_ > seen; });
      if (shutting_down_) return;
      seen = step_generation_;
      plan = current_plan_;
    }
    run_stage(s, *plan);
    {
      std::lock_guard<std::mutex> lock(mu_);
      stages_done_[s] = seen;
    }
    cv_.notify_all();
  }
}

engine::StepResult PipelineExecutor::execute(const engine::StepPlan& plan) {
  const auto t0 = std::chrono::steady_clock::now();
  do_swaps(plan);
  split_micro_batches(plan);
  sampled_.assign(plan.sequences.size(), -1);
  engine::StepResult result;
  if (!micro_batches_.empty()) {
    std::int64_t generation;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (std::size_t s = 0; s < stages_.size(); ++s) {
        state_[s].input.resize(micro_batches_.size());
        ready_[s].assign(micro_batches_.size(), 0);
      }
      current_plan_ = &plan;
      generation = ++step_generation_;
    }
    cv_.notify_all();
    run_stage(0, plan);
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] {
        for (std::size_t s = 1; s < stages_.size(); ++s) {
          if (stages_done_[s] != generation) return false;
        }
        return true;
      });
      current_plan_ = nullptr;
    }
    for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
      if (!plan.sequences[i].sample) continue;
      KUN_CHECK_GE(sampled_[i], 0) << "sequence " << i << " was not sampled";
      result.sampled_tokens.push_back(sampled_[i]);
    }
  }
  result.duration_us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

}  // namespace kun::runtime
