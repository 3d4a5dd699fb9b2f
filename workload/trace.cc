#include "workload/trace.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <sstream>

#include "common/check.h"
#include "workload/random.h"

namespace kun::workload {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '"')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '"')) {
    s.remove_suffix(1);
  }
  return s;
}

std::vector<std::string_view> split_csv(std::string_view line) {
  std::vector<std::string_view> out;
  std::size_t start = 0;
  for (;;) {
    const std::size_t comma = line.find(',', start);
    if (comma == std::string_view::npos) {
      out.push_back(trim(line.substr(start)));
      return out;
    }
    out.push_back(trim(line.substr(start, comma - start)));
    start = comma + 1;
  }
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const auto lower = [](char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; };
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

int find_column(const std::vector<std::string_view>& header, std::string_view name) {
  for (std::size_t i = 0; i < header.size(); ++i) {
    if (iequals(header[i], name)) return static_cast<int>(i);
  }
  return -1;
}

template <typename T>
bool parse_int(std::string_view s, T* out) {
  s = trim(s);
  if (s.empty()) return false;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && ptr == s.data() + s.size();
}

bool parse_double(std::string_view s, double* out) {
  s = trim(s);
  if (s.empty()) return false;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && ptr == s.data() + s.size() && std::isfinite(*out);
}

// Howard Hinnant's days-from-civil formula (public-domain algorithm description).
std::int64_t days_from_civil(std::int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const std::int64_t era = (y >= 0 ? y : y - 399) / 400;
  const auto yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<std::int64_t>(doe) - 719468;
}

StatusOr<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("cannot open trace file " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return data_loss("error reading trace file " + path);
  return ss.str();
}

// Calls row_fn(line_number, fields) for each non-empty line after the header.
template <typename RowFn>
Status for_each_row(std::string_view text, const std::string& name,
                    std::vector<std::string_view>* header, RowFn row_fn) {
  std::size_t pos = 0;
  int line_no = 0;
  bool have_header = false;
  while (pos < text.size()) {
    std::size_t eol = text.find('\n', pos);
    if (eol == std::string_view::npos) eol = text.size();
    std::string_view line = text.substr(pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (trim(line).empty()) continue;
    if (!have_header) {
      // Strip a UTF-8 byte order mark.
      if (line.size() >= 3 && line.substr(0, 3) == "\xEF\xBB\xBF") line.remove_prefix(3);
      *header = split_csv(line);
      have_header = true;
      continue;
    }
    Status s = row_fn(line_no, split_csv(line));
    if (!s.ok()) return invalid_argument(name + ":" + std::to_string(line_no) + ": " + s.message());
  }
  if (!have_header) return invalid_argument(name + ": empty file (no header line)");
  return ok_status();
}

}  // namespace

void normalize(Trace& trace) {
  std::stable_sort(trace.requests.begin(), trace.requests.end(),
                   [](const TraceRequest& a, const TraceRequest& b) { return a.arrival_us < b.arrival_us; });
  check_trace(trace);
}

void check_trace(const Trace& trace) {
  std::int64_t prev = 0;
  for (std::size_t i = 0; i < trace.requests.size(); ++i) {
    const TraceRequest& r = trace.requests[i];
    KUN_CHECK_GE(r.arrival_us, prev) << "trace " << trace.name << " not sorted at request " << i;
    KUN_CHECK_GE(r.prompt_tokens, 0) << "request " << i;
    KUN_CHECK_GE(r.output_tokens, 0) << "request " << i;
    prev = r.arrival_us;
  }
}

StatusOr<std::int64_t> parse_timestamp_us(std::string_view text) {
  text = trim(text);
  // YYYY-MM-DD HH:MM:SS[.f...]
  if (text.size() < 19 || text[4] != '-' || text[7] != '-' || (text[10] != ' ' && text[10] != 'T') ||
      text[13] != ':' || text[16] != ':') {
    return invalid_argument("bad timestamp '" + std::string(text) + "' (want YYYY-MM-DD HH:MM:SS.ffffff)");
  }
  std::int64_t year = 0;
  unsigned month = 0, day = 0, hour = 0, minute = 0, second = 0;
  if (!parse_int(text.substr(0, 4), &year) || !parse_int(text.substr(5, 2), &month) ||
      !parse_int(text.substr(8, 2), &day) || !parse_int(text.substr(11, 2), &hour) ||
      !parse_int(text.substr(14, 2), &minute) || !parse_int(text.substr(17, 2), &second) || month < 1 ||
      month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || second > 60) {
    return invalid_argument("bad timestamp '" + std::string(text) + "'");
  }
  std::int64_t frac_us = 0;
  if (text.size() > 19) {
    if (text[19] != '.') return invalid_argument("bad timestamp '" + std::string(text) + "'");
    std::string_view frac = text.substr(20);
    if (frac.empty()) return invalid_argument("bad timestamp fraction '" + std::string(text) + "'");
    int digits = 0;
    for (char c : frac) {
      if (c < '0' || c > '9') return invalid_argument("bad timestamp fraction '" + std::string(text) + "'");
      if (digits < 6) {
        frac_us = frac_us * 10 + (c - '0');
        ++digits;
      }
    }
    for (; digits < 6; ++digits) frac_us *= 10;
  }
  const std::int64_t days = days_from_civil(year, month, day);
  const std::int64_t secs = days * 86400 + hour * 3600 + minute * 60 + second;
  return secs * 1000000 + frac_us;
}

StatusOr<Trace> parse_azure_csv(std::string_view text, const std::string& name) {
  Trace trace;
  trace.name = name;
  std::vector<std::string_view> header;
  int ts_col = -1, ctx_col = -1, gen_col = -1;
  std::size_t ncols = 0;
  bool first = true;
  std::int64_t origin_us = 0;
  Status s = for_each_row(text, name, &header, [&](int, const std::vector<std::string_view>& f) -> Status {
    if (first) {
      ts_col = find_column(header, "TIMESTAMP");
      ctx_col = find_column(header, "ContextTokens");
      gen_col = find_column(header, "GeneratedTokens");
      if (ts_col < 0 || ctx_col < 0 || gen_col < 0) {
        return invalid_argument("header must name TIMESTAMP, ContextTokens and GeneratedTokens");
      }
      ncols = header.size();
    }
    if (f.size() != ncols) {
      return invalid_argument("expected " + std::to_string(ncols) + " columns, got " + std::to_string(f.size()));
    }
    auto ts = parse_timestamp_us(f[ts_col]);
    if (!ts.ok()) return ts.status();
    TraceRequest r;
    if (!parse_int(f[ctx_col], &r.prompt_tokens) || r.prompt_tokens < 0) {
      return invalid_argument("bad ContextTokens '" + std::string(f[ctx_col]) + "'");
    }
    if (!parse_int(f[gen_col], &r.output_tokens) || r.output_tokens < 0) {
      return invalid_argument("bad GeneratedTokens '" + std::string(f[gen_col]) + "'");
    }
    if (first) origin_us = *ts;
    first = false;
    r.arrival_us = *ts - origin_us;
    trace.requests.push_back(r);
    return ok_status();
  });
  if (!s.ok()) return s;
  if (!trace.requests.empty()) {
    // Rows out of order before the first row would be negative: rebase on the earliest.
    std::int64_t min_us = 0;
    for (const auto& r : trace.requests) min_us = std::min(min_us, r.arrival_us);
    for (auto& r : trace.requests) r.arrival_us -= min_us;
  }
  normalize(trace);
  return trace;
}

StatusOr<Trace> read_azure_csv(const std::string& path) {
  KUN_ASSIGN_OR_RETURN(std::string text, read_file(path));
  return parse_azure_csv(text, path);
}

StatusOr<Trace> parse_burstgpt_csv(std::string_view text, const std::string& name,
                                   const std::string& model_filter) {
  Trace trace;
  trace.name = name;
  std::vector<std::string_view> header;
  int ts_col = -1, model_col = -1, req_col = -1, resp_col = -1;
  std::size_t ncols = 0;
  bool first = true;
  std::vector<double> times_s;
  Status s = for_each_row(text, name, &header, [&](int, const std::vector<std::string_view>& f) -> Status {
    if (first) {
      ts_col = find_column(header, "Timestamp");
      model_col = find_column(header, "Model");
      req_col = find_column(header, "Request tokens");
      resp_col = find_column(header, "Response tokens");
      if (ts_col < 0 || req_col < 0 || resp_col < 0) {
        return invalid_argument("header must name Timestamp, Request tokens and Response tokens");
      }
      if (!model_filter.empty() && model_col < 0) return invalid_argument("model filter given but no Model column");
      ncols = header.size();
      first = false;
    }
    if (f.size() != ncols) {
      return invalid_argument("expected " + std::to_string(ncols) + " columns, got " + std::to_string(f.size()));
    }
    double t_s = 0.0;
    if (!parse_double(f[ts_col], &t_s) || t_s < 0.0) {
      return invalid_argument("bad Timestamp '" + std::string(f[ts_col]) + "'");
    }
    TraceRequest r;
    if (!parse_int(f[req_col], &r.prompt_tokens) || r.prompt_tokens < 0) {
      return invalid_argument("bad Request tokens '" + std::string(f[req_col]) + "'");
    }
    if (!parse_int(f[resp_col], &r.output_tokens) || r.output_tokens < 0) {
      return invalid_argument("bad Response tokens '" + std::string(f[resp_col]) + "'");
    }
    if (!model_filter.empty() && f[model_col] != model_filter) return ok_status();
    r.arrival_us = static_cast<std::int64_t>(std::llround(t_s * 1e6));
    trace.requests.push_back(r);
    return ok_status();
  });
  if (!s.ok()) return s;
  normalize(trace);
  if (!trace.requests.empty()) {
    const std::int64_t origin = trace.requests.front().arrival_us;
    for (auto& r : trace.requests) r.arrival_us -= origin;
  }
  return trace;
}

StatusOr<Trace> read_burstgpt_csv(const std::string& path, const std::string& model_filter) {
  KUN_ASSIGN_OR_RETURN(std::string text, read_file(path));
  return parse_burstgpt_csv(text, path, model_filter);
}

StatusOr<Trace> read_trace_csv(const std::string& path) {
  KUN_ASSIGN_OR_RETURN(std::string text, read_file(path));
  const std::size_t eol = text.find('\n');
  const std::string_view first_line = std::string_view(text).substr(0, eol);
  const auto header = split_csv(first_line);
  if (find_column(header, "ContextTokens") >= 0) return parse_azure_csv(text, path);
  if (find_column(header, "Request tokens") >= 0) return parse_burstgpt_csv(text, path);
  return invalid_argument(path + ":1: unknown trace format (want an Azure LLM inference or BurstGPT CSV header)");
}

Trace time_compress(const Trace& trace, double factor) {
  KUN_CHECK_GT(factor, 0.0);
  Trace out;
  out.name = trace.name + " x" + std::to_string(factor) + " time-compressed";
  out.requests = trace.requests;
  for (auto& r : out.requests) r.arrival_us = static_cast<std::int64_t>(std::llround(r.arrival_us / factor));
  normalize(out);
  return out;
}

Trace cap_idle_gaps(const Trace& trace, std::int64_t max_gap_us) {
  KUN_CHECK_GE(max_gap_us, 0);
  Trace out;
  out.name = trace.name + ", idle gaps capped at " + std::to_string(max_gap_us / 1000) + " ms";
  out.requests = trace.requests;
  std::int64_t cut = 0;
  for (std::size_t i = 0; i < out.requests.size(); ++i) {
    const std::int64_t original = trace.requests[i].arrival_us;
    if (i > 0) cut += std::max<std::int64_t>(0, original - trace.requests[i - 1].arrival_us - max_gap_us);
    out.requests[i].arrival_us = original - cut;
  }
  normalize(out);
  return out;
}

Trace select_window(const Trace& trace, std::int64_t start_us, std::int64_t duration_us) {
  KUN_CHECK_GE(duration_us, 0);
  Trace out;
  out.name = trace.name + " [" + std::to_string(start_us) + "us +" + std::to_string(duration_us) + "us]";
  for (const auto& r : trace.requests) {
    if (r.arrival_us >= start_us && r.arrival_us - start_us < duration_us) {
      TraceRequest c = r;
      c.arrival_us -= start_us;
      out.requests.push_back(c);
    }
  }
  normalize(out);
  return out;
}

Trace clip_lengths(const Trace& trace, std::int32_t max_context_tokens, std::int32_t max_output_tokens) {
  KUN_CHECK(max_context_tokens <= 0 || max_context_tokens >= 2) << "max context " << max_context_tokens;
  Trace out = trace;
  for (auto& r : out.requests) {
    if (max_output_tokens > 0) r.output_tokens = std::min(r.output_tokens, max_output_tokens);
    r.output_tokens = std::max(r.output_tokens, 1);
    r.prompt_tokens = std::max(r.prompt_tokens, 1);
    if (max_context_tokens > 0 && r.prompt_tokens + r.output_tokens > max_context_tokens) {
      r.output_tokens = std::min(r.output_tokens, max_context_tokens - 1);
      r.prompt_tokens = max_context_tokens - r.output_tokens;
    }
  }
  return out;
}

Trace upscale(const Trace& trace, double factor, std::uint64_t seed) {
  KUN_CHECK_GT(factor, 0.0);
  Rng rng(seed);
  Trace out;
  out.name = trace.name + " upscaled x" + std::to_string(factor);
  const std::size_t n = trace.requests.size();
  if (n == 0) return out;
  if (factor < 1.0) {
    for (const auto& r : trace.requests) {
      if (rng.uniform() < factor) out.requests.push_back(r);
    }
    return out;
  }
  out.requests = trace.requests;
  const double extra = (factor - 1.0) * static_cast<double>(n);
  auto num_extra = static_cast<std::size_t>(extra);
  if (rng.uniform() < extra - static_cast<double>(num_extra)) ++num_extra;
  out.requests.reserve(n + num_extra);
  for (std::size_t k = 0; k < num_extra; ++k) {
    const std::size_t i = rng.uniform_index(n);
    const std::int64_t t0 = trace.requests[i].arrival_us;
    // The copy lands within half the smaller of request i's two neighbouring gaps of it: inside a
    // burst that is the local spacing, and the last request before a silent minute does not
    // spill copies into the silence.
    const std::int64_t gap_next = i + 1 < n ? trace.requests[i + 1].arrival_us - t0 : -1;
    const std::int64_t gap_prev = i > 0 ? t0 - trace.requests[i - 1].arrival_us : -1;
    std::int64_t gap = 0;
    if (gap_next >= 0 && gap_prev >= 0) gap = std::min(gap_next, gap_prev);
    else gap = std::max<std::int64_t>({gap_next, gap_prev, 0});
    const double offset = (rng.uniform() - 0.5) * static_cast<double>(gap);
    TraceRequest r = trace.requests[rng.uniform_index(n)];
    r.arrival_us = std::clamp<std::int64_t>(t0 + static_cast<std::int64_t>(offset), trace.requests.front().arrival_us,
                                            trace.requests.back().arrival_us);
    out.requests.push_back(r);
  }
  normalize(out);
  return out;
}

}  // namespace kun::workload
