#include "runtime/virtual_device.h"

#include <cstdlib>
#include <string>

#include "common/check.h"
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
  std::unique_ptr<VirtualDevice> dev(new VirtualDevice(options, config));
  KUN_RETURN_IF_ERROR(dev->kv_geometry_.validate_for_page(options.page_bytes));
  memory::ArenaOptions arena_options;
  arena_options.capacity_bytes = options.capacity_bytes;
  arena_options.page_bytes = options.page_bytes;
  arena_options.name = "kun-" + options.name;
  KUN_ASSIGN_OR_RETURN(dev->arena_, memory::DeviceArena::create(arena_options));
  dev->kv_storage_ = std::make_unique<kv::KvStorage>(*dev->arena_, dev->kv_geometry_);
  dev->pool_ = std::make_unique<kernels::ThreadPool>(options.num_threads);
  dev->forward_ = std::make_unique<model::ForwardPass>(dev->config_, options.kv_block_size, options.kv_dtype,
                                                       dev->pool_.get());
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
    return resource_exhausted("device " + options_.name + " has " +
                              std::to_string(arena_->num_free_pages() * arena_->page_bytes()) +
                              " free bytes, parameters need " + std::to_string(need));
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
  opt.capacity_bytes = device_param_bytes(c, c.dtype, 0, c.num_layers, opt.page_bytes) + kv_pages * opt.page_bytes;
  KUN_ASSIGN_OR_RETURN(std::unique_ptr<VirtualDevice> dev, VirtualDevice::create(opt, c));
  KUN_RETURN_IF_ERROR(dev->load_weights(weights, 0, c.num_layers));
  dev->give_free_pages_to_kv();
  return dev;
}

}  // namespace kun::runtime
