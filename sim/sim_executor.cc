#include "sim/sim_executor.h"

#include <algorithm>
#include <cmath>
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

double SimExecutor::forward_us(const std::vector<SeqWork>& work) const {
  if (work.empty()) return 0.0;
  const auto g = static_cast<std::int64_t>(config_.stage_layers.size());
  if (g == 1) return cost_->step_us(work, config_.stage_layers[0], true, true);
  // Micro-batches: longest-first greedy partition by new tokens into g bins.
  std::vector<std::size_t> order(work.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return work[a].new_tokens > work[b].new_tokens; });
  std::vector<std::vector<SeqWork>> mbs(static_cast<std::size_t>(g));
  std::vector<std::int64_t> load(static_cast<std::size_t>(g), 0);
  for (std::size_t i : order) {
    const auto bin = static_cast<std::size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    mbs[bin].push_back(work[i]);
    load[bin] += work[i].new_tokens;
  }
  // g virtual engines keep the pipeline full across steps (DESIGN.md 3.4): in steady state each
  // stage works through the g micro-batches back to back, so a round takes as long as the
  // busiest stage's sum over micro-batches; the fill / drain of an empty pipeline is not paid
  // every step. Imbalance between micro-batches shows up as the bottleneck stage's excess.
  std::vector<double> stage_busy(static_cast<std::size_t>(g), 0.0);
  for (std::size_t m = 0; m < mbs.size(); ++m) {
    if (mbs[m].empty()) continue;
    for (std::int64_t s = 0; s < g; ++s) {
      double t = cost_->step_us(mbs[m], config_.stage_layers[static_cast<std::size_t>(s)], s == 0, s == g - 1, false);
      if (s + 1 < g) t += transfer_us(config_.stage_link, cost_->activation_bytes(load[m]));
      stage_busy[static_cast<std::size_t>(s)] += t;
    }
  }
  double busiest = 0.0;
  for (double t : stage_busy) busiest = std::max(busiest, t);
  return cost_->gpu().step_overhead_us + busiest;
}

std::int64_t SimExecutor::duration_us(const engine::StepPlan& plan) const {
  std::vector<SeqWork> work;
  work.reserve(plan.sequences.size());
  for (const auto& s : plan.sequences) {
    work.push_back(SeqWork{s.start_pos, static_cast<std::int64_t>(s.tokens.size()), s.sample});
  }
  double us = forward_us(work);
  const std::int64_t block_bytes = config_.block_size_tokens * cost_->kv_bytes_per_token_per_layer();
  const auto copies = static_cast<std::int64_t>(plan.swap_out.size() + plan.swap_in.size());
  if (copies > 0) us += transfer_us(config_.host_link, copies * block_bytes);
  return static_cast<std::int64_t>(std::ceil(us));
}

engine::StepResult SimExecutor::execute(const engine::StepPlan& plan) {
  engine::StepResult result;
  for (const auto& s : plan.sequences) {
    if (s.sample) result.sampled_tokens.push_back(token_for(s.id, s.sample_index));
  }
  result.duration_us = duration_us(plan);
  ++counters_.steps;
  counters_.busy_us += result.duration_us;
  const std::int64_t block_bytes = config_.block_size_tokens * cost_->kv_bytes_per_token_per_layer();
  counters_.swap_bytes += static_cast<std::int64_t>(plan.swap_out.size() + plan.swap_in.size()) * block_bytes;
  if (num_stages() > 1) counters_.activation_bytes += (num_stages() - 1) * cost_->activation_bytes(plan.num_tokens());
  return result;
}

}  // namespace kun::sim
