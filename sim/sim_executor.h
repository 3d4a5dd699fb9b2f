// SimExecutor: engine::StepExecutor on the cost model (DESIGN.md section 5, "Simulation").
// No real compute and no weights: a step's duration comes from CostModel and the sampled tokens
// are a deterministic hash of (request id, output index), never the EOS token.
//
// An independent instance is one stage holding all L layers. A fused group of g stages
// (stage_layers[i] layers on stage i) runs a round: up to g micro-batches, one per virtual
// engine, exactly as the group's scheduler planned them (schedule(ve); with lookahead balanced
// by predicted cost, without it as the first virtual engine took what fit). The virtual engines
// keep the pipeline full across rounds, so a round takes as long as the larger of two bounds:
// the busiest stage's summed micro-batch times (each including the hop of its activations to the
// next stage over the link), and the slowest micro-batch's trip through all g stages (a virtual
// engine cannot step again before its last step has left the pipeline). An unbalanced round is
// bound by the second: the other stages idle, the pipeline bubble, counted as stage idle time
// (g x round time - stage busy time). The per-step overhead is paid once per round.
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
  double stage_busy_us = 0.0;               // fused rounds: stage time spent on micro-batches
  double stage_idle_us = 0.0;               // fused rounds: g x round time - stage_busy_us
  // The last round's swap copies (host link, before the forward): in its duration, but a paced
  // copy waits on the link and computes nothing (the runtime's agent sleeps), so host contention
  // does not slow it and it does not slow others (cluster_sim.cc).
  double last_round_copy_us = 0.0;
  // And how many times the device slept on the host link for them: the runtime's agent sends a
  // micro-batch's swap-outs as one paced message, then its swap-ins as another, and after each
  // sleep its thread waits for a core again (on a CPU host: GpuSpec::host_contention_us, cluster_sim.cc).
  std::int64_t last_round_copy_waits = 0;
};

class SimExecutor final : public engine::StepExecutor {
 public:
  SimExecutor(const CostModel* cost, SimExecutorConfig config);

  // A round of one micro-batch.
  engine::StepResult execute(const engine::StepPlan& plan) override;
  // A fused group's round: at most g micro-batches, one per virtual engine with work. Returns one
  // result per plan, each carrying the round's duration.
  std::vector<engine::StepResult> execute_round(const std::vector<engine::StepPlan>& micro_batches);
  // The modelled duration of a round, without side effects.
  std::int64_t duration_us(const engine::StepPlan& plan) const;
  std::int64_t round_duration_us(const std::vector<engine::StepPlan>& micro_batches) const;
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
    double stage_busy_us = 0.0;  // fused: summed over stages
    double stage_idle_us = 0.0;
    double copy_us = 0.0;  // swap copies, part of us
    std::int64_t copy_waits = 0;  // paced host-link waits: one per micro-batch and direction with copies
  };
  StepCost cost(const std::vector<const engine::StepPlan*>& micro_batches) const;
  // One micro-batch's sequences, and each one's remote layers (empty for most).
  struct MicroBatch {
    std::vector<SeqWork> work;
    std::vector<std::vector<RemoteLayer>> remote;
  };
  StepCost forward(const std::vector<MicroBatch>& micro_batches) const;
  // execute / execute_round without copying the plans.
  std::vector<engine::StepResult> run_round(const std::vector<const engine::StepPlan*>& micro_batches);
  std::vector<std::int32_t> layer_stage_;  // stage running each layer

  const CostModel* cost_;
  SimExecutorConfig config_;
  SimExecutorCounters counters_;
};

}  // namespace kun::sim
