#include "cluster/transition_snapshot.h"

#include "common/check.h"

namespace kun::cluster {

std::vector<TransitionRequest> transition_requests(const engine::Scheduler& scheduler, const engine::KvManager& kv,
                                                   const std::vector<std::int32_t>& member_of_device) {
  std::vector<TransitionRequest> out;
  for (RequestId id : scheduler.request_ids_in_order()) {
    const engine::Request* r = scheduler.find(id);
    KUN_CHECK(r != nullptr) << "request " << id;
    TransitionRequest t;
    t.id = id;
    t.tokens_held = kv.tokens_held(id);
    t.running = r->state == engine::RequestState::kRunning && t.tokens_held > 0;
    t.started = r->max_computed > 0;
    t.home = kv.home(id);
    if (t.running) {
      t.layer_member.assign(static_cast<std::size_t>(kv.num_layers()), -1);
      for (const engine::LayerBlockList& l : kv.block_lists(id)) {
        KUN_CHECK(l.device >= 0 && static_cast<std::size_t>(l.device) < member_of_device.size()) << "device " << l.device;
        t.layer_member[static_cast<std::size_t>(l.layer)] = member_of_device[static_cast<std::size_t>(l.device)];
      }
    }
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace kun::cluster
