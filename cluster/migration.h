// MigrationPolicy: the Llumnix-style `migrate` baseline (DESIGN.md 3.7). Pure.
//
// An instance is overloaded when pending_blocks >= kv_blocks_free with something pending, or its
// demand exceeds overload_demand_threshold. For each overloaded instance (highest demand first):
//  1. live migration: running requests, largest KV (blocks_held) first, each to the least-loaded
//     other instance that has room for it (free blocks net of pending and of what this tick already
//     sent there, keeping it below dest_max_demand), until the source is no longer overloaded by
//     the projected numbers or a concurrency limit is hit;
//  2. queued rebalancing (the artifact's rule): queued requests, smallest first, to the least-loaded
//     instance, at most (local_load - min_load) / 2 blocks in total (load = blocks demanded).
// A request already migrating is never picked again; at most max_concurrent_per_instance
// migrations touch one instance (as source or destination) at once. A migration is in flight until
// on_done(request), until the request shows up on `to` and no longer on `from` in a snapshot, or
// after in_flight_timeout_us.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "cluster/policy_types.h"

namespace kun::cluster {

struct MigrationConfig {
  double overload_demand_threshold = 0.95;
  double dest_max_demand = 0.9;           // a destination stays at or below this after accepting
  bool migrate_running = true;            // live migration of running requests' KV
  bool rebalance_queued = true;           // artifact's queued-request rebalancing
  std::int64_t max_concurrent_per_instance = 2;
  std::int64_t in_flight_timeout_us = 60'000'000;
};

class MigrationPolicy {
 public:
  MigrationPolicy(MigrationConfig config, ClusterShape shape);
  const MigrationConfig& config() const { return config_; }

  std::vector<MigrateAction> plan(std::int64_t now_us, const std::vector<InstanceSnapshot>& snapshots);
  void on_done(RequestId request);

  bool in_flight(RequestId request) const { return in_flight_.count(request) != 0; }
  std::int64_t in_flight_count() const { return static_cast<std::int64_t>(in_flight_.size()); }
  // Live migrations in flight with `instance` as source or destination.
  std::int64_t in_flight_at(std::int64_t instance) const;

  // Layer blocks a request needs at its current length (>= what it holds).
  std::int64_t blocks_needed(const RequestSnapshot& r) const;
  bool overloaded(const InstanceSnapshot& s) const;

 private:
  struct Flight {
    std::int64_t from = 0;
    std::int64_t to = 0;
    std::int64_t started_us = 0;
    bool live = true;  // only live migrations count against the concurrency limit
  };
  void expire(std::int64_t now_us, const std::vector<InstanceSnapshot>& snapshots);

  MigrationConfig config_;
  ClusterShape shape_;
  std::unordered_map<RequestId, Flight> in_flight_;
};

}  // namespace kun::cluster
