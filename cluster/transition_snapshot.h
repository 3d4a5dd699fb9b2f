// The requests of one unit as a transition plan sees them (cluster/transition_plan.h), read from
// its engine::Scheduler and engine::KvManager. The runtime and the simulator both build their
// plan inputs with it, so the two executors hand the planner the same facts. Pure.
#pragma once

#include <cstdint>
#include <vector>

#include "cluster/transition_plan.h"
#include "engine/kv_manager.h"
#include "engine/scheduler.h"

namespace kun::cluster {

// Every request of the unit in queue order. A running request holding KV gets, per layer, the
// member holding it: member_of_device[d] for the KvManager's device d (an independent instance
// joining a group at stage k passes {k}; a fused group splitting passes {0, 1, ..., g-1}; a group
// growing passes its members' new stages).
std::vector<TransitionRequest> transition_requests(const engine::Scheduler& scheduler, const engine::KvManager& kv,
                                                   const std::vector<std::int32_t>& member_of_device);

}  // namespace kun::cluster
