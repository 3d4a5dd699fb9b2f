// PipelineExecutor: runs an instance's steps over one or more devices (DESIGN.md 3.4) by message
// only (issue 12): it holds no device, only the front end's transport endpoint and each stage's
// endpoint and layer range. With one stage it is an independent instance holding every layer.
// With g stages (a fused group) each step goes out as one kRunStage message per stage agent
// (stage_message.h: block tables, tokens for the first stage, sampling for the last, swap copies
// for the device they name); each agent runs its layers on its stage thread, hands its output
// activations straight to the next stage's agent, and the last one answers with the sampled
// tokens. A layer's attention runs where its KV lives: on the stage's own device, or on the
// holder's agent (remote attention, the holder computes it). The group's engine runs g virtual
// engines: up to g steps (over disjoint request sets) are in flight at once, one per stage in
// steady state, so no stage waits for a whole step to drain before the next begins.
//
// Steps leave every stage in submission order, so they finish in that order too: wait_any()
// waits for the oldest.
//
// Block tables: the executor keeps the front end's mirror of every request's table (from the
// plans' changes) and each stage's agent keeps its own mirror of the stage's layers, keyed by this
// executor's id; stage messages carry only the plan's changes (stage_message.h). The first message
// to each stage is a resync (the whole mirror), as is the next one after resync(). The destructor
// tells every stage's agent to drop this executor's tables (kDropTables), so a transition that
// replaces the executor leaves nothing behind on the agents; the transport must outlive it.
//
// Threads: execute / submit / wait_any are called from the engine thread only; stage_time() from
// any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <vector>

#include "engine/step.h"
#include "runtime/message_transport.h"
#include "runtime/stage_message.h"

namespace kun::runtime {

class PipelineExecutor final : public engine::StepExecutor {
 public:
  // `front_end` is the caller's endpoint; stages cover layers [0, L) in order.
  PipelineExecutor(std::vector<StageSpec> stages, MessageTransport& front_end);
  ~PipelineExecutor() override;
  PipelineExecutor(const PipelineExecutor&) = delete;
  PipelineExecutor& operator=(const PipelineExecutor&) = delete;

  engine::StepResult execute(const engine::StepPlan& plan) override;
  int max_in_flight() const override { return static_cast<int>(stages_.size()); }
  void submit(int slot, const engine::StepPlan* plan) override;
  std::pair<int, engine::StepResult> wait_any() override;

  std::int64_t num_stages() const { return static_cast<std::int64_t>(stages_.size()); }
  // The id the agents key this executor's block tables by (unique in the process).
  std::uint64_t id() const { return id_; }
  // The next submit sends every stage the whole mirror instead of the plan's changes.
  void resync();
  // Bytes of the kRunStage messages sent so far (every stage), for benchmarks and tests.
  std::int64_t stage_message_bytes() const { return stage_message_bytes_.load(std::memory_order_relaxed); }
  const std::vector<StageSpec>& stages() const { return stages_; }
  // Summed over stages: time spent running steps, and idle time a stage spent waiting for a step
  // that was already in flight (pipeline bubbles), from the stage timings the agents report.
  struct StageTime {
    std::int64_t busy_ns = 0;
    std::int64_t idle_ns = 0;
    void add(const StageTime& o) {
      busy_ns += o.busy_ns;
      idle_ns += o.idle_ns;
    }
  };
  StageTime stage_time() const;

 private:
  struct InFlight {
    int slot = 0;
    std::uint64_t tag = 0;
    RecvHandle reply;
    std::int64_t submit_ns = 0;
  };

  std::vector<StageSpec> stages_;
  MessageTransport& front_end_;
  std::uint64_t id_;
  StageKvTables tables_;                      // engine thread only: block tables from the plans' changes
  std::vector<char> stage_synced_;            // engine thread only: the stage's agent has our tables
  std::deque<InFlight> in_flight_;            // engine thread only, oldest first
  std::vector<std::int64_t> stage_last_end_ns_;  // engine thread only
  std::atomic<std::int64_t> busy_ns_{0};
  std::atomic<std::int64_t> idle_ns_{0};
  std::atomic<std::int64_t> stage_message_bytes_{0};
};

}  // namespace kun::runtime
