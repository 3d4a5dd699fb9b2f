// Bench client: an OpenAI-API streaming load generator that replays a workload::Trace against
// any OpenAI-compatible server (POST /v1/completions, "stream": true) and returns per-request
// records for the workload/ report math. Built on Boost.Asio/Beast: all connections (one per
// request) and an optional /metrics poller run on one io_context driven by the calling thread;
// run_bench() blocks until every request finished, failed or timed out.
//
// Open loop: request i is sent at start + trace.requests[i].arrival_us whatever happens to the
// others; TTFT and E2E are measured from that scheduled time, so client-side delays (a full
// max_in_flight window) count against the server, as a user would see them.
// Errors are counted, never thrown: HTTP 429/503 -> kRejected (Retry-After kept), other
// statuses, malformed streams and disconnects -> kFailed, the per-request timeout -> kTimedOut.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "workload/report.h"
#include "workload/trace.h"

namespace kun::bench {

enum class PromptKind {
  kTokenIds,  // "prompt": [ids...], prompt_tokens ids drawn from [first_token_id, vocab_size)
  kText,      // "prompt": "w w w ..." with prompt_tokens words (about that many tokens)
};

enum class ProgressMode { kAuto, kOn, kOff };  // kAuto: a progress bar when stdout is a TTY

struct BenchClientConfig {
  std::string host = "127.0.0.1";
  std::uint16_t port = 8000;
  std::string completions_path = "/v1/completions";
  std::string model = "kunserve";
  std::string api_key;  // non-empty: "Authorization: Bearer <api_key>" on every request and poll
  PromptKind prompt_kind = PromptKind::kTokenIds;
  std::int32_t vocab_size = 32000;
  std::int32_t first_token_id = 10;  // skip special tokens at the start of the vocabulary
  std::uint64_t seed = 0;            // token ids of the synthetic prompts
  // Overrides the "prompt" field (e.g. real token ids from the served model's tokenizer).
  std::function<nlohmann::json(std::size_t index, const workload::TraceRequest& request)> prompt_builder;
  bool ignore_eos = true;
  std::int64_t request_timeout_ms = 600'000;  // whole request: connect to end of stream
  std::int64_t connect_timeout_ms = 10'000;
  std::int64_t max_in_flight = 0;  // 0: unlimited; otherwise requests wait client-side
  // Polls GET metrics_path every metrics_interval_ms (0: off) and keeps the gauge samples whose
  // metric name starts with one of metric_prefixes (empty: every sample).
  std::int64_t metrics_interval_ms = 0;
  std::string metrics_path = "/metrics";
  std::vector<std::string> metric_prefixes = {"kunserve_", "vllm:num_requests", "vllm:gpu_cache_usage"};
  ProgressMode progress = ProgressMode::kAuto;
};

struct BenchResult {
  // One per trace request, in trace order; times in microseconds since the bench started.
  std::vector<workload::RequestRecord> records;
  std::vector<workload::GaugeSample> gauges;  // from /metrics, same clock
  std::int64_t wall_us = 0;
  std::int64_t metrics_errors = 0;  // failed /metrics polls
};

// Replays `trace`; an error Status only for a bad configuration or an unresolvable host.
StatusOr<BenchResult> run_bench(const BenchClientConfig& config, const workload::Trace& trace);
// The records only.
StatusOr<std::vector<workload::RequestRecord>> run_load(const BenchClientConfig& config, const workload::Trace& trace);

// GET `path` from the server (blocking, bounded by connect_timeout_ms); the body of a 200.
StatusOr<std::string> http_get(const BenchClientConfig& config, const std::string& path);
// The first model id the server lists at GET /v1/models (what "model" must name).
StatusOr<std::string> fetch_served_model(const BenchClientConfig& config);

// The JSON body sent for one request (exposed for tests and for `kunserve bench --dry-run`).
nlohmann::json make_request_body(const BenchClientConfig& config, std::size_t index, const workload::TraceRequest& r);

// Server-sent events: feed bytes as they arrive, get the `data:` payload of each complete event
// (multi-line data joined with '\n'). Comments (':') and other fields are ignored.
class SseParser {
 public:
  std::vector<std::string> feed(std::string_view bytes);

 private:
  std::string line_;
  std::string data_;
  bool has_data_ = false;
};

// Prometheus text exposition format. Malformed lines are skipped (and counted).
struct PrometheusSample {
  std::string name;    // metric name
  std::string series;  // name plus the label set as written, e.g. kunserve_demand{instance="0"}
  double value = 0.0;
};
struct PrometheusParse {
  std::vector<PrometheusSample> samples;
  std::int64_t malformed_lines = 0;
};
PrometheusParse parse_prometheus_text(std::string_view text);

}  // namespace kun::bench
