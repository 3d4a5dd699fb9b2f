#include "cluster/policy_types.h"

#include <vector>

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

StatusOr<PolicyVariant> parse_policy_variant(const std::string& name) {
  std::vector<std::string> parts;
  std::size_t begin = 0;
  while (true) {
    const std::size_t slash = name.find('/', begin);
    parts.push_back(name.substr(begin, slash == std::string::npos ? std::string::npos : slash - begin));
    if (slash == std::string::npos) break;
    begin = slash + 1;
  }
  const auto usage = [&] {
    return invalid_argument("unknown policy '" + name +
                            "' (recompute | swap | migrate | kunserve[/recompute|/remote-attention|/exchange[/no-lookahead]])");
  };
  PolicyVariant v;
  if (parts.size() > 3 || !parse_policy(parts[0], &v.policy)) return usage();
  if (parts.size() >= 2) {
    StaleKvStrategy s;
    if (v.policy != Policy::kKunServe || !parse_stale_kv_strategy(parts[1], &s)) return usage();
    v.stale_kv = s;
  }
  if (parts.size() == 3) {
    if (parts[2] != "no-lookahead") return usage();
    v.lookahead = false;
  }
  return v;
}

}  // namespace kun::cluster
