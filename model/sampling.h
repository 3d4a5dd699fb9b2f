// Token sampling: greedy, temperature, top-k, top-p with a per-request seed. Deterministic: the
// token drawn depends only on (logits, params, seed, index of the generated token), never on the
// batch, the device or the time, so preemption, drop and migration cannot change a sample.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"

namespace kun::model {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  std::int64_t top_k = 0;    // 0: off
  std::uint64_t seed = 0;    // per-request sampling seed
};

// Checks ranges: temperature finite and >= 0, top_p in (0, 1], top_k >= 0.
Status validate_sampling(const SamplingParams& params);

// `step` is the index of the token being generated (0 for the first output token).
// scratch is reused between calls to avoid allocation.
std::int32_t sample_token(const float* logits, std::int64_t vocab_size, const SamplingParams& params,
                          std::uint64_t step, std::vector<float>* scratch);

}  // namespace kun::model
