#include "sim/sim_executor.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include "common/check.h"

namespace kun::sim {
namespace {

std::vector<const engine::StepPlan*> pointers_to(const std::vector<engine::StepPlan>& plans) {
  std::vector<const engine::StepPlan*> out;
  out.reserve(plans.size());
  for (const auto& p : plans) out.push_back(&p);
  return out;
}

}  // namespace

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

SimExecutor::StepCost SimExecutor::forward(const std::vector<MicroBatch>& micro_batches) const {
  StepCost out;
  const auto g = static_cast<std::int64_t>(config_.stage_layers.size());
  if (g == 1) {
    KUN_CHECK_LE(micro_batches.size(), 1u) << "an independent instance runs one batch a step";
    if (!micro_batches.empty() && !micro_batches[0].work.empty()) {
      out.us = cost_->step_us(micro_batches[0].work, config_.stage_layers[0], true, true);
    }
    return out;
  }
  KUN_CHECK_LE(static_cast<std::int64_t>(micro_batches.size()), g) << "more micro-batches than virtual engines";
  // t[m][s]: micro-batch m's time on stage s, its activations' hop to the next stage included.
  std::vector<double> stage_busy(static_cast<std::size_t>(g), 0.0);
  double slowest_trip = 0.0;  // one micro-batch through every stage
  std::map<std::pair<std::int32_t, std::int32_t>, std::int64_t> remote_tokens;  // (layer, holder) -> tokens
  for (const MicroBatch& mb : micro_batches) {
    if (mb.work.empty()) continue;
    std::vector<double> t(static_cast<std::size_t>(g), 0.0);
    std::int64_t tokens = 0;
    for (const SeqWork& w : mb.work) tokens += w.new_tokens;
    const CostModel::BatchTerms terms = cost_->batch_terms(mb.work);  // once for the g stages
    for (std::int64_t s = 0; s < g; ++s) {
      t[static_cast<std::size_t>(s)] =
          cost_->step_us(terms, config_.stage_layers[static_cast<std::size_t>(s)], s == 0, s == g - 1, false);
      if (s + 1 < g) t[static_cast<std::size_t>(s)] += transfer_us(config_.stage_link, cost_->activation_bytes(tokens));
    }
    // Remote attention: the stage running the layer waits for q/k/v to reach the holder and the
    // output to come back, one message each way per (layer, holder) of this micro-batch.
    remote_tokens.clear();
    for (std::size_t i = 0; i < mb.remote.size(); ++i) {
      for (const RemoteLayer& rl : mb.remote[i]) remote_tokens[{rl.layer, rl.holder}] += mb.work[i].new_tokens;
    }
    for (const auto& [key, n] : remote_tokens) {
      const std::int64_t send = cost_->remote_attention_send_bytes(n);
      const std::int64_t ret = cost_->remote_attention_return_bytes(n);
      const double us = transfer_us(config_.stage_link, send) + transfer_us(config_.stage_link, ret);
      t[static_cast<std::size_t>(layer_stage_[static_cast<std::size_t>(key.first)])] += us;
      out.remote.bytes += send + ret;
      out.remote.stage_us += us;
    }
    double trip = 0.0;
    for (std::int64_t s = 0; s < g; ++s) {
      stage_busy[static_cast<std::size_t>(s)] += t[static_cast<std::size_t>(s)];
      trip += t[static_cast<std::size_t>(s)];
    }
    slowest_trip = std::max(slowest_trip, trip);
  }
  double busiest = 0.0;
  for (double b : stage_busy) {
    busiest = std::max(busiest, b);
    out.stage_busy_us += b;
  }
  const double round = std::max(busiest, slowest_trip);
  if (round <= 0.0) return out;
  out.stage_idle_us = static_cast<double>(g) * round - out.stage_busy_us;
  out.us = cost_->gpu().step_overhead_us + round;
  return out;
}

SimExecutor::StepCost SimExecutor::cost(const std::vector<const engine::StepPlan*>& micro_batches) const {
  const bool fused = num_stages() > 1;
  std::vector<MicroBatch> batches;
  std::int64_t copies = 0;
  std::int64_t waits = 0;
  for (const engine::StepPlan* plan : micro_batches) {
    MicroBatch mb;
    mb.work.reserve(plan->sequences.size());
    if (fused) mb.remote.resize(plan->sequences.size());
    for (std::size_t i = 0; i < plan->sequences.size(); ++i) {
      const auto& s = plan->sequences[i];
      mb.work.push_back(SeqWork{s.start_pos, static_cast<std::int64_t>(s.tokens.size()), s.sample});
      if (!fused) continue;
      for (const engine::LayerBlockList& l : s.kv) {
        KUN_CHECK(l.layer >= 0 && static_cast<std::size_t>(l.layer) < layer_stage_.size()) << "layer " << l.layer;
        if (l.device != layer_stage_[static_cast<std::size_t>(l.layer)]) {
          mb.remote[i].push_back(RemoteLayer{l.layer, l.device});
        }
      }
    }
    batches.push_back(std::move(mb));
    copies += static_cast<std::int64_t>(plan->swap_out.size() + plan->swap_in.size());
    waits += (plan->swap_out.empty() ? 0 : 1) + (plan->swap_in.empty() ? 0 : 1);
  }
  StepCost c = forward(batches);
  const std::int64_t block_bytes = config_.block_size_tokens * cost_->kv_bytes_per_token_per_layer();
  if (copies > 0) {
    c.copy_us = transfer_us(config_.host_link, copies * block_bytes);
    c.us += c.copy_us;
    c.copy_waits = waits;
  }
  return c;
}

std::int64_t SimExecutor::duration_us(const engine::StepPlan& plan) const {
  return static_cast<std::int64_t>(std::ceil(cost({&plan}).us));
}

std::int64_t SimExecutor::round_duration_us(const std::vector<engine::StepPlan>& micro_batches) const {
  return static_cast<std::int64_t>(std::ceil(cost(pointers_to(micro_batches)).us));
}

SimExecutor::RemoteAttention SimExecutor::remote_attention(const engine::StepPlan& plan) const {
  return cost({&plan}).remote;
}

engine::StepResult SimExecutor::execute(const engine::StepPlan& plan) { return run_round({&plan}).front(); }

std::vector<engine::StepResult> SimExecutor::execute_round(const std::vector<engine::StepPlan>& micro_batches) {
  return run_round(pointers_to(micro_batches));
}

std::vector<engine::StepResult> SimExecutor::run_round(const std::vector<const engine::StepPlan*>& micro_batches) {
  const StepCost c = cost(micro_batches);
  const auto duration = static_cast<std::int64_t>(std::ceil(c.us));
  counters_.remote_attention_bytes += c.remote.bytes;
  counters_.remote_attention_us += static_cast<std::int64_t>(std::llround(c.remote.stage_us));
  counters_.stage_busy_us += c.stage_busy_us;
  counters_.stage_idle_us += c.stage_idle_us;
  counters_.last_round_copy_us = c.copy_us;
  counters_.last_round_copy_waits = c.copy_waits;
  ++counters_.steps;
  counters_.busy_us += duration;
  const std::int64_t block_bytes = config_.block_size_tokens * cost_->kv_bytes_per_token_per_layer();
  std::vector<engine::StepResult> results;
  for (const engine::StepPlan* p : micro_batches) {
    const engine::StepPlan& plan = *p;
    engine::StepResult result;
    for (const auto& s : plan.sequences) {
      if (s.sample) result.sampled_tokens.push_back(token_for(s.id, s.sample_index));
    }
    result.duration_us = duration;
    counters_.swap_bytes += static_cast<std::int64_t>(plan.swap_out.size() + plan.swap_in.size()) * block_bytes;
    if (num_stages() > 1) counters_.activation_bytes += (num_stages() - 1) * cost_->activation_bytes(plan.num_tokens());
    results.push_back(std::move(result));
  }
  return results;
}

}  // namespace kun::sim
