#include "engine/restore_homes.h"

#include <algorithm>

namespace kun::engine {

HomeAssignment assign_restore_homes(const Scheduler& scheduler, KvManager& kv, std::vector<std::int64_t> room) {
  const auto final_blocks = [&](const Request& r) {
    return kv.layer_blocks_for(std::min(r.num_prompt_tokens() + r.spec.max_tokens, scheduler.config().max_model_len));
  };
  std::vector<RequestId> homeless;
  for (RequestId id : scheduler.request_ids_in_order()) {
    const Request* r = scheduler.find(id);
    if (r->state != RequestState::kRunning || kv.tokens_held(id) == 0) continue;
    const std::int32_t home = kv.home(id);
    if (home >= 0) {
      room[static_cast<std::size_t>(home)] -= final_blocks(*r);
    } else {
      homeless.push_back(id);
    }
  }
  HomeAssignment out;
  for (RequestId id : homeless) {
    const std::int64_t need = final_blocks(*scheduler.find(id));
    const auto best = std::max_element(room.begin(), room.end());
    if (best == room.end() || *best < need) {
      out.all_homed = false;
      continue;
    }
    kv.set_home(id, static_cast<std::int32_t>(best - room.begin()));
    *best -= need;
    out.newly_homed.push_back(id);
  }
  return out;
}

}  // namespace kun::engine
