#include "engine/step_cost.h"

#include "common/check.h"

namespace kun::engine {

StepCostModel StepCostModel::for_shape(double num_params, std::int64_t num_layers, std::int64_t hidden_size,
                                       double flops_per_us, double fixed_us) {
  KUN_CHECK(num_params > 0 && num_layers > 0 && hidden_size > 0) << "model shape";
  KUN_CHECK(flops_per_us > 0 && fixed_us >= 0) << "cost scale";
  StepCostModel m;
  m.fixed_us = fixed_us;
  m.per_token_us = 2.0 * num_params / flops_per_us;
  m.per_context_token_us = 4.0 * static_cast<double>(num_layers) * static_cast<double>(hidden_size) / flops_per_us;
  return m;
}

double StepCostModel::attention_pairs(std::int64_t context_tokens, std::int64_t new_tokens) {
  const auto n = static_cast<double>(new_tokens);
  return n * static_cast<double>(context_tokens) + n * (n + 1.0) / 2.0;
}

double StepCostModel::sequence_us(std::int64_t context_tokens, std::int64_t new_tokens) const {
  if (new_tokens <= 0) return 0.0;
  return per_token_us * static_cast<double>(new_tokens) +
         per_context_token_us * attention_pairs(context_tokens, new_tokens);
}

double StepCostModel::plan_us(const StepPlan& plan) const {
  if (plan.sequences.empty()) return 0.0;
  double us = fixed_us;
  for (const ScheduledSequence& s : plan.sequences) {
    us += sequence_us(s.start_pos, static_cast<std::int64_t>(s.tokens.size()));
  }
  return us;
}

}  // namespace kun::engine
