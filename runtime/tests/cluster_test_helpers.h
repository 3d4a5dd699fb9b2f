// Helpers shared by the cluster runtime tests (cluster_test.cc, cluster_fault_test.cc): a small
// 4-device cluster of the tiny model, a per-request token tracker, request specs, the tokens each
// request gives on one instance alone, and stepping with an integrity check after every step.
#pragma once

#include <cstdint>
#include <map>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "common/units.h"
#include "runtime/cluster_runtime.h"
#include "runtime/tests/test_models.h"

namespace kun::runtime {

inline ClusterOptions small_cluster(const model::WeightSource& w, std::int64_t kv_token_blocks, cluster::Policy policy,
                                    cluster::StaleKvStrategy stale = cluster::StaleKvStrategy::kExchange) {
  const auto& c = w.config();
  ClusterOptions o;
  o.num_instances = 4;
  o.device.kv_block_size = 16;
  o.device.weight_dtype = c.dtype;
  o.device.page_bytes = 64 * 1024;
  kv::KvGeometry g{16, c.num_kv_heads, c.head_dim};
  const std::int64_t per_page = g.blocks_per_page(o.device.page_bytes);
  o.device.capacity_bytes = device_param_bytes(c, c.dtype, 0, c.num_layers, o.device.page_bytes) +
                            device_workspace_bytes(c, o.device) +
                            ceil_div(kv_token_blocks * c.num_layers, per_page) * o.device.page_bytes;
  o.scheduler.max_num_batched_tokens = 128;
  o.scheduler.max_prefill_chunk_tokens = 48;
  o.coordinator.policy = policy;
  o.run_policy_thread = false;
  o.host_swap_blocks = 0;
  o.stale_kv = stale;
  return o;
}

struct Tracker {
  std::map<std::int64_t, std::vector<std::int32_t>> tokens;  // by submission index
  std::map<std::int64_t, int> finals;
  std::map<std::int64_t, engine::FinishReason> reasons;
  std::map<std::int64_t, std::int64_t> recomputed;  // the engine's count on the final event
  std::map<std::int64_t, std::int64_t> transition_recomputed;  // of that, after a transition lost KV
  engine::TokenCallback callback(std::int64_t i) {
    return [this, i](const engine::TokenEvent& ev) {
      if (ev.token >= 0) tokens[i].push_back(ev.token);
      if (ev.finished) {
        ++finals[i];
        reasons[i] = ev.reason;
        recomputed[i] = ev.num_recomputed_tokens;
        transition_recomputed[i] = ev.num_transition_recomputed_tokens;
      }
    };
  }
  std::int64_t total_recomputed() const {
    std::int64_t n = 0;
    for (const auto& [i, r] : recomputed) n += r;
    return n;
  }
  std::int64_t total_transition_recomputed() const {
    std::int64_t n = 0;
    for (const auto& [i, r] : transition_recomputed) n += r;
    return n;
  }
};

inline std::vector<engine::RequestSpec> make_specs(std::uint64_t seed, int n, std::int64_t vocab) {
  std::mt19937_64 rng(seed);
  std::vector<engine::RequestSpec> specs;
  for (int i = 0; i < n; ++i) {
    engine::RequestSpec s;
    const int len = 5 + static_cast<int>(rng() % 70);
    for (int t = 0; t < len; ++t) s.prompt_tokens.push_back(static_cast<std::int32_t>(3 + rng() % static_cast<std::uint64_t>(vocab - 3)));
    s.max_tokens = 8 + static_cast<std::int64_t>(rng() % 30);
    s.ignore_eos = true;
    specs.push_back(s);
  }
  return specs;
}

inline std::vector<std::vector<std::int32_t>> expected_alone(const model::WeightSource& w, const std::vector<engine::RequestSpec>& specs) {
  ManualClock clock;
  auto inst = runtime::testing::make_instance(w, runtime::testing::InstanceShape{}, &clock);
  std::vector<std::vector<std::int32_t>> out;
  for (const auto& s : specs) out.push_back(runtime::testing::run_alone(*inst, s));
  return out;
}

inline void run_steps(ClusterRuntime& rt, int n) {
  for (int i = 0; i < n; ++i) {
    rt.run_step_all();
    rt.check_integrity();
  }
}

inline void drain(ClusterRuntime& rt) {
  int guard = 0;
  while (rt.run_step_all()) {
    rt.check_integrity();
    ASSERT_LT(++guard, 100000);
  }
}

}  // namespace kun::runtime
