// Latency report math: per-request records in, summaries / SLO attainment / goodput / a
// per-second timeline / JSON out. Pure code; the bench client (tools/bench_client) and the
// simulator (sim/) both produce RequestRecords and share this math.
//
// Definitions (all times on one clock in microseconds; reported in ms):
//   TTFT  = first_token_us - arrival_us                      (ok requests)
//   E2E   = finish_us - arrival_us                           (ok requests)
//   TPOT  = (E2E - TTFT) / (output_tokens - 1), one value per ok request with >= 2 output
//           tokens; the summary is over requests (mean = mean of per-request TPOTs)
//   ITL   = every gap between consecutive token_times_us of an ok request, pooled
//   queue = queue_us where the server reported it (>= 0)
//   SLO   = a request meets the SLO when it is ok, TTFT <= ttft_ms and TPOT <= tpot_ms (a request
//           with one output token meets any TPOT SLO; a limit <= 0 is no limit). Attainment is
//           over all requests (failed ones miss). goodput_rps = requests meeting both / duration_s.
//   duration_s = last finish (or arrival, for requests that never finished) - first arrival.
// Percentiles: linear interpolation between closest ranks (see stats.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "workload/stats.h"

namespace kun::workload {

enum class RequestOutcome {
  kOk,        // stream finished normally
  kRejected,  // HTTP 429 / 503 (server overloaded)
  kFailed,    // other HTTP status, malformed stream, disconnect
  kTimedOut,  // the client's per-request timeout fired
};
const char* outcome_name(RequestOutcome outcome);

struct RequestRecord {
  std::int64_t index = 0;        // position in the trace
  std::int64_t front_door_id = -1;  // request id an in-process front door gave it (-1: unknown)
  std::int64_t arrival_us = 0;   // when the request was due to be sent
  std::int64_t first_token_us = -1;
  std::vector<std::int64_t> token_times_us;  // one per streamed chunk that carried text/tokens
  std::int64_t finish_us = -1;   // end of stream (or of the failure)
  std::int64_t queue_us = -1;    // server-reported queue time; -1 when unknown
  std::int32_t prompt_tokens = 0;
  std::int32_t expected_output_tokens = 0;  // what was asked for (max_tokens)
  std::int32_t output_tokens = 0;  // generated: usage.completion_tokens, else the chunk count
  std::int64_t recomputed_tokens = -1;  // prefill work the engine redid for it (-1: unknown, e.g. HTTP)
  std::int64_t transition_recomputed_tokens = -1;  // of that, redone because a transition lost its KV
  RequestOutcome outcome = RequestOutcome::kOk;
  int http_status = 0;
  double retry_after_s = -1.0;   // Retry-After of a rejection, -1 if absent
  std::string error;
};

struct SloSpec {
  double ttft_ms = 0.0;  // <= 0: no limit
  double tpot_ms = 0.0;  // <= 0: no limit
};

struct Report {
  std::string policy;
  std::int64_t total = 0;
  std::int64_t completed = 0;
  std::int64_t failed = 0;  // total - completed (rejected and timed out included)
  std::int64_t rejected = 0;
  std::int64_t timed_out = 0;
  Summary ttft_ms, tpot_ms, itl_ms, e2e_ms, queue_ms;
  SloSpec slo;
  std::int64_t slo_met = 0;
  double slo_ttft_attainment = 0.0;
  double slo_tpot_attainment = 0.0;
  double slo_attainment = 0.0;
  double goodput_rps = 0.0;
  double duration_s = 0.0;
  double request_throughput_rps = 0.0;  // completed / duration_s
  double output_tokens_per_s = 0.0;
};

// Per-request values, exposed for plots (TTFT CDF) and tests. Only ok requests contribute.
std::vector<double> ttft_values_ms(const std::vector<RequestRecord>& records);
std::vector<double> tpot_values_ms(const std::vector<RequestRecord>& records);
std::vector<double> itl_values_ms(const std::vector<RequestRecord>& records);

Report build_report(const std::vector<RequestRecord>& records, const std::string& policy, const SloSpec& slo);

// {"policy", "requests": {"completed","failed","rejected","timed_out","total"},
//  "ttft_ms": {"count","mean","p50","p90","p99","p999"}, "tpot_ms", "itl_ms", "e2e_ms", "queue_ms",
//  "slo": {"ttft_ms","tpot_ms","met","ttft_attainment","tpot_attainment","attainment"},
//  "goodput_rps", "duration_s", "request_throughput_rps", "output_tokens_per_s"}.
// NaN (no samples) is written as null.
nlohmann::json report_to_json(const Report& report);
// Several reports side by side (one column per policy), as a fixed-width text table.
std::string format_report_table(const std::vector<Report>& reports);

// A sampled server gauge (e.g. from /metrics): series is the metric name with its labels.
struct GaugeSample {
  std::int64_t t_us = 0;
  std::string series;
  double value = 0.0;
};

struct TimelineRow {
  std::int64_t bucket = 0;  // index: covers [bucket * bucket_us, (bucket + 1) * bucket_us)
  std::int64_t arrivals = 0;
  std::int64_t completions = 0;  // ok requests finishing in the bucket
  std::int64_t failures = 0;     // non-ok requests finishing in the bucket
  double output_tokens = 0.0;    // tokens streamed in the bucket (a chunk carries
                                 // output_tokens / chunks of its request)
  double mean_ttft_ms = 0.0;     // of ok requests arriving in the bucket; NaN if none
  std::vector<double> gauges;    // last sample of each gauge series in the bucket; NaN if none
};

struct Timeline {
  std::int64_t bucket_us = 1'000'000;
  std::vector<std::string> gauge_series;  // sorted
  std::vector<TimelineRow> rows;          // contiguous from bucket 0 to the last event
};

Timeline build_timeline(const std::vector<RequestRecord>& records, const std::vector<GaugeSample>& gauges,
                        std::int64_t bucket_us = 1'000'000);
// Header "t_s,arrivals,completions,failures,output_tokens_per_s,mean_ttft_ms,<gauge series...>";
// empty cells for NaN. Series names are quoted if they contain a comma or a quote.
std::string timeline_to_csv(const Timeline& timeline);

}  // namespace kun::workload
