// FakeFrontDoor: an engine front door for server tests. Its own serving thread emits scripted
// tokens on a fixed schedule (token k of a request at arrival + first_token_us +
// k * inter_token_us), a bounded admission limit returns kOverloaded, cancel() frees the
// request's KV blocks at once (visible through used_blocks()) and queues a kCancelled final
// event, and an optional emit log records when each token was handed to the callback
// (steady_clock, comparable across processes on Linux) for latency measurements.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/api.h"

namespace kun::server::testing {

struct FakeConfig {
  std::string model_name = "fake-model";
  std::int64_t max_context_tokens = 512;
  std::int64_t vocab_size = 258;
  std::int32_t eos_token_id = 257;
  std::int64_t first_token_us = 1000;
  std::int64_t inter_token_us = 1000;
  std::size_t max_requests = 1024;  // admitted (running) requests; beyond -> kOverloaded
  std::int64_t block_size_tokens = 16;
  std::int64_t kv_blocks_total = 1 << 20;
  // > 0: a request with prompt + max_tokens beyond this is accepted by submit() but then fails
  // before generating anything (a final kError event with kOutOfRange), as the real engine
  // does when a request can never fit an instance's KV cache.
  std::int64_t async_reject_over_tokens = 0;
  // The tokens a request would generate (before max_tokens / EOS cut it). Default: the bytes
  // of "The quick brown fox jumps over the lazy dog. " repeated.
  std::function<std::vector<std::int32_t>(const engine::RequestSpec&)> script;
};

class FakeFrontDoor final : public engine::FrontDoor {
 public:
  explicit FakeFrontDoor(FakeConfig config);
  ~FakeFrontDoor() override;
  FakeFrontDoor(const FakeFrontDoor&) = delete;
  FakeFrontDoor& operator=(const FakeFrontDoor&) = delete;

  const engine::ModelInfo& model_info() const override { return info_; }
  StatusOr<RequestId> submit(engine::RequestSpec spec, engine::TokenCallback on_event) override;
  void cancel(RequestId id) override;
  engine::ServingStats stats() const override;

  // Test controls and probes (thread-safe).
  void set_unavailable(bool unavailable);
  void set_extra_stats(engine::ServingStats extra);  // instances / KunServe fields for /metrics
  std::int64_t used_blocks() const;
  std::size_t active_requests() const;
  std::size_t max_active_seen() const;
  std::int64_t cancel_count() const;
  std::int64_t submit_count() const;
  bool wait_idle(std::chrono::milliseconds timeout) const;  // until no request is active
  // Blocks until the number of active requests is >= n or the timeout passes.
  bool wait_active_at_least(std::size_t n, std::chrono::milliseconds timeout) const;

  struct EmitLog {
    std::vector<std::int32_t> prompt_tokens;
    std::vector<std::int64_t> emit_ns;  // steady_clock ns at which each token was delivered
  };
  void enable_emit_log(bool on);
  std::vector<EmitLog> take_emit_log();

 private:
  struct Req {
    RequestId id;
    engine::RequestSpec spec;
    engine::TokenCallback cb;
    std::vector<std::int32_t> script;
    std::int64_t generated = 0;
    std::int64_t next_due_us = 0;
    std::int64_t blocks = 0;
    engine::RequestTimings timings;
    EmitLog log;
  };
  struct Delivery {
    engine::TokenCallback cb;
    engine::TokenEvent ev;
    std::size_t log_index = static_cast<std::size_t>(-1);  // request slot for emit logging
    RequestId log_id;
  };

  std::int64_t now_us() const;
  std::int64_t blocks_for(std::int64_t tokens) const;
  void run();
  engine::TokenEvent make_final(Req& r, engine::FinishReason reason, std::int32_t token) const;

  FakeConfig config_;
  engine::ModelInfo info_;
  std::chrono::steady_clock::time_point origin_;

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;       // wakes the serving thread
  mutable std::condition_variable idle_cv_;  // wakes waiters on the active count
  std::size_t delivering_ = 0;               // events handed to callbacks outside the lock
  bool stop_ = false;
  bool unavailable_ = false;
  std::map<std::int64_t, Req> active_;
  std::deque<Delivery> pending_finals_;  // cancels, delivered by the serving thread
  std::int64_t next_id_ = 1;
  std::int64_t used_blocks_ = 0;
  std::size_t max_active_seen_ = 0;
  std::int64_t cancels_ = 0;
  std::int64_t submits_ = 0;
  std::int64_t prompt_tokens_total_ = 0;
  std::int64_t generation_tokens_total_ = 0;
  std::int64_t finished_total_ = 0;
  engine::ServingStats extra_;
  bool log_on_ = false;
  std::map<std::int64_t, EmitLog> live_logs_;
  std::vector<EmitLog> done_logs_;
  std::thread thread_;
};

}  // namespace kun::server::testing
