#include "cluster/policy_types.h"

namespace kun::cluster {

const char* group_state_name(GroupState s) {
  switch (s) {
    case GroupState::kInitial: return "initial";
    case GroupState::kDropped: return "dropped";
    case GroupState::kRestoring: return "restoring";
  }
  return "unknown";
}

const char* policy_name(Policy p) {
  switch (p) {
    case Policy::kRecompute: return "recompute";
    case Policy::kSwap: return "swap";
    case Policy::kMigrate: return "migrate";
    case Policy::kKunServe: return "kunserve";
  }
  return "unknown";
}

bool parse_policy(const std::string& s, Policy* out) {
  for (Policy p : {Policy::kRecompute, Policy::kSwap, Policy::kMigrate, Policy::kKunServe}) {
    if (s == policy_name(p)) {
      *out = p;
      return true;
    }
  }
  return false;
}

const char* stale_kv_strategy_name(StaleKvStrategy s) {
  switch (s) {
    case StaleKvStrategy::kRecompute: return "recompute";
    case StaleKvStrategy::kRemoteAttention: return "remote-attention";
    case StaleKvStrategy::kExchange: return "exchange";
  }
  return "unknown";
}

bool parse_stale_kv_strategy(const std::string& s, StaleKvStrategy* out) {
  for (StaleKvStrategy v : {StaleKvStrategy::kRecompute, StaleKvStrategy::kRemoteAttention, StaleKvStrategy::kExchange}) {
    if (s == stale_kv_strategy_name(v)) {
      *out = v;
      return true;
    }
  }
  return false;
}

}  // namespace kun::cluster
