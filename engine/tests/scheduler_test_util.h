// Helpers shared by the scheduler tests: a request spec and a step applied as if the model ran it.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/scheduler.h"

namespace kun::engine::testing {

// A prompt of `prompt` copies of token 7 that generates exactly max_tokens tokens.
inline RequestSpec spec(std::int64_t prompt, std::int64_t max_tokens) {
  RequestSpec s;
  s.prompt_tokens.assign(static_cast<std::size_t>(prompt), 7);
  s.max_tokens = max_tokens;
  s.ignore_eos = true;
  return s;
}

// Applies a step as if it ran (every sampled token is 5); returns its token events.
inline std::vector<TokenEvent> apply(Scheduler& s, const StepPlan& plan) {
  StepResult result;
  for (const auto& seq : plan.sequences) {
    if (seq.sample) result.sampled_tokens.push_back(5);
  }
  return s.apply_result(plan, result);
}

}  // namespace kun::engine::testing
