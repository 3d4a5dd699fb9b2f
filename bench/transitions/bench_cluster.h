// The cluster the transition benches run (transition_bench, submit_latency_bench): `devices`
// instances of `config` under the kunserve policy, room for `kv_tokens` tokens of KV per device,
// device links paced at `link_gbps` (0: plain copies), no policy thread (the benches force the
// transitions themselves).
#pragma once

#include <cstdint>

#include "model/config.h"
#include "runtime/cluster_runtime.h"
#include "runtime/virtual_device.h"

namespace kun::bench {

inline runtime::ClusterOptions transition_bench_cluster(const model::ModelConfig& config, std::int64_t devices, int threads,
                                                        std::int64_t kv_tokens, double link_gbps) {
  runtime::ClusterOptions o;
  o.num_instances = devices;
  o.device.weight_dtype = config.dtype;
  o.device.num_threads = threads;
  o.device.capacity_bytes = runtime::device_param_bytes(config, config.dtype, 0, config.num_layers, o.device.page_bytes) +
                            runtime::device_workspace_bytes(config, o.device) +
                            runtime::kv_pages_for_tokens(config, o.device, kv_tokens) * o.device.page_bytes;
  o.coordinator.policy = cluster::Policy::kKunServe;
  o.run_policy_thread = false;
  o.link.bandwidth_bytes_per_s = link_gbps * 1e9;
  return o;
}

}  // namespace kun::bench
