// Replays a trace against a FrontDoor in this process (no HTTP): submits each request at its
// arrival time on the wall clock, records TTFT / token times / queue time from the token events,
// and samples the front door's stats into gauges for the timeline. Used by `kunserve bench
// --in-process` (the burst demo) and by the cluster benchmark.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/api.h"
#include "workload/report.h"
#include "workload/trace.h"

namespace kun::tools {

struct ReplayOptions {
  std::int64_t vocab_size = 0;
  std::int32_t first_token_id = 3;    // prompts use ids in [first_token_id, vocab)
  std::uint64_t seed = 0;
  std::int64_t gauge_period_ms = 250;
  std::int64_t timeout_s = 600;       // give up waiting for stragglers after this
  bool progress = false;
};

struct ReplayResult {
  std::vector<workload::RequestRecord> records;
  std::vector<workload::GaugeSample> gauges;
  double wall_s = 0.0;
};

// Synthetic prompt token ids for a trace request (deterministic for seed and index).
std::vector<std::int32_t> replay_prompt(std::uint64_t seed, std::size_t index, std::int32_t length,
                                        std::int32_t first_token_id, std::int64_t vocab_size);

ReplayResult replay_in_process(engine::FrontDoor& front, const workload::Trace& trace, const ReplayOptions& options);

}  // namespace kun::tools
