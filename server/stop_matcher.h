// Stop sequences matched on detokenized text. Text arrives in pieces (one per token); the
// matcher releases text that can no longer be part of a stop string and holds back a suffix
// that might still grow into one. On a match the output is truncated before the stop string.
// Single-threaded (owned by one connection's strand).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace kun::server {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);

  // Appends `piece` and returns the text that is now safe to send. After a match, `matched()`
  // is true and every later call returns "".
  std::string push(std::string_view piece);
  // Returns the held-back text (call once the generation ended without a match).
  std::string flush();
  bool matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  std::size_t max_stop_len_ = 0;
  std::string pending_;  // text not yet released
  bool matched_ = false;
};

}  // namespace kun::server
