// VirtualDevice: one CPU "accelerator" (DESIGN.md section 2): a fixed-capacity arena carved from
// host RAM, the model's parameter segments in it, its KV pages, a kernel thread pool and a forward
// pass. Everything the device computes with shares the one budget (issue 12): at create the
// device reserves its activations and workspace (a "workspace" segment of the arena, sized from
// the model's shape and DeviceOptions' step limits), then the loaded layers take their pages, and
// whatever is left becomes KV. So capacity = weights + workspace + KV (+ free).
//
// Threads: owned by one executor thread (DESIGN.md section 4); kernels run on its pool's workers
// during a step. Nothing here locks.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "kernels/kernels.h"
#include "kv/kv_geometry.h"
#include "kv/kv_storage.h"
#include "memory/device_arena.h"
#include "engine/scheduler.h"
#include "model/config.h"
#include "model/forward.h"
#include "model/weight_source.h"

namespace kun::runtime {

struct DeviceOptions {
  std::string name = "dev0";
  std::int64_t capacity_bytes = 0;
  std::int64_t page_bytes = memory::kDefaultPageBytes;
  int num_threads = 1;
  std::int64_t kv_block_size = 16;  // tokens per KV block
  DType weight_dtype = DType::kBF16;
  // Element type of the KV cache: bf16 (half the bytes per token) or f32 (numerics tests).
  DType kv_dtype = DType::kBF16;
  // The largest step the device's workspace is sized for (its activations, the forward pass's
  // buffers, logits, and the buffers of remote attention served to others). The defaults are
  // SchedulerConfig's; fit_workspace_to sizes them for a scheduler, and ClusterRuntime and
  // SingleInstance refuse a scheduler that could plan a bigger step (check_workspace_fits). A
  // stage asked for more anyway is refused with an error. More sequences than max_sequences are
  // fine: their logits are computed in several passes.
  std::int64_t max_batched_tokens = 2048;  // tokens of one step (SchedulerConfig::max_num_batched_tokens)
  std::int64_t max_sequences = 64;         // logits rows done in one pass (SchedulerConfig::max_num_seqs)
  std::int64_t max_context_tokens = 4096;  // longest context attended (SchedulerConfig::max_model_len)
};

// Sets `device`'s step limits to what a scheduler with `scheduler` can plan on a model with
// `config` (max_model_len <= 0 or beyond the model: the model's max_position_embeddings).
void fit_workspace_to(const engine::SchedulerConfig& scheduler, const model::ModelConfig& config, DeviceOptions* device);
// kInvalidArgument, naming both numbers, when `scheduler` can plan a step with more tokens or a
// longer context than `device`'s workspace holds (fused groups plan fewer tokens per step, never more).
Status check_workspace_fits(const engine::SchedulerConfig& scheduler, const model::ModelConfig& config,
                            const DeviceOptions& device);

// Bytes of the device's workspace segment (whole pages): the stage's forward pass and
// activations, its logits, and the serve thread's remote-attention buffers, for the options'
// limits. The workspace part of a capacity budget (see device_param_bytes, kv_pages_for_tokens).
std::int64_t device_workspace_bytes(const model::ModelConfig& config, const DeviceOptions& device);

class VirtualDevice;
namespace detail {
// The device the calling thread owns right now (DeviceOwnerScope), for the ownership guard.
inline thread_local const VirtualDevice* t_device_owner = nullptr;
}  // namespace detail

class VirtualDevice {
 public:
  // Creates the arena and reserves the workspace in it (kResourceExhausted, naming both sizes,
  // when the capacity cannot hold it).
  static StatusOr<std::unique_ptr<VirtualDevice>> create(const DeviceOptions& options, const model::ModelConfig& config);

  const DeviceOptions& options() const { return options_; }
  const model::ModelConfig& config() const { return config_; }
  memory::DeviceArena& arena() {
    check_owner();
    return *arena_;
  }
  const memory::DeviceArena& arena() const {
    check_owner();
    return *arena_;
  }
  kv::KvStorage& kv_storage() {
    check_owner();
    return *kv_storage_;
  }
  const kv::KvGeometry& kv_geometry() const { return kv_geometry_; }
  // The pipeline stage's forward pass (the agent's stage thread).
  model::ForwardPass& forward() {
    check_owner();
    return *forward_;
  }
  // The forward pass for remote attention served to other devices (the agent's serve thread):
  // its own workspace, so a stage parked mid-layer keeps its buffers.
  model::ForwardPass& serve_forward() {
    check_owner();
    return *serve_forward_;
  }
  // Workspace buffers outside the forward passes, all in the workspace segment:
  // the stage's activations [max_batched_tokens][H], its logits [max_sequences][V], and remote
  // attention's q/k/v input [max_batched_tokens][q_dim + 2 kv_dim] and output [max_batched_tokens][q_dim].
  std::span<float> stage_activations() {
    check_owner();
    return stage_activations_;
  }
  std::span<float> stage_logits() {
    check_owner();
    return stage_logits_;
  }
  std::span<float> remote_qkv() {
    check_owner();
    return remote_qkv_;
  }
  std::span<float> remote_out() {
    check_owner();
    return remote_out_;
  }
  // Bytes of the workspace segment (whole pages, counted in the capacity) and its pages.
  std::int64_t workspace_bytes() const { return workspace_bytes_; }
  std::int64_t workspace_pages() const { return workspace_bytes_ / options_.page_bytes; }
  kernels::ThreadPool& pool() {
    check_owner();
    return *pool_;
  }

  // Ownership guard (issue 12, in-process backend): with the check on, every accessor that
  // reaches this device's memory or compute (arena, KV storage, forward pass, pool, weights,
  // layer bytes, drop / restore) aborts unless the calling thread holds a DeviceOwnerScope for
  // this device, i.e. is its agent. InProcessFleet turns it on for every device it hands to an
  // agent, so a front end that reached into a device fails at once instead of racing its agent.
  void set_owner_check(bool on) { owner_check_.store(on, std::memory_order_release); }
  bool owner_check() const { return owner_check_.load(std::memory_order_acquire); }
  void check_owner() const {
    if (owner_check_.load(std::memory_order_relaxed) && detail::t_device_owner != this) owner_violation();
  }

  // Loads layers [layer_begin, layer_end) plus the embedding and the head (which every device
  // keeps) from `source`. kResourceExhausted if they do not fit next to the workspace.
  Status load_weights(const model::WeightSource& source, std::int64_t layer_begin, std::int64_t layer_end);
  // Moves every free page into the KV set and returns them (for the engine's block allocator).
  std::vector<memory::PageId> give_free_pages_to_kv();

  bool has_layer(std::int64_t layer) const;
  model::LayerWeights layer_weights(std::int64_t layer) const;
  model::HeadWeights head_weights() const;
  std::int64_t layer_segment_bytes() const { return layer_layout_.total_bytes; }
  // The bytes of a resident layer's segment (to send to a peer on restore).
  std::span<const std::byte> layer_bytes(std::int64_t layer) const;

  // Drop: the layer's pages become KV pages without copying; returns them.
  StatusOr<std::vector<memory::PageId>> drop_layer(std::int64_t layer);
  // Restore: the given KV pages (free of live blocks) back into the layer; the caller then
  // writes the weights through restored_layer_data().
  Status restore_layer(std::int64_t layer, std::span<const memory::PageId> pages);
  std::span<std::byte> restored_layer_data(std::int64_t layer);
  std::int64_t pages_per_layer() const;

 private:
  VirtualDevice(DeviceOptions options, model::ModelConfig config);
  [[noreturn]] void owner_violation() const;

  DeviceOptions options_;
  model::ModelConfig config_;
  model::LayerSegmentLayout layer_layout_;
  kv::KvGeometry kv_geometry_;
  std::unique_ptr<memory::DeviceArena> arena_;
  std::unique_ptr<kv::KvStorage> kv_storage_;
  std::unique_ptr<kernels::ThreadPool> pool_;
  std::unique_ptr<model::ForwardPass> forward_;
  std::unique_ptr<model::ForwardPass> serve_forward_;
  memory::SegmentId workspace_segment_;
  std::int64_t workspace_bytes_ = 0;
  std::span<float> stage_activations_, stage_logits_, remote_qkv_, remote_out_;
  std::vector<memory::SegmentId> layer_segments_;  // invalid id when never loaded here
  memory::SegmentId embedding_segment_;
  memory::SegmentId head_segment_;
  std::atomic<bool> owner_check_{false};
};

// Marks the calling thread as the owner of `device` for the scope's lifetime (the agent's
// threads hold one while they touch the device). Scopes do not nest across devices.
class DeviceOwnerScope {
 public:
  explicit DeviceOwnerScope(const VirtualDevice& device) : previous_(detail::t_device_owner) {
    detail::t_device_owner = &device;
  }
  ~DeviceOwnerScope() { detail::t_device_owner = previous_; }
  DeviceOwnerScope(const DeviceOwnerScope&) = delete;
  DeviceOwnerScope& operator=(const DeviceOwnerScope&) = delete;

 private:
  const VirtualDevice* previous_;
};

// Bytes a device needs for layers [layer_begin, layer_end) plus embedding and head, rounded to
// pages (the parameter part of a capacity budget).
std::int64_t device_param_bytes(const model::ModelConfig& config, DType dtype, std::int64_t layer_begin,
                                std::int64_t layer_end, std::int64_t page_bytes);

// Whole pages of KV a device needs to hold `kv_tokens` tokens of every layer, at the options'
// block size, KV dtype and page size: the KV part of a capacity budget, so that a budget of
// device_param_bytes(...) + kv_pages_for_tokens(...) * page_bytes gives the device that many tokens.
std::int64_t kv_pages_for_tokens(const model::ModelConfig& config, const DeviceOptions& device, std::int64_t kv_tokens);

// A device holding every layer of `weights` and room for `kv_token_blocks` token blocks (all
// layers) of KV, its free pages handed to KV; a page is one token block of every layer (rounded
// to the OS page size). For device agents and tests.
StatusOr<std::unique_ptr<VirtualDevice>> create_full_device(const std::string& name, const model::WeightSource& weights,
                                                            std::int64_t kv_token_blocks, std::int64_t block_size,
                                                            int num_threads);

}  // namespace kun::runtime
