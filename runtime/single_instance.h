// SingleInstance: one independent data-parallel instance wired end to end in this process:
// a one-device InProcessFleet (a VirtualDevice holding every layer behind its DeviceAgent), the
// engine's KV bookkeeping over the device's KV pages (ids learnt by message), a one-stage
// PipelineExecutor that drives the agent by message, and the Engine (the FrontDoor). Used by `kunserve generate`, the tests and
// the benchmarks; the cluster runtime builds N of these devices and fuses them.
#pragma once

#include <memory>
#include <string>

#include "common/clock.h"
#include "engine/engine.h"
#include "engine/kv_manager.h"
#include "kv/block_allocator.h"
#include "model/weight_source.h"
#include "runtime/device_fleet.h"
#include "runtime/pipeline_executor.h"
#include "runtime/virtual_device.h"

namespace kun::runtime {

struct InstanceOptions {
  DeviceOptions device;
  engine::SchedulerConfig scheduler;   // vocab_size, eos and max_model_len are filled from the model
  std::int64_t host_swap_blocks = 0;   // layer blocks of host swap space
  std::string model_name = "kunserve-model";
  kv::AllocationOrder allocation_order = kv::AllocationOrder::kDeterministic;
  std::uint64_t allocation_seed = 0;
};

class SingleInstance {
 public:
  static StatusOr<std::unique_ptr<SingleInstance>> create(const InstanceOptions& options,
                                                         const model::WeightSource& weights, const Clock* clock);
  engine::Engine& engine() { return *engine_; }
  DeviceFleet& fleet() { return *fleet_; }
  kv::KvBlockAllocator& allocator() { return *allocator_; }
  engine::KvManager& kv_manager() { return *kv_manager_; }
  PipelineExecutor& executor() { return *executor_; }
  // Pages balance on the device and every block is owned once (aborts with context otherwise).
  void check_integrity();

 private:
  SingleInstance() = default;
  std::unique_ptr<InProcessFleet> fleet_;
  std::unique_ptr<kv::KvBlockAllocator> allocator_;
  std::unique_ptr<engine::KvManager> kv_manager_;
  std::unique_ptr<PipelineExecutor> executor_;
  std::unique_ptr<engine::Engine> engine_;
};

}  // namespace kun::runtime
