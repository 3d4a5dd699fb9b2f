#include "server/stop_matcher.h"

#include <algorithm>

namespace kun::server {

StopMatcher::StopMatcher(std::vector<std::string> stops) {
  for (auto& s : stops) {
    if (s.empty()) continue;
    max_stop_len_ = std::max(max_stop_len_, s.size());
    stops_.push_back(std::move(s));
  }
}

std::string StopMatcher::push(std::string_view piece) {
  if (matched_) return {};
  if (stops_.empty()) return std::string(piece);
  // Only the new bytes plus the held-back suffix can contain a new match.
  pending_.append(piece);
  std::size_t first = std::string::npos;
  for (const auto& s : stops_) {
    const std::size_t at = pending_.find(s);
    if (at != std::string::npos) first = std::min(first, at);
  }
  if (first != std::string::npos) {
    matched_ = true;
    std::string out = pending_.substr(0, first);
    pending_.clear();
    return out;
  }
  // Hold back the longest suffix of pending_ that is a proper prefix of some stop string.
  std::size_t hold = 0;
  const std::size_t max_hold = std::min(pending_.size(), max_stop_len_ - 1);
  for (std::size_t len = max_hold; len > 0; --len) {
    const std::string_view suffix(pending_.data() + pending_.size() - len, len);
    bool is_prefix = false;
    for (const auto& s : stops_) {
      if (s.size() > len && std::string_view(s).substr(0, len) == suffix) {
        is_prefix = true;
        break;
      }
    }
    if (is_prefix) {
      hold = len;
      break;
    }
  }
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string StopMatcher::flush() {
  if (matched_) return {};
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace kun::server
