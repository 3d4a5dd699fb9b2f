// Prometheus metrics of the server: histograms the server keeps itself from token events
// (TTFT, inter-token latency, end-to-end, queue time) and the text exposition that combines
// them with FrontDoor::stats(). vLLM-compatible names (vllm:*) where vLLM has one, kunserve_*
// for KunServe's own. Lock-free: token events update it from the engine thread, /metrics
// renders it on an I/O thread.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/api.h"

namespace kun::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void observe(double value);

  struct Snapshot {
    std::vector<double> upper_bounds;
    std::vector<std::uint64_t> cumulative;  // per bound; +Inf is `count`
    std::uint64_t count = 0;
    double sum = 0.0;
  };
  Snapshot snapshot() const;

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> buckets_;  // non-cumulative, bounds_.size() + 1
  std::atomic<double> sum_{0.0};
};

// Builds a snapshot from a list of observations (for latencies the front door reports as lists).
Histogram::Snapshot histogram_of(const std::vector<double>& upper_bounds,
                                 const std::vector<double>& values);

struct ServerMetrics {
  ServerMetrics();

  Histogram time_to_first_token_s;
  Histogram inter_token_latency_s;
  Histogram e2e_latency_s;
  Histogram queue_time_s;
  // Finished requests by finish reason, as vllm:request_success_total{finished_reason}.
  std::array<std::atomic<std::int64_t>, 4> finished{};  // stop, length, abort, error
  std::atomic<std::int64_t> open_connections{0};
  std::atomic<std::int64_t> client_disconnect_cancels{0};
  // HTTP responses by status (index: see http_status_index()).
  static constexpr std::array<int, 11> kTrackedStatuses = {200, 400, 404, 405, 408, 413,
                                                           429, 500, 501, 503, 504};
  std::array<std::atomic<std::int64_t>, kTrackedStatuses.size() + 1> http_responses{};

  void count_response(int http_status);
  void count_finished(engine::FinishReason reason);
};

// Per-request observer of token events; used only from the serving thread's callbacks of one
// request (they are sequential), so it needs no synchronization of its own.
class RequestObserver {
 public:
  void on_event(const engine::TokenEvent& ev, ServerMetrics& metrics);

 private:
  std::int64_t last_token_us_ = -1;
};

// The whole /metrics body in Prometheus text format 0.0.4.
std::string render_metrics(const ServerMetrics& metrics, const engine::ServingStats& stats,
                           std::string_view model_name);

}  // namespace kun::server
