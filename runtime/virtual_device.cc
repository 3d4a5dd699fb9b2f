#include "runtime/virtual_device.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "common/check.h"
#include "common/log.h"
#include "common/units.h"

namespace kun::runtime {

std::int64_t kv_pages_for_tokens(const model::ModelConfig& config, const DeviceOptions& device, std::int64_t kv_tokens) {
  const kv::KvGeometry g{device.kv_block_size, config.num_kv_heads, config.head_dim, device.kv_dtype};
  return ceil_div(g.blocks_for_tokens(kv_tokens) * config.num_layers, g.blocks_per_page(device.page_bytes));
}

std::int64_t device_param_bytes(const model::ModelConfig& config, DType dtype, std::int64_t layer_begin,
                                std::int64_t layer_end, std::int64_t page_bytes) {
  const auto pages = [&](std::int64_t bytes) { return round_up(bytes, page_bytes); };
  std::int64_t total = pages(model::embedding_segment_bytes(config, dtype)) +
                       pages(model::HeadSegmentLayout::compute(config, dtype).total_bytes);
  total += (layer_end - layer_begin) * pages(model::LayerSegmentLayout::compute(config, dtype).total_bytes);
  return total;
}

namespace {

constexpr std::int64_t kWorkspaceAlignBytes = 64;

model::ForwardLimits stage_limits(const DeviceOptions& d) {
  return model::ForwardLimits{d.max_batched_tokens, d.max_sequences, d.max_context_tokens, false};
}
model::ForwardLimits serve_limits(const DeviceOptions& d) {
  return model::ForwardLimits{d.max_batched_tokens, 0, d.max_context_tokens, /*attention_only=*/true};
}

// Byte offsets of the workspace segment's pieces (each 64-byte aligned).
struct DeviceWorkspaceLayout {
  std::int64_t stage_forward = 0, serve_forward = 0, activations = 0, logits = 0, remote_qkv = 0, remote_out = 0;
  std::int64_t stage_forward_bytes = 0, serve_forward_bytes = 0;
  std::int64_t total_bytes = 0;  // before rounding to pages

  static DeviceWorkspaceLayout compute(const model::ModelConfig& c, const DeviceOptions& d) {
    const std::int64_t f = static_cast<std::int64_t>(sizeof(float));
    const std::int64_t T = d.max_batched_tokens;
    DeviceWorkspaceLayout w;
    const kernels::AttentionArithmetic arithmetic = kernels::attention_arithmetic_for(d.weight_dtype);
    w.stage_forward_bytes = model::forward_workspace_bytes(c, d.weight_dtype, stage_limits(d), d.num_threads, arithmetic);
    w.serve_forward_bytes = model::forward_workspace_bytes(c, d.weight_dtype, serve_limits(d), d.num_threads, arithmetic);
    std::int64_t cursor = 0;
    const auto place = [&](std::int64_t bytes) {
      const std::int64_t at = round_up(cursor, kWorkspaceAlignBytes);
      cursor = at + bytes;
      return at;
    };
    w.stage_forward = place(w.stage_forward_bytes);
    w.serve_forward = place(w.serve_forward_bytes);
    w.activations = place(T * c.hidden_size * f);
    w.logits = place(d.max_sequences * c.vocab_size * f);
    w.remote_qkv = place(T * (c.q_dim() + 2 * c.kv_dim()) * f);
    w.remote_out = place(T * c.q_dim() * f);
    w.total_bytes = round_up(cursor, kWorkspaceAlignBytes);
    return w;
  }
};

Status check_limits(const DeviceOptions& d) {
  if (d.max_batched_tokens <= 0 || d.max_sequences <= 0 || d.max_context_tokens <= 0) {
    return invalid_argument("device " + d.name + ": workspace limits must be > 0 (max_batched_tokens " +
                            std::to_string(d.max_batched_tokens) + ", max_sequences " + std::to_string(d.max_sequences) +
                            ", max_context_tokens " + std::to_string(d.max_context_tokens) + ")");
  }
  return ok_status();
}

}  // namespace

void fit_workspace_to(const engine::SchedulerConfig& scheduler, const model::ModelConfig& config, DeviceOptions* device) {
  // A fused virtual engine's step may carry decodes beyond its prompt share, up to
  // max_step_tokens_with_decodes (engine::fused_scheduler_config).
  device->max_batched_tokens = std::max(scheduler.max_num_batched_tokens, scheduler.max_step_tokens_with_decodes);
  device->max_sequences = scheduler.max_num_seqs;
  device->max_context_tokens = scheduler.max_model_len > 0
                                   ? std::min(scheduler.max_model_len, config.max_position_embeddings)
                                   : config.max_position_embeddings;
}

Status check_workspace_fits(const engine::SchedulerConfig& scheduler, const model::ModelConfig& config,
                            const DeviceOptions& device) {
  DeviceOptions need = device;
  fit_workspace_to(scheduler, config, &need);
  if (need.max_batched_tokens > device.max_batched_tokens) {
    return invalid_argument("the scheduler's max_num_batched_tokens " + std::to_string(need.max_batched_tokens) +
                            " exceeds the device workspace's " + std::to_string(device.max_batched_tokens) +
                            " tokens per step (DeviceOptions::max_batched_tokens; fit_workspace_to sizes it)");
  }
  if (need.max_context_tokens > device.max_context_tokens) {
    return invalid_argument("the scheduler's max_model_len " + std::to_string(need.max_context_tokens) +
                            " exceeds the device workspace's " + std::to_string(device.max_context_tokens) +
                            "-token contexts (DeviceOptions::max_context_tokens; fit_workspace_to sizes it)");
  }
  return ok_status();
}

std::int64_t device_workspace_bytes(const model::ModelConfig& config, const DeviceOptions& device) {
  KUN_CHECK(check_limits(device).ok()) << check_limits(device).to_string();
  return round_up(DeviceWorkspaceLayout::compute(config, device).total_bytes, device.page_bytes);
}

VirtualDevice::VirtualDevice(DeviceOptions options, model::ModelConfig config)
    : options_(std::move(options)),
      config_(std::move(config)),
      layer_layout_(model::LayerSegmentLayout::compute(config_, options_.weight_dtype)) {
  kv_geometry_.block_size_tokens = options_.kv_block_size;
  kv_geometry_.dtype = options_.kv_dtype;
  kv_geometry_.num_kv_heads = config_.num_kv_heads;
  kv_geometry_.head_dim = config_.head_dim;
  layer_segments_.resize(static_cast<std::size_t>(config_.num_layers));
}

StatusOr<std::unique_ptr<VirtualDevice>> VirtualDevice::create(const DeviceOptions& options,
                                                              const model::ModelConfig& config) {
  KUN_RETURN_IF_ERROR(config.validate());
  if (options.num_threads <= 0) return invalid_argument("device threads must be >= 1");
  KUN_RETURN_IF_ERROR(check_limits(options));
  std::unique_ptr<VirtualDevice> dev(new VirtualDevice(options, config));
  KUN_RETURN_IF_ERROR(dev->kv_geometry_.validate_for_page(options.page_bytes));
  memory::ArenaOptions arena_options;
  arena_options.capacity_bytes = options.capacity_bytes;
  arena_options.page_bytes = options.page_bytes;
  arena_options.name = "kun-" + options.name;
  KUN_ASSIGN_OR_RETURN(dev->arena_, memory::DeviceArena::create(arena_options));
  KUN_LOG(kInfo) << "device " << options.name << ": " << dev->arena_->capacity_bytes() / kMiB << " MiB in "
                 << dev->arena_->page_bytes() / kKiB << " KiB pages, "
                 << (dev->arena_->huge_page_bytes() > 0 ? "on huge pages" : "on OS pages (no huge pages)");
  dev->kv_storage_ = std::make_unique<kv::KvStorage>(*dev->arena_, dev->kv_geometry_);
  dev->pool_ = std::make_unique<kernels::ThreadPool>(options.num_threads);
  // The workspace comes first: weights then take their pages and KV gets what is left.
  const DeviceWorkspaceLayout w = DeviceWorkspaceLayout::compute(dev->config_, options);
  dev->workspace_bytes_ = round_up(w.total_bytes, dev->arena_->page_bytes());
  if (dev->workspace_bytes_ > dev->arena_->capacity_bytes()) {
    return resource_exhausted("device " + options.name + ": capacity " + std::to_string(dev->arena_->capacity_bytes()) +
                              " bytes cannot hold its activations and workspace (" + std::to_string(dev->workspace_bytes_) +
                              " bytes for steps of " + std::to_string(options.max_batched_tokens) + " tokens, " +
                              std::to_string(options.max_sequences) + " sequences, " +
                              std::to_string(options.max_context_tokens) + "-token contexts)");
  }
  KUN_ASSIGN_OR_RETURN(dev->workspace_segment_, dev->arena_->create_segment("workspace", w.total_bytes));
  const std::span<std::byte> ws(dev->arena_->segment_data(dev->workspace_segment_), static_cast<std::size_t>(w.total_bytes));
  dev->forward_ = std::make_unique<model::ForwardPass>(dev->config_, options.weight_dtype, options.kv_block_size, options.kv_dtype,
                                                       kernels::attention_arithmetic_for(options.weight_dtype),
                                                       dev->pool_.get(), stage_limits(options),
                                                       ws.subspan(static_cast<std::size_t>(w.stage_forward),
                                                                  static_cast<std::size_t>(w.stage_forward_bytes)));
  dev->serve_forward_ = std::make_unique<model::ForwardPass>(
      dev->config_, options.weight_dtype, options.kv_block_size, options.kv_dtype,
      kernels::attention_arithmetic_for(options.weight_dtype),
      dev->pool_.get(), serve_limits(options),
      ws.subspan(static_cast<std::size_t>(w.serve_forward), static_cast<std::size_t>(w.serve_forward_bytes)));
  const model::ModelConfig& c = dev->config_;
  const std::int64_t T = options.max_batched_tokens;
  const auto floats = [&](std::int64_t offset, std::int64_t count) {
    return std::span<float>(reinterpret_cast<float*>(ws.data() + offset), static_cast<std::size_t>(count));
  };
  dev->stage_activations_ = floats(w.activations, T * c.hidden_size);
  dev->stage_logits_ = floats(w.logits, options.max_sequences * c.vocab_size);
  dev->remote_qkv_ = floats(w.remote_qkv, T * (c.q_dim() + 2 * c.kv_dim()));
  dev->remote_out_ = floats(w.remote_out, T * c.q_dim());
  return dev;
}

Status VirtualDevice::load_weights(const model::WeightSource& source, std::int64_t layer_begin,
                                   std::int64_t layer_end) {
  if (layer_begin < 0 || layer_end > config_.num_layers || layer_begin >= layer_end) {
    return invalid_argument("bad layer range [" + std::to_string(layer_begin) + ", " + std::to_string(layer_end) + ")");
  }
  const DType dtype = options_.weight_dtype;
  const auto need = device_param_bytes(config_, dtype, layer_begin, layer_end, arena_->page_bytes());
  if (need > arena_->num_free_pages() * arena_->page_bytes()) {
    return resource_exhausted("device " + options_.name + " (capacity " + std::to_string(arena_->capacity_bytes()) +
                              " bytes) has " + std::to_string(arena_->num_free_pages() * arena_->page_bytes()) +
                              " free bytes after its " + std::to_string(workspace_bytes_) +
                              "-byte workspace, parameters need " + std::to_string(need) +
                              " (capacity must hold weights + workspace + KV)");
  }
  auto make = [&](const std::string& name, std::int64_t bytes) -> StatusOr<memory::SegmentId> {
    return arena_->create_segment(name, bytes);
  };
  KUN_ASSIGN_OR_RETURN(embedding_segment_, make("embedding", model::embedding_segment_bytes(config_, dtype)));
  KUN_RETURN_IF_ERROR(model::load_embedding_segment(
      source, dtype,
      std::span<std::byte>(arena_->segment_data(embedding_segment_),
                           static_cast<std::size_t>(arena_->segment_bytes(embedding_segment_)))));
  const auto head_layout = model::HeadSegmentLayout::compute(config_, dtype);
  KUN_ASSIGN_OR_RETURN(head_segment_, make("head", head_layout.total_bytes));
  KUN_RETURN_IF_ERROR(model::load_head_segment(
      source, dtype,
      std::span<std::byte>(arena_->segment_data(head_segment_), static_cast<std::size_t>(head_layout.total_bytes))));
  for (std::int64_t l = layer_begin; l < layer_end; ++l) {
    KUN_ASSIGN_OR_RETURN(memory::SegmentId seg, make("layer." + std::to_string(l), layer_layout_.total_bytes));
    layer_segments_[static_cast<std::size_t>(l)] = seg;
    KUN_RETURN_IF_ERROR(model::load_layer_segment(
        source, l, dtype,
        std::span<std::byte>(arena_->segment_data(seg), static_cast<std::size_t>(layer_layout_.total_bytes))));
  }
  return ok_status();
}

std::vector<memory::PageId> VirtualDevice::give_free_pages_to_kv() {
  check_owner();
  auto pages = arena_->add_kv_pages(arena_->num_free_pages());
  KUN_CHECK(pages.ok()) << pages.status().to_string();
  return std::move(pages).value();
}

void VirtualDevice::owner_violation() const {
  KUN_CHECK(false) << "device " << options_.name << " touched by a thread that does not own it (its agent's threads do): "
                   << "a front end or another device reached into its memory";
  std::abort();
}

bool VirtualDevice::has_layer(std::int64_t layer) const {
  check_owner();
  const memory::SegmentId seg = layer_segments_[static_cast<std::size_t>(layer)];
  return seg.valid() && !arena_->segment_dropped(seg);
}

model::LayerWeights VirtualDevice::layer_weights(std::int64_t layer) const {
  KUN_CHECK(has_layer(layer)) << "layer " << layer << " is not resident on " << options_.name;
  return model::layer_weights_at(arena_->segment_data(layer_segments_[static_cast<std::size_t>(layer)]), config_,
                                 options_.weight_dtype);
}

model::HeadWeights VirtualDevice::head_weights() const {
  check_owner();
  return model::head_weights_at(arena_->segment_data(embedding_segment_), arena_->segment_data(head_segment_), config_,
                                options_.weight_dtype);
}

std::span<const std::byte> VirtualDevice::layer_bytes(std::int64_t layer) const {
  KUN_CHECK(has_layer(layer)) << "layer " << layer << " is not resident on " << options_.name;
  return {arena_->segment_data(layer_segments_[static_cast<std::size_t>(layer)]),
          static_cast<std::size_t>(layer_layout_.total_bytes)};
}

StatusOr<std::vector<memory::PageId>> VirtualDevice::drop_layer(std::int64_t layer) {
  check_owner();
  if (!has_layer(layer)) return failed_precondition("layer " + std::to_string(layer) + " is not resident");
  return arena_->drop_segment(layer_segments_[static_cast<std::size_t>(layer)]);
}

Status VirtualDevice::restore_layer(std::int64_t layer, std::span<const memory::PageId> pages) {
  check_owner();
  memory::SegmentId& seg = layer_segments_[static_cast<std::size_t>(layer)];
  if (!seg.valid()) {
    // Never loaded here: create the segment from the given pages.
    return unimplemented("restoring a layer that was never loaded on this device");
  }
  return arena_->restore_segment(seg, pages);
}

std::span<std::byte> VirtualDevice::restored_layer_data(std::int64_t layer) {
  check_owner();
  KUN_CHECK(has_layer(layer));
  return {arena_->segment_data(layer_segments_[static_cast<std::size_t>(layer)]),
          static_cast<std::size_t>(layer_layout_.total_bytes)};
}

std::int64_t VirtualDevice::pages_per_layer() const { return ceil_div(layer_layout_.total_bytes, arena_->page_bytes()); }

StatusOr<std::unique_ptr<VirtualDevice>> create_full_device(const std::string& name, const model::WeightSource& weights,
                                                            std::int64_t kv_token_blocks, std::int64_t block_size,
                                                            int num_threads) {
  const model::ModelConfig& c = weights.config();
  kv::KvGeometry g;
  g.block_size_tokens = block_size;
  g.num_kv_heads = c.num_kv_heads;
  g.head_dim = c.head_dim;
  DeviceOptions opt;
  opt.name = name;
  opt.num_threads = num_threads;
  opt.kv_block_size = block_size;
  opt.weight_dtype = c.dtype;
  opt.page_bytes = round_up(g.block_stride_bytes() * c.num_layers, 4096);
  const std::int64_t kv_pages = ceil_div(kv_token_blocks * c.num_layers, g.blocks_per_page(opt.page_bytes));
  opt.capacity_bytes = device_param_bytes(c, c.dtype, 0, c.num_layers, opt.page_bytes) + device_workspace_bytes(c, opt) +
                       kv_pages * opt.page_bytes;
  KUN_ASSIGN_OR_RETURN(std::unique_ptr<VirtualDevice> dev, VirtualDevice::create(opt, c));
  KUN_RETURN_IF_ERROR(dev->load_weights(weights, 0, c.num_layers));
  dev->give_free_pages_to_kv();
  return dev;
}

}  // namespace kun::runtime
