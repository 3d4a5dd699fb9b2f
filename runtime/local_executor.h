// LocalExecutor: runs an independent instance's steps on one VirtualDevice holding every layer
// (the engine's StepExecutor for the single-device case). It owns the host swap space the
// scheduler's swap preemption copies KV blocks to.
//
// Threads: called from the engine thread only; kernels fan out on the device's pool.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/step.h"
#include "runtime/virtual_device.h"

namespace kun::runtime {

class LocalExecutor final : public engine::StepExecutor {
 public:
  // host_swap_blocks: layer blocks of host memory for swap preemption (allocated now).
  LocalExecutor(VirtualDevice* device, std::int64_t host_swap_blocks);
  engine::StepResult execute(const engine::StepPlan& plan) override;

  std::int64_t steps() const { return steps_; }

 private:
  VirtualDevice* device_;
  std::int64_t block_bytes_;
  std::vector<std::byte> host_swap_;
  // Step buffers, reused.
  std::vector<std::int32_t> tokens_;
  std::vector<model::SequenceSlice> slices_;
  std::vector<float> hidden_;
  std::vector<float> logits_;
  std::vector<float> sample_scratch_;
  std::vector<std::int64_t> logit_rows_;
  std::vector<std::vector<float*>> block_ptrs_;  // [seq * L + layer]
  std::int64_t steps_ = 0;
};

}  // namespace kun::runtime
