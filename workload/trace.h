// Trace model and readers. A trace is a list of requests sorted by arrival time; arrival_us is
// relative to the trace's start (the first request of a file read from disk arrives at 0).
// Pure code: the readers are the only I/O in this module (they read one file).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace kun::workload {

struct TraceRequest {
  std::int64_t arrival_us = 0;
  std::int32_t prompt_tokens = 0;
  std::int32_t output_tokens = 0;
};

struct Trace {
  std::string name;  // file name or generator description, for reports
  std::vector<TraceRequest> requests;

  std::size_t size() const { return requests.size(); }
  bool empty() const { return requests.empty(); }
  // Arrival of the last request (0 for an empty trace).
  std::int64_t span_us() const { return requests.empty() ? 0 : requests.back().arrival_us; }
};

// Sorts by arrival (stable) and checks the invariants every function here relies on.
void normalize(Trace& trace);
// KUN_CHECKs: sorted, non-negative arrivals, non-negative lengths.
void check_trace(const Trace& trace);

// Azure LLM inference trace CSV: TIMESTAMP,ContextTokens,GeneratedTokens with timestamps like
// "2023-11-16 18:17:03.9799600" (digits past the 6th fraction digit are truncated). Columns are
// found by header name, so extra columns are allowed. Arrivals become relative to the first row.
StatusOr<Trace> read_azure_csv(const std::string& path);
// Same, from text already in memory (name is used in error messages as the file name).
StatusOr<Trace> parse_azure_csv(std::string_view text, const std::string& name);

// BurstGPT CSV: Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type with the
// timestamp in seconds from the start of the log. model_filter, if not empty, keeps only rows of
// that Model (e.g. "ChatGPT"). Rows with 0 response tokens (failed requests in the log) are kept
// as they are; clip_lengths() raises them to 1.
StatusOr<Trace> read_burstgpt_csv(const std::string& path, const std::string& model_filter = "");
StatusOr<Trace> parse_burstgpt_csv(std::string_view text, const std::string& name,
                                   const std::string& model_filter = "");

// Picks the reader from the header line (Azure or BurstGPT).
StatusOr<Trace> read_trace_csv(const std::string& path);

// Parses "YYYY-MM-DD HH:MM:SS[.fraction]" as microseconds since 1970-01-01 (UTC, no zone).
StatusOr<std::int64_t> parse_timestamp_us(std::string_view text);

// ---- Transformations (all return a new, normalized trace) ----

// Divides every arrival time by factor (factor 2 = twice the rate, same shape). factor > 0.
Trace time_compress(const Trace& trace, double factor);
// Shortens every gap between consecutive arrivals longer than max_gap_us to max_gap_us (later
// arrivals move earlier by the time cut), so a replay does not sleep through quiet stretches.
Trace cap_idle_gaps(const Trace& trace, std::int64_t max_gap_us);

// Keeps the requests arriving in [start_us, start_us + duration_us) and rebases them so the
// window starts at 0 (the first kept request arrives at its offset inside the window).
Trace select_window(const Trace& trace, std::int64_t start_us, std::int64_t duration_us);

// Caps output at max_output_tokens (if > 0), then the prompt so that prompt + output <=
// max_context_tokens (if > 0). Both lengths end >= 1; a request whose output alone exceeds the
// context keeps a 1-token prompt and max_context - 1 output tokens.
Trace clip_lengths(const Trace& trace, std::int32_t max_context_tokens,
                   std::int32_t max_output_tokens = 0);

// TraceUpscaler-style rate scaling. factor >= 1: keeps every original request and adds
// (factor - 1) * n new ones; each new request copies the arrival pattern of the trace by picking
// a random original request i and arriving uniformly within +-half the smaller of its two
// neighbouring gaps of it, so a window with k requests gains about (factor - 1) * k: the rate scales
// by factor in every window and the burst shape (peak/mean, silent periods) stays. New requests take lengths from another random original
// request (the empirical joint length distribution). factor < 1 keeps each request with
// probability factor. Deterministic for a seed.
Trace upscale(const Trace& trace, double factor, std::uint64_t seed);

}  // namespace kun::workload
