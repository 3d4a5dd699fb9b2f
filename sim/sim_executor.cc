#include "sim/sim_executor.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include "common/check.h"

namespace kun::sim {

SimExecutor::SimExecutor(const CostModel* cost, SimExecutorConfig config) : cost_(cost), config_(std::move(config)) {
  KUN_CHECK(cost_ != nullptr);
  if (config_.stage_layers.empty()) config_.stage_layers = {cost_->model().num_layers};
  const std::int64_t total = std::accumulate(config_.stage_layers.begin(), config_.stage_layers.end(), std::int64_t{0});
  KUN_CHECK_EQ(total, cost_->model().num_layers) << "stages must cover every layer once";
  KUN_CHECK_GT(config_.vocab_size, 1);
  KUN_CHECK_GT(config_.block_size_tokens, 0);
  for (std::size_t s = 0; s < config_.stage_layers.size(); ++s) {
    for (std::int64_t l = 0; l < config_.stage_layers[s]; ++l) layer_stage_.push_back(static_cast<std::int32_t>(s));
  }
}

std::int32_t SimExecutor::token_for(RequestId id, std::uint64_t sample_index) const {
  // splitmix64 of (id, index): deterministic, independent of batching.
  std::uint64_t x = static_cast<std::uint64_t>(id.value) * 0x9E3779B97F4A7C15ull + sample_index + 1;
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  auto token = static_cast<std::int32_t>(x % static_cast<std::uint64_t>(config_.vocab_size));
  if (token == config_.eos_token_id) token = static_cast<std::int32_t>((token + 1) % config_.vocab_size);
  return token;
}

SimExecutor::StepCost SimExecutor::forward(const std::vector<SeqWork>& work,
                                            const std::vector<std::vector<RemoteLayer>>& remote) const {
  StepCost out;
  if (work.empty()) return out;
  const auto g = static_cast<std::int64_t>(config_.stage_layers.size());
  if (g == 1) {
    out.us = cost_->step_us(work, config_.stage_layers[0], true, true);
    return out;
  }
  // Micro-batches: longest-first greedy partition by new tokens into g bins.
  std::vector<std::size_t> order(work.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return work[a].new_tokens > work[b].new_tokens; });
  std::vector<std::vector<std::size_t>> bins(static_cast<std::size_t>(g));
  std::vector<std::int64_t> load(static_cast<std::size_t>(g), 0);
  for (std::size_t i : order) {
    const auto bin = static_cast<std::size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    bins[bin].push_back(i);
    load[bin] += work[i].new_tokens;
  }
  // g virtual engines keep the pipeline full across steps (DESIGN.md 3.4): in steady state each
  // stage works through the g micro-batches back to back, so a round takes as long as the
  // busiest stage's sum over micro-batches; the fill / drain of an empty pipeline is not paid
  // every step. Imbalance between micro-batches shows up as the bottleneck stage's excess.
  std::vector<double> stage_busy(static_cast<std::size_t>(g), 0.0);
  std::vector<SeqWork> mb;
  std::map<std::pair<std::int32_t, std::int32_t>, std::int64_t> remote_tokens;  // (layer, holder) -> tokens
  for (std::size_t m = 0; m < bins.size(); ++m) {
    if (bins[m].empty()) continue;
    mb.clear();
    remote_tokens.clear();
    for (std::size_t i : bins[m]) {
      mb.push_back(work[i]);
      if (i < remote.size()) {
        for (const RemoteLayer& rl : remote[i]) remote_tokens[{rl.layer, rl.holder}] += work[i].new_tokens;
      }
    }
    for (std::int64_t s = 0; s < g; ++s) {
      double t = cost_->step_us(mb, config_.stage_layers[static_cast<std::size_t>(s)], s == 0, s == g - 1, false);
      if (s + 1 < g) t += transfer_us(config_.stage_link, cost_->activation_bytes(load[m]));
      stage_busy[static_cast<std::size_t>(s)] += t;
    }
    // Remote attention: the stage running the layer waits for q/k/v to reach the holder and the
    // output to come back, one message each way per (layer, holder) of this micro-batch.
    for (const auto& [key, tokens] : remote_tokens) {
      const std::int64_t send = cost_->remote_attention_send_bytes(tokens);
      const std::int64_t ret = cost_->remote_attention_return_bytes(tokens);
      const double t = transfer_us(config_.stage_link, send) + transfer_us(config_.stage_link, ret);
      stage_busy[static_cast<std::size_t>(layer_stage_[static_cast<std::size_t>(key.first)])] += t;
      out.remote.bytes += send + ret;
      out.remote.stage_us += t;
    }
  }
  double busiest = 0.0;
  for (double t : stage_busy) busiest = std::max(busiest, t);
  out.us = cost_->gpu().step_overhead_us + busiest;
  return out;
}

SimExecutor::StepCost SimExecutor::cost(const engine::StepPlan& plan) const {
  std::vector<SeqWork> work;
  work.reserve(plan.sequences.size());
  std::vector<std::vector<RemoteLayer>> remote;
  const bool fused = num_stages() > 1;
  if (fused) remote.resize(plan.sequences.size());
  for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
    const auto& s = plan.sequences[i];
    work.push_back(SeqWork{s.start_pos, static_cast<std::int64_t>(s.tokens.size()), s.sample});
    if (!fused) continue;
    for (const engine::LayerBlockList& l : s.kv) {
      KUN_CHECK(l.layer >= 0 && static_cast<std::size_t>(l.layer) < layer_stage_.size()) << "layer " << l.layer;
      if (l.device != layer_stage_[static_cast<std::size_t>(l.layer)]) {
        remote[i].push_back(RemoteLayer{l.layer, l.device});
      }
    }
  }
  StepCost c = forward(work, remote);
  const std::int64_t block_bytes = config_.block_size_tokens * cost_->kv_bytes_per_token_per_layer();
  const auto copies = static_cast<std::int64_t>(plan.swap_out.size() + plan.swap_in.size());
  if (copies > 0) c.us += transfer_us(config_.host_link, copies * block_bytes);
  return c;
}

std::int64_t SimExecutor::duration_us(const engine::StepPlan& plan) const {
  return static_cast<std::int64_t>(std::ceil(cost(plan).us));
}

SimExecutor::RemoteAttention SimExecutor::remote_attention(const engine::StepPlan& plan) const {
  return cost(plan).remote;
}

engine::StepResult SimExecutor::execute(const engine::StepPlan& plan) {
  engine::StepResult result;
  for (const auto& s : plan.sequences) {
    if (s.sample) result.sampled_tokens.push_back(token_for(s.id, s.sample_index));
  }
  const StepCost c = cost(plan);
  result.duration_us = static_cast<std::int64_t>(std::ceil(c.us));
  counters_.remote_attention_bytes += c.remote.bytes;
  counters_.remote_attention_us += static_cast<std::int64_t>(std::llround(c.remote.stage_us));
  ++counters_.steps;
  counters_.busy_us += result.duration_us;
  const std::int64_t block_bytes = config_.block_size_tokens * cost_->kv_bytes_per_token_per_layer();
  counters_.swap_bytes += static_cast<std::int64_t>(plan.swap_out.size() + plan.swap_in.size()) * block_bytes;
  if (num_stages() > 1) counters_.activation_bytes += (num_stages() - 1) * cost_->activation_bytes(plan.num_tokens());
  return result;
}

}  // namespace kun::sim
