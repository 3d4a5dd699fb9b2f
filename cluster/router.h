// Router: picks where a new request goes (DESIGN.md 3.2 / artifact 2.9). Pure; its only state is
// the round-robin cursor.
//
// Routing units: every independent instance, and every fused group (all snapshots with the same
// group >= 0), represented by its first member (lowest instance id, which is stage 0: the planner
// and coordinator order members by id). Ties break to the lowest id.
//   kLeastOutstanding: fewest (running + queued) per member of the unit;
//   kMemoryAware: most free room net of pending, in token blocks: sum over the unit's members of
//     (kv_blocks_free - pending_blocks) / num_layers (a fused token costs L/g layer blocks on each of
//     g devices, L in total, so the same formula covers both); ties by fewer outstanding;
//   kRoundRobin: cycles over the units in id order (the artifact's default).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cluster/policy_types.h"
#include "common/status.h"

namespace kun::cluster {

enum class RoutePolicy { kLeastOutstanding, kMemoryAware, kRoundRobin };
const char* route_policy_name(RoutePolicy p);
bool parse_route_policy(const std::string& s, RoutePolicy* out);

struct RouterConfig {
  RoutePolicy policy = RoutePolicy::kLeastOutstanding;
  std::int64_t num_layers = 1;  // for kMemoryAware's token-block conversion
};

class Router {
 public:
  explicit Router(RouterConfig config = {});
  const RouterConfig& config() const { return config_; }

  // The instance id (a group's first member) for the next request; unavailable when empty.
  StatusOr<std::int64_t> route(const std::vector<InstanceSnapshot>& snapshots);

 private:
  RouterConfig config_;
  std::int64_t rr_cursor_ = 0;  // id of the last unit chosen by round robin + 1
};

}  // namespace kun::cluster
