// In-process cluster options shared by `kunserve serve` and `kunserve bench --in-process`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cluster/planner.h"
#include "cluster/policy_types.h"
#include "common/status.h"
#include "model/config.h"
#include "runtime/cluster_runtime.h"

namespace kun::tools {

// Device page of the in-process cluster (serve, bench) and of `kunserve calibrate`'s profiles.
inline constexpr std::int64_t kDevicePageBytes = 256 * 1024;

struct ClusterArgs {
  std::int64_t devices = 4;
  std::int64_t kv_tokens_per_device = 1024;
  int threads = 1;
  std::int64_t block_size = 16;
  std::int64_t max_batched_tokens = 512;
  std::int64_t max_num_seqs = 64;
  std::int64_t max_waiting = 4096;
  double link_gbps = 0.0;
  std::int64_t link_latency_us = 0;
  double host_link_gbps = 0.0;
  std::int64_t host_link_latency_us = 0;
  std::int64_t monitor_period_ms = 500;
  std::vector<std::int64_t> group_sizes = {2, 4};
  bool balance_fused = true;
  bool grow_groups = true;    // an overloaded fused group grows g -> 2g (cluster::PlannerConfig)
  bool shrink_groups = true;  // a group of 4+ shrinks by halves as demand falls (partial restore)
  // Demand trend (cluster::PlannerConfig): groups sized for the demand projected this many monitor
  // samples ahead; a group projected short grows without waiting for a vote.
  double trend_horizon_samples = cluster::PlannerConfig{}.trend_horizon_samples;
  std::int64_t trend_samples = cluster::PlannerConfig{}.trend_samples;
  bool grow_on_trend = cluster::PlannerConfig{}.grow_on_trend;
  std::string stale_kv = "exchange";
  std::int64_t exchange_per_round = 8;
  std::int64_t restore_gather_timeout_ms = 2000;
  std::int64_t max_model_len = 0;    // prompt + output tokens of one request; 0: automatic
  std::int64_t event_history = 4096;  // cluster transition events kept
  void add_to(CLI::App* cmd);
  // Tokens one instance's KV cache holds: kv_tokens_per_device rounded up to whole KV pages
  // (what the device really gets), as whole blocks per layer.
  StatusOr<std::int64_t> kv_token_capacity(const model::ModelConfig& config, DType kv_dtype) const;
  // Device capacity = the model's parameters + KV for kv_tokens_per_device tokens.
  // max_model_len: --max-model-len if given (an error, naming the flags to change, when one
  // instance's KV cache cannot hold it or the model does not support it), else the scheduler's
  // default (the model's limit), as the in-process benchmarks always ran.
  // Serving (`kunserve serve`): without --max-model-len, caps max_model_len to
  // kv_token_capacity() (logged when capped), so every request the API admits fits one instance
  // and a request without max_tokens gets what fits (vLLM's behaviour).
  Status cap_context_to_kv(const model::ModelConfig& config, runtime::ClusterOptions* options) const;
  // Device capacity = the model's parameters (in `dtype`) + KV for kv_tokens_per_device tokens
  // (in kv_dtype: a bf16 cache takes half the bytes of an f32 one).
  StatusOr<runtime::ClusterOptions> build(const model::ModelConfig& config, DType dtype, DType kv_dtype,
                                          cluster::Policy policy, const std::string& model_name) const;
};

}  // namespace kun::tools
