// SimExecutor: engine::StepExecutor on the cost model (DESIGN.md section 5, "Simulation").
// No real compute and no weights: a step's duration comes from CostModel and the sampled tokens
// are a deterministic hash of (request id, output index), never the EOS token.
//
// An independent instance is one stage holding all L layers. A fused group of g stages
// (stage_layers[i] layers on stage i) runs a step as a g-stage pipeline over g micro-batches
// (sequences split longest-first by tokens, one per virtual engine). The virtual engines keep the
// pipeline full across steps, so a step (a round of g micro-batches) takes as long as the
// busiest stage's summed micro-batch times, each including the hop of its activations to the
// next stage over the link; the per-step overhead is paid once.
// Swap copies (StepPlan::swap_out / swap_in) cross the host link (PCIe) before the forward.
//
// Remote attention (DESIGN.md 3.5): a sequence whose KV for layer l lies on a device other than
// the stage running l (the plan's LayerBlockList::device; a stale request before its KV exchange,
// or after the restore gather moved it to its home) costs that stage, per micro-batch, per such
// layer and KV holder, one message of q/k/v to the holder and one of the attention output back
// (`transfer_us` on the stage link each, the tokens of all such sequences in one message). The
// attention itself is charged to the stage as usual (the holder computes it instead, in the same
// time). A sequence whose KV sits where its layers run costs nothing extra.
//
// Owned by the simulator's event loop (one thread).
#pragma once

#include <cstdint>
#include <vector>

#include "engine/step.h"
#include "sim/cost_model.h"

namespace kun::sim {

struct SimExecutorConfig {
  std::vector<std::int64_t> stage_layers;  // empty: one stage with every layer
  LinkSpec host_link;                      // swap copies (PCIe)
  LinkSpec stage_link;                     // activations between pipeline stages
  std::int64_t block_size_tokens = 16;     // bytes of one swapped layer block follow from it
  std::int32_t eos_token_id = -1;          // never sampled
  std::int64_t vocab_size = 32000;
};

struct SimExecutorCounters {
  std::int64_t steps = 0;
  std::int64_t busy_us = 0;
  std::int64_t swap_bytes = 0;
  std::int64_t activation_bytes = 0;
  std::int64_t remote_attention_bytes = 0;  // q/k/v out and attention outputs back
  std::int64_t remote_attention_us = 0;     // stage time spent waiting on them (summed over stages)
};

class SimExecutor final : public engine::StepExecutor {
 public:
  SimExecutor(const CostModel* cost, SimExecutorConfig config);

  engine::StepResult execute(const engine::StepPlan& plan) override;
  // The modelled duration of a plan, without side effects.
  std::int64_t duration_us(const engine::StepPlan& plan) const;
  // What remote attention adds to the plan's bottleneck stage and the bytes it moves (0 for an
  // independent instance or when every sequence's KV is where its layers run).
  struct RemoteAttention {
    std::int64_t bytes = 0;
    double stage_us = 0.0;  // summed over stages
  };
  RemoteAttention remote_attention(const engine::StepPlan& plan) const;
  // The token sampled for a request's output index (also used by tests).
  std::int32_t token_for(RequestId id, std::uint64_t sample_index) const;

  const SimExecutorCounters& counters() const { return counters_; }
  std::int64_t num_stages() const { return static_cast<std::int64_t>(config_.stage_layers.size()); }

 private:
  // A layer of a sequence whose KV is on `holder`, not on the stage that runs the layer.
  struct RemoteLayer {
    std::int32_t layer = 0;
    std::int32_t holder = 0;
  };
  struct StepCost {
    double us = 0.0;
    RemoteAttention remote;
  };
  StepCost cost(const engine::StepPlan& plan) const;
  // remote[i]: sequence i's remote layers (empty for most).
  StepCost forward(const std::vector<SeqWork>& work, const std::vector<std::vector<RemoteLayer>>& remote) const;
  std::vector<std::int32_t> layer_stage_;  // stage running each layer

  const CostModel* cost_;
  SimExecutorConfig config_;
  SimExecutorCounters counters_;
};

}  // namespace kun::sim
