// PipelineExecutor: runs an instance's steps over one or more devices (DESIGN.md 3.4). With one
// stage it is an independent instance holding every layer. With g stages (a fused group) stage i
// runs its device's layer range on its own thread; activations cross devices through the
// Transport. The group's engine runs g virtual engines: up to g steps (over disjoint request
// sets) are in flight at once, one per stage in steady state, so no stage waits for a whole step
// to drain before the next begins.
//
// KV: each stage keeps the block tables of its layers across steps (engine::KvTableMirror of
// block addresses), updated from each plan's changes (whole tables the first time, then appended
// blocks, released requests dropped), so a step costs no per-context work here. Each layer's
// entry names the device (stage index) holding that layer's blocks; a layer's attention runs
// against that device's KV: locally when it is the stage's own device, otherwise by remote attention (q/k/v out, attention output back through the transport). Swap copies run at submit time on the device
// they name, against that device's host swap space, over the transport's host link.
//
// Threads: execute / submit / wait_any are called from the engine thread only; stage threads
// (one per stage when g > 1) are owned here. With one stage, steps run on the engine thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/kv_table_mirror.h"
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
  int max_in_flight() const override { return static_cast<int>(stages_.size()); }
  void submit(int slot, const engine::StepPlan* plan) override;
  std::pair<int, engine::StepResult> wait_any() override;

  std::int64_t num_stages() const { return static_cast<std::int64_t>(stages_.size()); }
  // Summed over stages: time spent running steps, and idle time waiting for work while the
  // executor had a step in flight (pipeline bubbles).
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
  struct Work {
    int slot = 0;
    const engine::StepPlan* plan = nullptr;
    std::int64_t start_ns = 0;
  };
  struct SlotState {
    std::vector<std::int32_t> tokens;
    std::vector<model::SequenceSlice> slices;
    std::vector<std::int64_t> logit_rows;
    std::int64_t num_tokens = 0;
    std::vector<std::vector<float>> input;  // per stage: activations received from the previous one
    engine::StepResult result;
  };
  struct StageState {
    std::deque<Work> queue;  // guarded by mu_
    std::vector<float> work;
    // This stage's layers of every request's block table (block addresses on the holder);
    // created in the constructor with the stage's layer range.
    std::unique_ptr<engine::KvTableMirror<std::byte*>> tables;
    std::vector<const engine::KvTableMirror<std::byte*>::Layer*> cells;  // per (sequence, layer of the stage)
    std::vector<float> remote_qkv, remote_out;     // remote attention: q/k/v sent, output returned
    std::vector<std::byte> host_swap;
    std::vector<float> logits;
    std::vector<float> sample_scratch;
    // Written by the stage's own thread, read by stats readers on other threads.
    std::atomic<std::int64_t> busy_ns{0};
    std::atomic<std::int64_t> idle_ns{0};
  };
  void prepare(int slot, const engine::StepPlan& plan);
  void run_stage(std::size_t s, const Work& w);
  void do_swaps(const engine::StepPlan& plan);
  void worker_loop(std::size_t s);

  std::vector<PipelineStage> stages_;
  Transport* transport_;
  std::int64_t block_bytes_;
  std::vector<StageState> state_;
  std::vector<SlotState> slots_;
  std::vector<CopySpan> swap_batch_;  // engine thread only (do_swaps runs at submit)

  std::mutex mu_;
  // One condition variable per stage and one for finished steps, so a hand-off wakes only the
  // thread it is for.
  std::vector<std::unique_ptr<std::condition_variable>> stage_cv_;
  std::condition_variable done_cv_;
  std::deque<int> done_;  // guarded by mu_: finished slots
  std::int64_t in_flight_ = 0;  // guarded by mu_
  bool shutting_down_ = false;  // guarded by mu_
  std::vector<std::thread> workers_;
};

}  // namespace kun::runtime
