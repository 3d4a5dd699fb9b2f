// A request as the engine sees it. Owned by the engine thread (the scheduler's state).
#pragma once

#include <cstdint>
#include <vector>

#include "common/ids.h"
#include "engine/api.h"

namespace kun::engine {

enum class RequestState { kWaiting, kRunning, kSwapped, kFinished };
const char* request_state_name(RequestState s);

struct Request {
  RequestId id;
  RequestSpec spec;
  std::vector<std::int32_t> output_tokens;
  RequestState state = RequestState::kWaiting;
  // Tokens of prompt + output whose KV is in the cache; the next step computes from here, and
  // samples when it reaches num_tokens().
  std::int64_t num_computed = 0;
  // Highest num_computed ever reached: computing below it again is recomputation.
  std::int64_t max_computed = 0;
  std::int64_t virtual_engine = -1;  // while running: the virtual engine it belongs to
  RequestTimings timings;
  std::int64_t num_preemptions = 0;
  std::int64_t num_recomputed_tokens = 0;  // prefill work redone, whatever the cause
  // Of those, the work redone because a cluster transition (drop, restore, migration) dropped
  // computed KV, as against a recompute preemption under memory pressure.
  std::int64_t num_transition_recomputed_tokens = 0;
  // Why the KV between num_computed and max_computed is missing: a transition lost it (true) or a
  // recompute preemption did (false). Set where the KV is released.
  bool kv_lost_in_transition = false;
  FinishReason finish_reason = FinishReason::kNone;

  std::int64_t num_prompt_tokens() const { return static_cast<std::int64_t>(spec.prompt_tokens.size()); }
  std::int64_t num_output_tokens() const { return static_cast<std::int64_t>(output_tokens.size()); }
  std::int64_t num_tokens() const { return num_prompt_tokens() + num_output_tokens(); }
  std::int32_t token_at(std::int64_t pos) const {
    return pos < num_prompt_tokens() ? spec.prompt_tokens[static_cast<std::size_t>(pos)]
                                     : output_tokens[static_cast<std::size_t>(pos - num_prompt_tokens())];
  }
  // Tokens still to run through the model before the next sample.
  std::int64_t num_uncomputed() const { return num_tokens() - num_computed; }
};

}  // namespace kun::engine
