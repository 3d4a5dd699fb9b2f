#include "runtime/local_executor.h"

#include <chrono>
#include <cstring>
#include <span>

#include "common/check.h"
#include "model/sampling.h"

namespace kun::runtime {

LocalExecutor::LocalExecutor(VirtualDevice* device, std::int64_t host_swap_blocks)
    : device_(device), block_bytes_(device->kv_storage().block_bytes()) {
  host_swap_.resize(static_cast<std::size_t>(host_swap_blocks * block_bytes_));
}

engine::StepResult LocalExecutor::execute(const engine::StepPlan& plan) {
  const auto t0 = std::chrono::steady_clock::now();
  kv::KvStorage& storage = device_->kv_storage();
  const auto host_slot = [&](std::int64_t slot) {
    KUN_CHECK(slot >= 0 && (slot + 1) * block_bytes_ <= static_cast<std::int64_t>(host_swap_.size()))
        << "host swap slot " << slot;
    return host_swap_.data() + slot * block_bytes_;
  };
  for (const engine::BlockCopy& c : plan.swap_out) {
    storage.read_block(kv::BlockId(c.src), {host_slot(c.dst), static_cast<std::size_t>(block_bytes_)});
  }
  for (const engine::BlockCopy& c : plan.swap_in) {
    storage.write_block(kv::BlockId(c.dst), {host_slot(c.src), static_cast<std::size_t>(block_bytes_)});
  }

  const model::ModelConfig& config = device_->config();
  const std::int64_t L = config.num_layers;
  const std::int64_t H = config.hidden_size;
  const auto num_seqs = static_cast<std::int64_t>(plan.sequences.size());
  tokens_.clear();
  slices_.clear();
  logit_rows_.clear();
  block_ptrs_.resize(static_cast<std::size_t>(num_seqs * L));
  std::int64_t row = 0;
  for (std::int64_t s = 0; s < num_seqs; ++s) {
    const engine::ScheduledSequence& seq = plan.sequences[static_cast<std::size_t>(s)];
    tokens_.insert(tokens_.end(), seq.tokens.begin(), seq.tokens.end());
    const auto n = static_cast<std::int64_t>(seq.tokens.size());
    slices_.push_back({seq.start_pos, n});
    row += n;
    if (seq.sample) logit_rows_.push_back(row - 1);
    for (auto& ptrs : std::span(block_ptrs_).subspan(static_cast<std::size_t>(s * L), static_cast<std::size_t>(L))) {
      ptrs.clear();
    }
    for (const engine::LayerBlockList& list : seq.kv) {
      KUN_CHECK_EQ(list.device, 0) << "local executor has one device";
      auto& ptrs = block_ptrs_[static_cast<std::size_t>(s * L + list.layer)];
      for (std::int64_t b : list.blocks) ptrs.push_back(reinterpret_cast<float*>(storage.block_data(kv::BlockId(b))));
    }
  }
  const std::int64_t M = row;
  engine::StepResult result;
  if (M > 0) {
    if (static_cast<std::int64_t>(hidden_.size()) < M * H) hidden_.resize(static_cast<std::size_t>(M * H));
    model::ForwardPass& fwd = device_->forward();
    const model::HeadWeights head = device_->head_weights();
    fwd.embed(head, tokens_.data(), M, hidden_.data());
    fwd.run_layers(
        0, L, slices_, hidden_.data(), [&](std::int64_t l) { return device_->layer_weights(l); },
        [&](std::int64_t l, std::int64_t s, const model::SequenceSlice& slice, const float* qkv, float* out) {
          const auto& ptrs = block_ptrs_[static_cast<std::size_t>(s * L + l)];
          fwd.attend_local(slice, qkv, model::LayerKv{ptrs.data(), static_cast<std::int64_t>(ptrs.size())}, out);
        });
    const std::int64_t V = config.vocab_size;
    const auto R = static_cast<std::int64_t>(logit_rows_.size());
    if (static_cast<std::int64_t>(logits_.size()) < R * V) logits_.resize(static_cast<std::size_t>(R * V));
    fwd.logits(head, hidden_.data(), logit_rows_, logits_.data());
    std::int64_t r = 0;
    for (const engine::ScheduledSequence& seq : plan.sequences) {
      if (!seq.sample) continue;
      result.sampled_tokens.push_back(
          model::sample_token(logits_.data() + r * V, V, seq.sampling, seq.sample_index, &sample_scratch_));
      ++r;
    }
  }
  ++steps_;
  result.duration_us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

}  // namespace kun::runtime
