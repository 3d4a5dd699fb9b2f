// The request API every serving front end talks to (DESIGN.md section 6): submit, stream,
// cancel, stats. Implemented by one instance's engine and by the cluster's router; used by the
// HTTP server, the generate command and tests.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "common/ids.h"
#include "common/status.h"
#include "model/sampling.h"

namespace kun::engine {

using SamplingParams = model::SamplingParams;

struct RequestSpec {
  std::vector<std::int32_t> prompt_tokens;
  SamplingParams sampling;
  std::int64_t max_tokens = 16;
  std::vector<std::int32_t> stop_token_ids;  // in addition to the model's EOS
  bool ignore_eos = false;
};

enum class FinishReason { kNone, kLength, kStop, kCancelled, kError };
const char* finish_reason_name(FinishReason r);  // "length", "stop", "cancelled", "error"

// Timestamps in microseconds of the serving Clock; -1 while unknown.
struct RequestTimings {
  std::int64_t arrival_us = -1;
  std::int64_t first_scheduled_us = -1;
  std::int64_t first_token_us = -1;
  std::int64_t finish_us = -1;
};

// One event per generated token, and a final event (finished = true) that may carry the last
// token. Delivered in order, from the serving thread: a callback must not block.
struct TokenEvent {
  RequestId id;
  std::int32_t token = -1;  // -1: no token in this event
  std::int64_t time_us = 0;
  bool finished = false;
  FinishReason reason = FinishReason::kNone;
  Status error;  // set when reason == kError
  std::int64_t num_prompt_tokens = 0;
  std::int64_t num_generated_tokens = 0;  // including this event's token
  std::int64_t num_recomputed_tokens = 0; // prefill work redone so far (recompute preemption, or
                                          // a transition that dropped its KV)
  std::int64_t num_transition_recomputed_tokens = 0;  // of those, redone after a transition
  RequestTimings timings;                 // complete on the final event
};
using TokenCallback = std::function<void(const TokenEvent&)>;

// Load and memory figures of one instance (or fused group member), for metrics and routing.
struct InstanceStats {
  std::int64_t instance = 0;
  std::int64_t num_running = 0;
  std::int64_t num_waiting = 0;
  std::int64_t kv_blocks_total = 0;
  std::int64_t kv_blocks_free = 0;
  double demand = 0.0;  // KV blocks needed by running + waiting at current lengths / capacity
  std::int64_t blocks_demanded = 0;  // the numerator of demand
  std::int64_t pending_blocks = 0;   // blocks wanted by not-yet-admitted requests
  std::int64_t group = -1;      // fused group id, -1 when independent
  std::string group_state = "INITIAL";  // INITIAL | DROPPED | RESTORING
  std::int64_t dropped_param_bytes = 0;
};

struct ServingStats {
  std::vector<InstanceStats> instances;
  std::int64_t num_preemptions = 0;
  std::int64_t recomputed_tokens_total = 0;  // tokens computed again (preemption, drop/restore)
  std::int64_t transition_recomputed_tokens_total = 0;  // of those, after drop/restore/migration lost KV
  std::int64_t prompt_tokens_total = 0;
  std::int64_t generation_tokens_total = 0;
  std::int64_t requests_finished_total = 0;
  std::int64_t kv_blocks_exchanged_total = 0;
  std::int64_t drops_total = 0;
  std::int64_t restores_total = 0;
  std::int64_t grows_total = 0;    // fused groups grown g -> 2g (runtime/cluster_regroup.cc)
  std::int64_t shrinks_total = 0;  // fused groups halved (partial restores)
  // Transitions that failed and were rolled back (or left to retry), by kind: drop, restore,
  // split (ClusterRuntime::transition_failures()).
  std::map<std::string, std::int64_t> transition_failures_total;
  std::vector<double> drop_latency_ms;     // one entry per completed drop, newest last
  std::vector<double> drop_quiesce_ms;     // of each: until its sources' steps in flight ended
  std::vector<std::int64_t> drop_layers;   // of each: layers freed over all its members
  std::vector<double> restore_latency_ms;  // one entry per completed restore, newest last
  // Fused pipelines (groups of g > 1 stages), over their whole lifetime: stage time spent running
  // steps, and stage time idle while the group had a step in flight (bubbles).
  double pipeline_stage_busy_s = 0.0;
  double pipeline_stage_idle_s = 0.0;
};

struct ModelInfo {
  std::string name;
  std::int64_t max_context_tokens = 0;
  std::int64_t vocab_size = 0;
  std::int32_t eos_token_id = -1;
};

class FrontDoor {
 public:
  virtual ~FrontDoor() = default;
  virtual const ModelInfo& model_info() const = 0;
  // Errors: kInvalidArgument (empty prompt, bad sampling values), kOutOfRange (prompt +
  // max_tokens beyond the context), kOverloaded (bounded queue full; retry later),
  // kUnavailable (shutting down). On success the callback will see exactly one final event.
  virtual StatusOr<RequestId> submit(RequestSpec spec, TokenCallback on_event) = 0;
  // Cancels a request: its blocks are freed at once and its final event has reason kCancelled.
  // Cancelling an unknown or finished request is a no-op.
  virtual void cancel(RequestId id) = 0;
  virtual ServingStats stats() const = 0;
};

}  // namespace kun::engine
