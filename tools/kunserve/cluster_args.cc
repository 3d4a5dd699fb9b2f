#include "tools/kunserve/cluster_args.h"

#include "common/units.h"
#include "kv/kv_geometry.h"

namespace kun::tools {

void ClusterArgs::add_to(CLI::App* cmd) {
  cmd->add_option("--devices,--instances", devices, "devices (simulate: instances), one data-parallel instance each");
  cmd->add_option("--kv-tokens-per-device", kv_tokens_per_device, "KV capacity per device in tokens");
  cmd->add_option("--threads", threads, "kernel threads per device");
  cmd->add_option("--block-size", block_size, "KV block size in tokens");
  cmd->add_option("--max-batched-tokens", max_batched_tokens, "token budget of one instance's step");
  cmd->add_option("--max-num-seqs", max_num_seqs,
                  "running requests per instance (a fused group of g runs g times as many over g virtual engines)");
  cmd->add_option("--max-waiting", max_waiting, "bounded waiting queue per instance (beyond it: overloaded)");
  cmd->add_option("--link-gbps", link_gbps, "pace transfers at this bandwidth (0: off)");
  cmd->add_option("--link-latency-us", link_latency_us, "per-transfer latency of the link model");
  cmd->add_option("--host-link-gbps", host_link_gbps,
                  "pace swap copies between a device and its host memory at this bandwidth (0: off)");
  cmd->add_option("--host-link-latency-us", host_link_latency_us, "per-message latency of the host link");
  cmd->add_option("--monitor-period-ms", monitor_period_ms, "demand sampling period");
  cmd->add_option("--group-sizes", group_sizes, "fused group sizes the planner may form (smallest first)")->delimiter(',');
  cmd->add_option("--stale-kv", stale_kv,
                  "running requests when their instance fuses: recompute | remote-attention | exchange (live)");
  cmd->add_option("--exchange-per-round", exchange_per_round, "live KV exchange: requests moved per round (one layer each)");
  cmd->add_option("--restore-gather-timeout-ms", restore_gather_timeout_ms,
                  "restore: longest live gather of KV back onto one member per request before the split");
  cmd->add_option("--balance-fused", balance_fused,
                  "fused groups: lookahead batch formation (a step-time cost model balances the virtual engines' "
                  "micro-batches, longest first; long prompts chunked to the typical prompt length; 1/g of the step "
                  "budget each)");
}

StatusOr<runtime::ClusterOptions> ClusterArgs::build(const model::ModelConfig& config, DType dtype, cluster::Policy policy,
                                                     const std::string& model_name) const {
  if (devices < 1) return invalid_argument("--devices must be >= 1");
  if (kv_tokens_per_device < block_size) return invalid_argument("--kv-tokens-per-device must hold one block");
  runtime::ClusterOptions o;
  o.num_instances = devices;
  o.device.num_threads = threads;
  o.device.kv_block_size = block_size;
  o.device.weight_dtype = dtype;
  o.device.page_bytes = 256 * kKiB;
  const kv::KvGeometry g{block_size, config.num_kv_heads, config.head_dim};
  KUN_RETURN_IF_ERROR(g.validate_for_page(o.device.page_bytes));
  const std::int64_t blocks = g.blocks_for_tokens(kv_tokens_per_device) * config.num_layers;
  const std::int64_t kv_pages = ceil_div(blocks, g.blocks_per_page(o.device.page_bytes));
  o.device.capacity_bytes = runtime::device_param_bytes(config, dtype, 0, config.num_layers, o.device.page_bytes) +
                            kv_pages * o.device.page_bytes;
  o.scheduler.max_num_batched_tokens = max_batched_tokens;
  o.scheduler.max_waiting_requests = max_waiting;
  o.scheduler.max_num_seqs = max_num_seqs;
  o.scheduler.balance_virtual_engines = balance_fused;
  o.scheduler.preemption = policy == cluster::Policy::kSwap ? engine::PreemptionMode::kSwap : engine::PreemptionMode::kRecompute;
  o.host_swap_blocks = policy == cluster::Policy::kSwap ? 4 * blocks : 0;
  o.coordinator.policy = policy;
  o.coordinator.monitor.sample_period_us = monitor_period_ms * 1000;
  o.link.bandwidth_bytes_per_s = link_gbps * 1e9;
  o.link.latency_us = link_latency_us;
  o.host_link.bandwidth_bytes_per_s = host_link_gbps * 1e9;
  o.host_link.latency_us = host_link_latency_us;
  o.model_name = model_name;
  if (!cluster::parse_stale_kv_strategy(stale_kv, &o.stale_kv)) {
    return invalid_argument("--stale-kv must be recompute, remote-attention or exchange, not '" + stale_kv + "'");
  }
  if (exchange_per_round < 1) return invalid_argument("--exchange-per-round must be >= 1");
  o.exchange_requests_per_round = exchange_per_round;
  if (restore_gather_timeout_ms < 0) return invalid_argument("--restore-gather-timeout-ms must be >= 0");
  o.restore_gather_timeout_us = restore_gather_timeout_ms * 1000;
  o.allowed_degrees = group_sizes;
  return o;
}

}  // namespace kun::tools
