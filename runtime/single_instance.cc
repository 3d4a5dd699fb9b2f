#include "runtime/single_instance.h"

#include "common/check.h"

namespace kun::runtime {

StatusOr<std::unique_ptr<SingleInstance>> SingleInstance::create(const InstanceOptions& options,
                                                                 const model::WeightSource& weights,
                                                                 const Clock* clock) {
  const model::ModelConfig& config = weights.config();
  std::unique_ptr<SingleInstance> inst(new SingleInstance());
  KUN_ASSIGN_OR_RETURN(inst->device_, VirtualDevice::create(options.device, config));
  KUN_RETURN_IF_ERROR(inst->device_->load_weights(weights, 0, config.num_layers));
  const std::vector<memory::PageId> kv_pages = inst->device_->give_free_pages_to_kv();
  const std::int64_t blocks_per_page = inst->device_->kv_storage().blocks_per_page();
  inst->allocator_ = std::make_unique<kv::KvBlockAllocator>(blocks_per_page, options.allocation_order,
                                                            options.allocation_seed);
  KUN_RETURN_IF_ERROR(inst->allocator_->add_pages(kv_pages));
  if (inst->allocator_->num_total() < config.num_layers) {
    return resource_exhausted("device capacity leaves no room for a single KV block on every layer");
  }
  inst->kv_manager_ = std::make_unique<engine::KvManager>(
      options.device.kv_block_size, std::vector<kv::KvBlockAllocator*>{inst->allocator_.get()},
      std::vector<std::int32_t>(static_cast<std::size_t>(config.num_layers), 0), options.host_swap_blocks);
  inst->executor_ = std::make_unique<PipelineExecutor>(
      std::vector<PipelineStage>{PipelineStage{inst->device_.get(), 0, 0, config.num_layers}}, nullptr,
      options.host_swap_blocks);
  engine::EngineConfig engine_config;
  engine_config.scheduler = options.scheduler;
  engine_config.scheduler.vocab_size = config.vocab_size;
  engine_config.scheduler.eos_token_id = static_cast<std::int32_t>(config.eos_token_id);
  if (engine_config.scheduler.max_model_len <= 0 || engine_config.scheduler.max_model_len > config.max_position_embeddings) {
    engine_config.scheduler.max_model_len = config.max_position_embeddings;
  }
  KUN_RETURN_IF_ERROR(engine_config.scheduler.validate());
  engine_config.model.name = options.model_name;
  engine_config.model.max_context_tokens = engine_config.scheduler.max_model_len;
  engine_config.model.vocab_size = config.vocab_size;
  engine_config.model.eos_token_id = static_cast<std::int32_t>(config.eos_token_id);
  inst->engine_ = std::make_unique<engine::Engine>(engine_config, inst->kv_manager_.get(), inst->executor_.get(), clock);
  return inst;
}

void SingleInstance::check_integrity() const {
  device_->arena().check_integrity();
  KUN_CHECK_EQ(device_->arena().num_kv_pages(), allocator_->num_pages()) << "KV pages of arena and allocator differ";
  kv_manager_->check_integrity();
}

}  // namespace kun::runtime
