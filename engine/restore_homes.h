// Reverse exchange before a fused group splits (restore): every running request that holds KV
// continues after the split on one member, its home, and its layers held elsewhere are gathered
// there (KvManager::set_home, misplaced_layers, move_layer). Pure policy over the scheduler's
// requests and the group's KvManager; the runtime and the simulator both call it.
#pragma once

#include <cstdint>
#include <vector>

#include "common/ids.h"
#include "engine/kv_manager.h"
#include "engine/scheduler.h"

namespace kun::engine {

struct HomeAssignment {
  bool all_homed = true;                // every running request holding KV has a home
  std::vector<RequestId> newly_homed;   // given a home by this call, in queue order
};

// Gives each running request holding KV without a home the member with the most room left after
// the split, `split_room[k]` layer blocks on member k minus what the requests homed there may
// grow to (their longest possible length, so none outgrows its home). A request no member can
// promise room stays homeless (the split decides: it may recompute).
HomeAssignment assign_restore_homes(const Scheduler& scheduler, KvManager& kv, std::vector<std::int64_t> split_room);

}  // namespace kun::engine
