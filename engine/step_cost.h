// Predicted step time, for balancing the micro-batches of a fused group's virtual engines
// (engine/scheduler.h, lookahead batch formation). Not a timing model: sim/cost_model.h is the
// calibrated one. The scheduler only compares predictions with each other, so what matters is the
// ratio of the three terms; their unit is microseconds when the model comes from for_shape with a
// device's sustained FLOP rate, and any unit shared by all three fields otherwise.
//
//   step = fixed_us + sum over sequences of
//          per_token_us * n + per_context_token_us * (n * c + n * (n + 1) / 2)
//
// for a sequence computing n new tokens after c cached ones: the linear layers cost per token,
// attention per (query, key) pair, and the i-th new token attends to the c cached keys and,
// causally, to i new ones (itself included).
#pragma once

#include <cstdint>

#include "engine/step.h"

namespace kun::engine {

struct StepCostModel {
  // The defaults are for_shape(7e9, 32, 4096) (a Llama-2-7B-sized model) at
  // kDefaultFlopsPerUs, so a caller that never sets the model still balances sensibly.
  double fixed_us = 1000.0;              // per step: launch, scheduling, sampling
  double per_token_us = 140.0;           // linear layers, per new token
  double per_context_token_us = 0.00524288;  // attention, per (query, key) pair

  static constexpr double kDefaultFlopsPerUs = 1e8;  // 100 TFLOP/s sustained
  static constexpr double kDefaultFixedUs = 1000.0;

  // From the model's shape: a token's linear layers cost ~2 * num_params FLOPs (use the decoder
  // layers' parameters: the embedding is a gather), attention ~4 * num_layers * hidden_size
  // FLOPs per (query, key) pair (QK^T and AV, 2 * hidden each). flops_per_us: the sustained
  // compute rate that turns FLOPs into microseconds.
  static StepCostModel for_shape(double num_params, std::int64_t num_layers, std::int64_t hidden_size,
                                 double flops_per_us = kDefaultFlopsPerUs, double fixed_us = kDefaultFixedUs);

  // (query, key) pairs of n new tokens after c cached: n * c + n * (n + 1) / 2.
  static double attention_pairs(std::int64_t context_tokens, std::int64_t new_tokens);
  // One sequence's share of a step (no fixed cost); 0 for no new tokens.
  double sequence_us(std::int64_t context_tokens, std::int64_t new_tokens) const;
  // A planned step: fixed_us + its sequences; 0 for a plan without sequences (it runs no forward).
  double plan_us(const StepPlan& plan) const;
};

}  // namespace kun::engine
