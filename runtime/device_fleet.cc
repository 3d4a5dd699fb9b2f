#include "runtime/device_fleet.h"

#include "common/check.h"

namespace kun::runtime {

StatusOr<DeviceGeometry> query_geometry(AgentClient& client, int endpoint) {
  KUN_ASSIGN_OR_RETURN(DeviceGeometry g, client.describe(endpoint));
  if (g.device != endpoint) {
    return internal_error("device at endpoint " + std::to_string(endpoint) + " calls itself " + std::to_string(g.device));
  }
  return g;
}

StatusOr<std::unique_ptr<InProcessFleet>> InProcessFleet::create(const FleetOptions& options,
                                                                 const model::WeightSource& weights) {
  if (options.num_devices <= 0) return invalid_argument("a fleet needs at least one device");
  const model::ModelConfig& config = weights.config();
  const std::int64_t layer_end = options.layer_end < 0 ? config.num_layers : options.layer_end;
  std::unique_ptr<InProcessFleet> fleet(new InProcessFleet());
  // The front end's messages (stage requests, ops, acks) are not device-link traffic: unpaced.
  fleet->hub_ = std::make_unique<InProcessMessageHub>(static_cast<int>(options.num_devices) + 1, options.link,
                                                      fleet->front_end_id());
  for (std::int64_t i = 0; i < options.num_devices; ++i) {
    DeviceOptions dev_opt = options.device;
    dev_opt.name = "dev" + std::to_string(i);
    KUN_ASSIGN_OR_RETURN(auto dev, VirtualDevice::create(dev_opt, config));
    KUN_RETURN_IF_ERROR(dev->load_weights(weights, options.layer_begin, layer_end).with_context("device " + dev_opt.name));
    dev->give_free_pages_to_kv();
    fleet->devices_.push_back(std::move(dev));
  }
  AgentOptions agent_options;
  agent_options.host_swap_blocks = options.host_swap_blocks;
  agent_options.host_link = options.host_link;
  for (std::size_t i = 0; i < fleet->devices_.size(); ++i) {
    if (options.agent_fault) {
      agent_options.fault = [fault = options.agent_fault, device = static_cast<int>(i)](AgentOp op, std::int64_t layer) {
        return fault(op, device, layer);
      };
    }
    auto agent = std::make_unique<DeviceAgent>(*fleet->devices_[i], fleet->hub_->endpoint(fleet->endpoint_of(static_cast<int>(i))),
                                               agent_options);
    fleet->devices_[i]->set_owner_check(true);  // from here on only the agent's threads may touch it
    agent->start();
    fleet->agents_.push_back(std::move(agent));
  }
  AgentClient client(fleet->front_end());
  for (int i = 0; i < fleet->num_devices(); ++i) {
    KUN_ASSIGN_OR_RETURN(DeviceGeometry g, query_geometry(client, fleet->endpoint_of(i)));
    fleet->geometry_.push_back(std::move(g));
  }
  return fleet;
}

InProcessFleet::~InProcessFleet() { shutdown(); }

const DeviceGeometry& InProcessFleet::geometry(int device) const {
  KUN_CHECK(device >= 0 && device < static_cast<int>(geometry_.size())) << "no device " << device;
  return geometry_[static_cast<std::size_t>(device)];
}

StatusOr<AgentCounters> InProcessFleet::counters(int device) {
  if (device < 0 || device >= static_cast<int>(agents_.size()) || agents_[static_cast<std::size_t>(device)] == nullptr) {
    return not_found("no device " + std::to_string(device));
  }
  return agents_[static_cast<std::size_t>(device)]->counters();
}

TransferStats InProcessFleet::transfer_stats() const {
  TransferStats s = hub_->stats();
  for (const auto& a : agents_) {
    if (a == nullptr) continue;
    const AgentCounters c = a->counters();
    s.bytes[static_cast<int>(TransferKind::kSwapOut)] += c.swap_out_bytes;
    s.bytes[static_cast<int>(TransferKind::kSwapIn)] += c.swap_in_bytes;
    s.messages[static_cast<int>(TransferKind::kSwapOut)] += c.swap_out_messages;
    s.messages[static_cast<int>(TransferKind::kSwapIn)] += c.swap_in_messages;
  }
  return s;
}

void InProcessFleet::shutdown() {
  for (auto& a : agents_) {
    if (a != nullptr) a->stop();
  }
}

}  // namespace kun::runtime
