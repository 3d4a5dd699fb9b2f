// Shared helpers for runtime tests: synthetic models and instances sized in KV tokens.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/clock.h"
#include "model/config.h"
#include "model/weight_source.h"
#include "runtime/single_instance.h"

namespace kun::runtime::testing {

inline std::unique_ptr<model::WeightSource> tiny_weights(const std::string& preset = "tiny", DType dtype = DType::kBF16,
                                                         std::uint64_t seed = 7) {
  auto config = model::preset_config(preset);
  KUN_CHECK(config.ok()) << config.status().to_string();
  config->dtype = dtype;
  return model::synthetic_weights(*config, seed);
}

struct InstanceShape {
  std::int64_t kv_token_blocks = 4096;  // token blocks (all layers) of KV capacity
  std::int64_t block_size = 16;
  std::int64_t page_bytes = 0;          // 0: one token block of all layers per page
  std::int64_t host_swap_token_blocks = 0;
  engine::SchedulerConfig scheduler;
  kv::AllocationOrder order = kv::AllocationOrder::kDeterministic;
  std::uint64_t order_seed = 0;
  int threads = 1;
  DType kv_dtype = DType::kBF16;  // the KV cache's element type (the engine's default)
};

inline std::unique_ptr<SingleInstance> make_instance(const model::WeightSource& weights, const InstanceShape& shape,
                                                     const Clock* clock) {
  const model::ModelConfig& c = weights.config();
  kv::KvGeometry g;
  g.block_size_tokens = shape.block_size;
  g.num_kv_heads = c.num_kv_heads;
  g.head_dim = c.head_dim;
  g.dtype = shape.kv_dtype;
  InstanceOptions opt;
  opt.device.num_threads = shape.threads;
  opt.device.kv_block_size = shape.block_size;
  opt.device.weight_dtype = c.dtype;
  opt.device.kv_dtype = shape.kv_dtype;
  // Small pages keep the capacity exact: one page = one token block on every layer (rounded to
  // the OS page size).
  opt.device.page_bytes = shape.page_bytes > 0 ? shape.page_bytes : round_up(g.block_stride_bytes() * c.num_layers, 4096);
  const std::int64_t blocks_per_page = g.blocks_per_page(opt.device.page_bytes);
  const std::int64_t kv_pages = ceil_div(shape.kv_token_blocks * c.num_layers, blocks_per_page);
  opt.device.capacity_bytes = device_param_bytes(c, c.dtype, 0, c.num_layers, opt.device.page_bytes) +
                              device_workspace_bytes(c, opt.device) +
                              kv_pages * opt.device.page_bytes;
  opt.host_swap_blocks = shape.host_swap_token_blocks * c.num_layers;
  opt.scheduler = shape.scheduler;
  opt.allocation_order = shape.order;
  opt.allocation_seed = shape.order_seed;
  auto inst = SingleInstance::create(opt, weights, clock);
  KUN_CHECK(inst.ok()) << inst.status().to_string();
  return std::move(inst).value();
}

// Runs one request alone to completion and returns its tokens.
inline std::vector<std::int32_t> run_alone(SingleInstance& inst, const engine::RequestSpec& spec) {
  std::vector<std::int32_t> tokens;
  bool done = false;
  auto id = inst.engine().submit(spec, [&](const engine::TokenEvent& ev) {
    if (ev.token >= 0) tokens.push_back(ev.token);
    if (ev.finished) {
      EXPECT_FALSE(done) << "two final events";
      done = true;
    }
  });
  KUN_CHECK(id.ok()) << id.status().to_string();
  while (inst.engine().run_step()) {
  }
  KUN_CHECK(done) << "request did not finish";
  return tokens;
}

}  // namespace kun::runtime::testing
