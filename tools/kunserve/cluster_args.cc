#include "tools/kunserve/cluster_args.h"

#include <algorithm>

#include "common/log.h"
#include "common/units.h"
#include "kv/kv_geometry.h"

namespace kun::tools {
namespace {
constexpr std::int64_t kPageBytes = kDevicePageBytes;
}  // namespace

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
  cmd->add_option("--grow-groups", grow_groups, "overloaded fused groups grow g -> 2g (free instances or merging a group)");
  cmd->add_option("--shrink-groups", shrink_groups, "groups of 4+ shrink by halves as demand falls (partial restore)");
  cmd->add_option("--trend-horizon-samples", trend_horizon_samples,
                  "size a new group for the demand projected this many monitor samples ahead at its recent growth "
                  "(0: for the demand now, the artifact's sizing)")
      ->check(CLI::Range(0.0, 1000.0));
  cmd->add_option("--trend-samples", trend_samples, "the trend is the demand growth over this many newest monitor samples")
      ->check(CLI::Range(2, 1000));
  cmd->add_option("--grow-on-trend", grow_on_trend,
                  "with a trend horizon: a fused group whose projected demand exceeds its capacity grows at once, "
                  "without waiting for its monitor's vote");
  cmd->add_option("--stale-kv", stale_kv,
                  "running requests when their instance fuses: recompute | remote-attention | exchange (live)");
  cmd->add_option("--exchange-per-round", exchange_per_round, "live KV exchange: requests moved per round (one layer each)");
  cmd->add_option("--restore-gather-timeout-ms", restore_gather_timeout_ms,
                  "restore: longest live gather of KV back onto one member per request before the split");
  cmd->add_option("--max-model-len", max_model_len,
                  "longest request (prompt + output tokens); 0: the model's limit, capped to what one instance's KV "
                  "cache holds");
  cmd->add_option("--event-history", event_history, "cluster transition events kept (oldest dropped)");
  cmd->add_option("--balance-fused", balance_fused,
                  "fused groups: lookahead batch formation (a step-time cost model balances the virtual engines' "
                  "micro-batches, longest first; long prompts chunked to the typical prompt length; 1/g of the step "
                  "budget each)");
}

StatusOr<std::int64_t> ClusterArgs::kv_token_capacity(const model::ModelConfig& config, DType kv_dtype) const {
  if (block_size < 1) return invalid_argument("--block-size must be >= 1");
  if (kv_tokens_per_device < block_size) return invalid_argument("--kv-tokens-per-device must hold one block");
  runtime::DeviceOptions device;
  device.kv_block_size = block_size;
  device.kv_dtype = kv_dtype;
  device.page_bytes = kPageBytes;
  const kv::KvGeometry g{block_size, config.num_kv_heads, config.head_dim, kv_dtype};
  KUN_RETURN_IF_ERROR(g.validate_for_page(kPageBytes));
  const std::int64_t kv_pages = runtime::kv_pages_for_tokens(config, device, kv_tokens_per_device);
  return kv_pages * g.blocks_per_page(kPageBytes) / config.num_layers * block_size;
}

StatusOr<runtime::ClusterOptions> ClusterArgs::build(const model::ModelConfig& config, DType dtype, DType kv_dtype,
                                                     cluster::Policy policy, const std::string& model_name) const {
  if (devices < 1) return invalid_argument("--devices must be >= 1");
  if (kv_tokens_per_device < block_size) return invalid_argument("--kv-tokens-per-device must hold one block");
  runtime::ClusterOptions o;
  o.num_instances = devices;
  o.device.num_threads = threads;
  o.device.kv_block_size = block_size;
  o.device.weight_dtype = dtype;
  o.device.kv_dtype = kv_dtype;
  o.device.page_bytes = kPageBytes;
  const kv::KvGeometry g{block_size, config.num_kv_heads, config.head_dim, kv_dtype};
  KUN_RETURN_IF_ERROR(g.validate_for_page(o.device.page_bytes));
  o.scheduler.max_num_batched_tokens = max_batched_tokens;
  o.scheduler.max_waiting_requests = max_waiting;
  o.scheduler.max_num_seqs = max_num_seqs;
  o.scheduler.balance_virtual_engines = balance_fused;
  o.scheduler.preemption = policy == cluster::Policy::kSwap ? engine::PreemptionMode::kSwap : engine::PreemptionMode::kRecompute;
  o.host_swap_blocks = policy == cluster::Policy::kSwap ? 4 * g.blocks_for_tokens(kv_tokens_per_device) * config.num_layers : 0;
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
  o.coordinator.planner.grow_groups = grow_groups;
  o.coordinator.planner.shrink_groups = shrink_groups;
  o.coordinator.planner.trend_horizon_samples = trend_horizon_samples;
  o.coordinator.planner.trend_samples = trend_samples;
  o.coordinator.planner.grow_on_trend = grow_on_trend;
  if (event_history < 1) return invalid_argument("--event-history must be >= 1");
  o.coordinator.event_history = static_cast<std::size_t>(event_history);

  if (max_model_len < 0) return invalid_argument("--max-model-len must be >= 0 (0: automatic)");
  if (max_model_len > 0) {
    const std::int64_t model_limit = config.max_position_embeddings;
    KUN_ASSIGN_OR_RETURN(const std::int64_t kv_tokens, kv_token_capacity(config, kv_dtype));
    if (max_model_len > model_limit) {
      return invalid_argument("--max-model-len " + std::to_string(max_model_len) +
                              " exceeds the model's max_position_embeddings (" + std::to_string(model_limit) +
                              "); lower --max-model-len");
    }
    if (max_model_len > kv_tokens) {
      return invalid_argument("--max-model-len " + std::to_string(max_model_len) + " does not fit one instance's KV cache (" +
                              std::to_string(kv_tokens) + " tokens with --kv-tokens-per-device " +
                              std::to_string(kv_tokens_per_device) + " and --block-size " + std::to_string(block_size) +
                              "): lower --max-model-len or raise --kv-tokens-per-device");
    }
    o.scheduler.max_model_len = max_model_len;
  }
  if (max_model_len > 0 && max_model_len < 2) return invalid_argument("--max-model-len must be >= 2 tokens");
  // Capacity = weights + workspace (activations, sized for the scheduler's largest step) + KV.
  runtime::fit_workspace_to(o.scheduler, config, &o.device);
  o.device.capacity_bytes = runtime::device_param_bytes(config, dtype, 0, config.num_layers, o.device.page_bytes) +
                            runtime::device_workspace_bytes(config, o.device) +
                            runtime::kv_pages_for_tokens(config, o.device, kv_tokens_per_device) * o.device.page_bytes;
  return o;
}

Status ClusterArgs::cap_context_to_kv(const model::ModelConfig& config, runtime::ClusterOptions* options) const {
  if (max_model_len > 0) return ok_status();  // explicit: build() checked that it fits
  KUN_ASSIGN_OR_RETURN(const std::int64_t kv_tokens, kv_token_capacity(config, options->device.kv_dtype));
  const std::int64_t model_limit = std::min(config.max_position_embeddings, options->scheduler.max_model_len);
  options->scheduler.max_model_len = std::min(model_limit, kv_tokens);
  if (kv_tokens < model_limit) {
    KUN_LOG(kWarn) << "max_model_len capped to " << kv_tokens << " tokens (the model supports " << model_limit
                   << "): one instance's KV cache holds " << kv_tokens << " tokens (--kv-tokens-per-device "
                   << kv_tokens_per_device << "); raise --kv-tokens-per-device to serve longer requests";
  }
  if (options->scheduler.max_model_len < 2) return invalid_argument("max_model_len must be >= 2 tokens");
  return ok_status();
}

}  // namespace kun::tools
