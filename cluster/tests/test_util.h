// Snapshot builders shared by the cluster tests.
#pragma once

#include <cstdint>

#include "cluster/policy_types.h"

namespace kun::cluster::testing {

// L = 32 layers, 10000-byte layers, 100-byte layer blocks, 16-token blocks: an independent
// instance with 3200 layer blocks holds 100 token blocks = 1600 tokens.
inline ClusterShape test_shape(std::int64_t num_instances = 8) {
  ClusterShape s;
  s.num_instances = num_instances;
  s.num_layers = 32;
  s.layer_param_bytes = 10000;
  s.layer_block_bytes = 100;
  s.block_size_tokens = 16;
  s.allowed_degrees = {2, 4};
  return s;
}

inline constexpr std::int64_t kTotalBlocks = 3200;

// An instance whose demand is `demand` of 3200 layer blocks; `pending` blocks wait for admission.
inline InstanceSnapshot snap(std::int64_t id, double demand, std::int64_t pending = 0, std::int64_t queued = -1) {
  InstanceSnapshot s;
  s.instance = id;
  s.kv_blocks_total = kTotalBlocks;
  s.blocks_demanded = static_cast<std::int64_t>(demand * static_cast<double>(kTotalBlocks) + 0.5);
  const std::int64_t used = s.blocks_demanded - pending;
  s.kv_blocks_free = used >= kTotalBlocks ? 0 : kTotalBlocks - (used < 0 ? 0 : used);
  s.pending_blocks = pending;
  s.num_queued = queued >= 0 ? queued : (pending > 0 ? 1 : 0);
  s.num_running = 1;
  return s;
}

// Overloaded by the monitor's rule: demand >= 0.95 and pending >= free.
inline InstanceSnapshot overloaded_snap(std::int64_t id, double demand = 1.2) {
  InstanceSnapshot s = snap(id, demand);
  s.kv_blocks_free = 0;
  s.pending_blocks = s.blocks_demanded - kTotalBlocks + 32;
  s.num_queued = 2;
  return s;
}

}  // namespace kun::cluster::testing
