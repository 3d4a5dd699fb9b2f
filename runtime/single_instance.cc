#include "runtime/single_instance.h"

#include "common/check.h"

namespace kun::runtime {

StatusOr<std::unique_ptr<SingleInstance>> SingleInstance::create(const InstanceOptions& options,
                                                                 const model::WeightSource& weights,
                                                                 const Clock* clock) {
  const model::ModelConfig& config = weights.config();
  std::unique_ptr<SingleInstance> inst(new SingleInstance());
  FleetOptions fleet_options;
  fleet_options.num_devices = 1;
  fleet_options.device = options.device;
  KUN_RETURN_IF_ERROR(check_workspace_fits(options.scheduler, config, options.device));
  fleet_options.host_swap_blocks = options.host_swap_blocks;
  KUN_ASSIGN_OR_RETURN(inst->fleet_, InProcessFleet::create(fleet_options, weights));
  const DeviceGeometry& geometry = inst->fleet_->geometry(0);
  std::vector<memory::PageId> kv_pages;
  for (std::int64_t p : geometry.kv_page_ids) kv_pages.push_back(memory::PageId(p));
  const std::int64_t blocks_per_page = geometry.blocks_per_page;
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
      std::vector<StageSpec>{StageSpec{inst->fleet_->endpoint_of(0), 0, config.num_layers}}, inst->fleet_->front_end());
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

void SingleInstance::check_integrity() {
  AgentClient client(fleet_->front_end());
  auto snap = client.check_integrity(fleet_->endpoint_of(0));  // the agent checks its arena
  KUN_CHECK(snap.ok()) << snap.status().to_string();
  KUN_CHECK_EQ(snap->kv_pages, allocator_->num_pages()) << "KV pages of arena and allocator differ";
  kv_manager_->check_integrity();
}

}  // namespace kun::runtime
