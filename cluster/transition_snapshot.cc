#include "cluster/transition_snapshot.h"

#include "common/check.h"

namespace kun::cluster {

std::vector<TransitionRequest> transition_requests(const engine::Scheduler& scheduler, const engine::KvManager& kv,
                                                   std::int32_t first_member) {
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
        t.layer_member[static_cast<std::size_t>(l.layer)] = first_member + l.device;
      }
    }
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace kun::cluster
