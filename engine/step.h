// What the scheduler hands an executor for one step, and what comes back (DESIGN.md section 4:
// the same plan runs on real kernels in runtime/ and on the cost model in sim/).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "common/ids.h"
#include "model/sampling.h"

namespace kun::engine {

// KV blocks of one request for one layer on one device.
struct LayerBlockList {
  std::int32_t layer = 0;
  std::int32_t device = 0;            // device index within the instance / group
  std::vector<std::int64_t> blocks;   // layer-block ids in token order (see KvListKind)
};

// What a planned sequence's `kv` holds. An executor keeps each request's block table across
// steps (as vLLM's workers do) and the plan carries only what changed, so a step's plan grows
// with the new blocks, not with every layer's whole context.
enum class KvListKind : std::uint8_t {
  // `kv` is the request's whole table: every layer it holds (on any device of the instance /
  // group), each with all its blocks in token order. Replaces whatever the executor had for the
  // request. Sent the first time a request is planned on this KvManager and after any change
  // other than an append (swap-in, a layer moved by the KV exchange, a repack).
  kTable,
  // `kv` lists, for each held layer that grew, only the blocks appended after the ones the
  // executor already has for that layer (same device). Empty: nothing changed.
  kAppended,
  // `kv` lists only the layers held on a device other than the one whose stage runs them, with
  // the holding device and no block ids: all a cost model needs (the simulator).
  kOffsite,
};

// How the scheduler fills ScheduledSequence::kv (SchedulerConfig::plan_kv).
enum class PlanKv : std::uint8_t {
  kChanges,     // kTable the first time / after a rewrite, then kAppended (the default)
  kFullTables,  // kTable every step (the representation before; kept for benchmarks and tests)
  kOffsiteOnly, // kOffsite every step (the simulator)
};

// One request's share of a step: compute tokens [start_pos, start_pos + num_tokens) of its token
// sequence (prompt followed by generated tokens), and sample the next token if `sample`.
struct ScheduledSequence {
  RequestId id;
  std::int64_t start_pos = 0;
  std::vector<std::int32_t> tokens;  // the num_tokens token ids being computed
  bool sample = false;
  model::SamplingParams sampling;
  std::uint64_t sample_index = 0;    // index of the output token being sampled
  // Where each layer's KV lives (after the step's appends the table covers start_pos + tokens);
  // `kv_kind` says whether this is the whole table or the change since the request's last plan.
  KvListKind kv_kind = KvListKind::kTable;
  std::vector<LayerBlockList> kv;
};

// A block copy between device KV memory and host swap space (swap) or inside a device (repack).
struct BlockCopy {
  std::int32_t device = 0;
  std::int64_t src = 0;
  std::int64_t dst = 0;
};

struct StepPlan {
  std::int64_t step_index = 0;
  std::vector<BlockCopy> swap_out;   // device block -> host slot, run before the forward
  std::vector<BlockCopy> swap_in;    // host slot -> device block, run before the forward
  std::vector<ScheduledSequence> sequences;
  // Requests whose KV left this instance / group since the previous non-empty plan (finished,
  // cancelled, preempted by recompute, detached, exported): an executor that keeps block tables
  // drops theirs. Applied before `sequences`, whose kTable entries may bring an id back.
  std::vector<RequestId> kv_released;
  std::int64_t num_tokens() const {
    std::int64_t n = 0;
    for (const auto& s : sequences) n += static_cast<std::int64_t>(s.tokens.size());
    return n;
  }
};

struct StepResult {
  // One sampled token per sequence with sample == true, in plan order.
  std::vector<std::int32_t> sampled_tokens;
  std::int64_t duration_us = 0;  // executor-measured (or modelled) step time
};

// Runs steps for one instance (or one fused group). Implemented by runtime/ (real kernels) and
// sim/ (cost model). Called from the engine thread only.
//
// A pipeline of g stages keeps g steps in flight (virtual engines, DESIGN.md 3.4): the engine
// submits up to max_in_flight() plans over disjoint request sets and collects them as they
// finish. The default keeps one plan and runs it synchronously in wait_any().
class StepExecutor {
 public:
  virtual ~StepExecutor() = default;
  virtual StepResult execute(const StepPlan& plan) = 0;

  virtual int max_in_flight() const { return 1; }
  // Starts `plan` in slot `slot` (< max_in_flight(), free). The plan must stay alive until its
  // result comes back from wait_any().
  virtual void submit(int slot, const StepPlan* plan) {
    pending_slot_ = slot;
    pending_ = plan;
  }
  // Blocks until one submitted plan finishes; returns its slot and result.
  virtual std::pair<int, StepResult> wait_any() {
    const StepPlan* plan = pending_;
    pending_ = nullptr;
    return {pending_slot_, execute(*plan)};
  }

 private:
  int pending_slot_ = 0;
  const StepPlan* pending_ = nullptr;
};

}  // namespace kun::engine
