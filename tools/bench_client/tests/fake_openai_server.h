// A scripted OpenAI-compatible streaming server for tests: listens on 127.0.0.1 (an ephemeral
// port), one thread per connection (synchronous Beast), replies to POST /v1/completions as the
// script says (status, first-token delay, token period, disconnect mid-stream, hang) and to
// GET /metrics with fixed Prometheus text. Timings are scheduled from the moment the request
// was read, with sleep_until, so they do not drift.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tools/bench_client/beast_includes.h"

namespace kun::bench::testing {

struct FakeReply {
  int status = 200;
  int first_token_ms = 50;
  int token_gap_ms = 10;
  int tokens = 10;                   // 0: use the request's max_tokens
  int disconnect_after_tokens = -1;  // close the socket after this many tokens
  std::string retry_after;           // Retry-After header of an error reply
  double queue_ms = -1.0;            // reported as usage.queue_time_ms when >= 0
  int hang_ms = 0;                   // sleep before answering at all
};

class FakeOpenAiServer {
 public:
  using Script = std::function<FakeReply(std::size_t request_number, const nlohmann::json& body)>;
  explicit FakeOpenAiServer(Script script, std::string metrics_text = "");
  ~FakeOpenAiServer();
  FakeOpenAiServer(const FakeOpenAiServer&) = delete;
  FakeOpenAiServer& operator=(const FakeOpenAiServer&) = delete;

  std::uint16_t port() const { return port_; }
  std::size_t completions_seen() const { return completions_seen_.load(); }
  std::size_t metrics_seen() const { return metrics_seen_.load(); }

 private:
  void accept_loop();
  void serve(boost::asio::ip::tcp::socket socket);
  bool sleep_until_or_stop(std::chrono::steady_clock::time_point t) const;

  Script script_;
  std::string metrics_text_;
  boost::asio::io_context ioc_;
  boost::asio::ip::tcp::acceptor acceptor_;
  std::uint16_t port_ = 0;
  std::thread accept_thread_;
  std::mutex mu_;
  std::vector<std::thread> connections_;
  std::atomic<bool> stop_{false};
  std::atomic<std::size_t> completions_seen_{0};
  std::atomic<std::size_t> metrics_seen_{0};
};

}  // namespace kun::bench::testing
