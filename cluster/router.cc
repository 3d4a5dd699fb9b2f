#include "cluster/router.h"

#include <algorithm>
#include <iterator>
#include <map>

#include "common/check.h"

namespace kun::cluster {

const char* route_policy_name(RoutePolicy p) {
  switch (p) {
    case RoutePolicy::kLeastOutstanding: return "least-outstanding";
    case RoutePolicy::kMemoryAware: return "memory-aware";
    case RoutePolicy::kRoundRobin: return "round-robin";
  }
  return "unknown";
}

bool parse_route_policy(const std::string& s, RoutePolicy* out) {
  for (RoutePolicy p : {RoutePolicy::kLeastOutstanding, RoutePolicy::kMemoryAware, RoutePolicy::kRoundRobin}) {
    if (s == route_policy_name(p)) {
      *out = p;
      return true;
    }
  }
  return false;
}

Router::Router(RouterConfig config) : config_(config) { KUN_CHECK_GT(config_.num_layers, 0); }

StatusOr<std::int64_t> Router::route(const std::vector<InstanceSnapshot>& snapshots) {
  struct Unit {
    std::int64_t rep = -1;  // lowest member id
    std::int64_t members = 0;
    std::int64_t outstanding = 0;
    std::int64_t room_layer_blocks = 0;
  };
  // Keyed by representative id so iteration is in id order.
  std::map<std::int64_t, Unit> units;
  std::map<std::int64_t, std::int64_t> group_rep;  // group -> lowest member id
  for (const InstanceSnapshot& s : snapshots) {
    if (s.group >= 0) {
      auto [it, inserted] = group_rep.emplace(s.group, s.instance);
      if (!inserted) it->second = std::min(it->second, s.instance);
    }
  }
  for (const InstanceSnapshot& s : snapshots) {
    const std::int64_t rep = s.group >= 0 ? group_rep.at(s.group) : s.instance;
    Unit& u = units[rep];
    u.rep = rep;
    u.members += 1;
    u.outstanding += s.num_running + s.num_queued;
    u.room_layer_blocks += s.kv_blocks_free - s.pending_blocks;
  }
  if (units.empty()) return unavailable("router: no instance to route to");

  if (config_.policy == RoutePolicy::kRoundRobin) {
    auto it = units.lower_bound(rr_cursor_);
    if (it == units.end()) it = units.begin();
    rr_cursor_ = it->first + 1;
    return it->first;
  }
  auto best = units.begin();
  for (auto it = std::next(units.begin()); it != units.end(); ++it) {
    const Unit& u = it->second;
    const Unit& b = best->second;
    // Compare outstanding per member without division: a/ma < b/mb <=> a*mb < b*ma.
    const std::int64_t lhs = u.outstanding * b.members;
    const std::int64_t rhs = b.outstanding * u.members;
    bool better = false;
    if (config_.policy == RoutePolicy::kLeastOutstanding) {
      better = lhs < rhs;
    } else {
      const std::int64_t room = u.room_layer_blocks / config_.num_layers;
      const std::int64_t best_room = b.room_layer_blocks / config_.num_layers;
      better = room > best_room || (room == best_room && lhs < rhs);
    }
    if (better) best = it;
  }
  return best->first;
}

}  // namespace kun::cluster
