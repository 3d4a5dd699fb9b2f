// PipelineExecutor: runs an instance's steps over one or more devices (DESIGN.md 3.4). With one
// stage it is an independent instance holding every layer. With g stages (a fused group) stage i
// runs its device's layer range; a step's sequences are split into g micro-batches that flow
// stage to stage, activations crossing devices through the Transport, and every stage runs on
// its own thread, so stage i works on micro-batch m while stage i+1 works on m-1.
//
// KV: each sequence's LayerBlockList names the device (stage index) holding that layer's
// blocks; a layer's attention runs where its KV is. Swap copies run on the device they name,
// against that device's host swap space.
//
// Threads: execute() is called from the engine thread only; stage threads are owned here.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/step.h"
#include "runtime/transport.h"
#include "runtime/virtual_device.h"

namespace kun::runtime {

struct PipelineStage {
  VirtualDevice* device = nullptr;
  int global_device = 0;  // id the transport knows the device by
  std::int64_t layer_begin = 0;
  std::int64_t layer_end = 0;
};

class PipelineExecutor final : public engine::StepExecutor {
 public:
  // host_swap_blocks: layer blocks of host swap space per device (allocated now).
  PipelineExecutor(std::vector<PipelineStage> stages, Transport* transport, std::int64_t host_swap_blocks);
  ~PipelineExecutor() override;
  PipelineExecutor(const PipelineExecutor&) = delete;
  PipelineExecutor& operator=(const PipelineExecutor&) = delete;

  engine::StepResult execute(const engine::StepPlan& plan) override;
  std::int64_t num_stages() const { return static_cast<std::int64_t>(stages_.size()); }
  // Fraction of stage time spent waiting for input during the last steps (pipeline bubbles).
  double bubble_fraction() const;

 private:
  struct MicroBatch {
    std::vector<std::size_t> seqs;  // indices into the plan
    std::vector<std::int32_t> tokens;
    std::vector<model::SequenceSlice> slices;
    std::vector<std::int64_t> logit_rows;
    std::int64_t num_tokens = 0;
  };
  struct StageState {
    std::vector<std::vector<float>> input;  // per micro-batch activations received
    std::vector<float> work;                // activations being computed
    std::vector<std::vector<float*>> block_ptrs;
    std::vector<std::byte> host_swap;
    std::vector<float> logits;
    std::vector<float> sample_scratch;
    std::int64_t busy_ns = 0;
    std::int64_t wait_ns = 0;
  };
  void run_stage(std::size_t s, const engine::StepPlan& plan);
  void run_micro_batch(std::size_t s, std::size_t m, const engine::StepPlan& plan);
  void do_swaps(const engine::StepPlan& plan);
  void split_micro_batches(const engine::StepPlan& plan);
  void worker_loop(std::size_t s);

  std::vector<PipelineStage> stages_;
  Transport* transport_;
  std::int64_t block_bytes_;
  std::vector<StageState> state_;
  std::vector<MicroBatch> micro_batches_;
  std::vector<std::int32_t> sampled_;  // per plan sequence (-1: none)

  // Step hand-off between the engine thread (stage 0) and the stage threads.
  std::mutex mu_;
  std::condition_variable cv_;
  const engine::StepPlan* current_plan_ = nullptr;  // guarded by mu_
  std::int64_t step_generation_ = 0;                // guarded by mu_
  std::vector<std::int64_t> stages_done_;           // guarded by mu_: generation finished per stage
  std::vector<std::vector<std::int64_t>> ready_;    // guarded by mu_: [stage][mb] generation when input ready
  bool shutting_down_ = false;                      // guarded by mu_
  std::vector<std::thread> workers_;
};

}  // namespace kun::runtime
