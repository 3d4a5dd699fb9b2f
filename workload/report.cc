#include "workload/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <sstream>

#include "common/check.h"

namespace kun::workload {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double to_ms(std::int64_t us) { return static_cast<double>(us) / 1000.0; }

bool is_ok(const RequestRecord& r) { return r.outcome == RequestOutcome::kOk; }

double ttft_ms_of(const RequestRecord& r) {
  KUN_CHECK_GE(r.first_token_us, 0) << "ok request " << r.index << " has no first token";
  return to_ms(r.first_token_us - r.arrival_us);
}

// NaN for requests with fewer than 2 output tokens.
double tpot_ms_of(const RequestRecord& r) {
  if (r.output_tokens < 2 || r.first_token_us < 0 || r.finish_us < 0) return kNaN;
  return to_ms(r.finish_us - r.first_token_us) / static_cast<double>(r.output_tokens - 1);
}

nlohmann::json number_or_null(double v) {
  if (std::isnan(v) || std::isinf(v)) return nullptr;
  return v;
}

nlohmann::json summary_json(const Summary& s) {
  return {{"count", s.count},
          {"mean", number_or_null(s.mean)},
          {"p50", number_or_null(s.p50)},
          {"p90", number_or_null(s.p90)},
          {"p99", number_or_null(s.p99)},
          {"p999", number_or_null(s.p999)}};
}

std::string fixed(double v, int digits) {
  if (std::isnan(v)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string csv_cell(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

}  // namespace

const char* outcome_name(RequestOutcome outcome) {
  switch (outcome) {
    case RequestOutcome::kOk: return "ok";
    case RequestOutcome::kRejected: return "rejected";
    case RequestOutcome::kFailed: return "failed";
    case RequestOutcome::kTimedOut: return "timed_out";
  }
  return "unknown";
}

std::vector<double> ttft_values_ms(const std::vector<RequestRecord>& records) {
  std::vector<double> v;
  for (const auto& r : records) {
    if (is_ok(r)) v.push_back(ttft_ms_of(r));
  }
  return v;
}

std::vector<double> tpot_values_ms(const std::vector<RequestRecord>& records) {
  std::vector<double> v;
  for (const auto& r : records) {
    if (!is_ok(r)) continue;
    const double t = tpot_ms_of(r);
    if (!std::isnan(t)) v.push_back(t);
  }
  return v;
}

std::vector<double> itl_values_ms(const std::vector<RequestRecord>& records) {
  std::vector<double> v;
  for (const auto& r : records) {
    if (!is_ok(r)) continue;
    for (std::size_t i = 1; i < r.token_times_us.size(); ++i) {
      v.push_back(to_ms(r.token_times_us[i] - r.token_times_us[i - 1]));
    }
  }
  return v;
}

Report build_report(const std::vector<RequestRecord>& records, const std::string& policy, const SloSpec& slo) {
  Report rep;
  rep.policy = policy;
  rep.slo = slo;
  rep.total = static_cast<std::int64_t>(records.size());
  std::vector<double> e2e, queue;
  std::int64_t ttft_met = 0, tpot_met = 0;
  std::int64_t first_us = std::numeric_limits<std::int64_t>::max();
  std::int64_t last_us = std::numeric_limits<std::int64_t>::min();
  double output_tokens = 0.0;
  for (const auto& r : records) {
    first_us = std::min(first_us, r.arrival_us);
    last_us = std::max({last_us, r.arrival_us, r.finish_us});
    if (r.outcome == RequestOutcome::kRejected) ++rep.rejected;
    if (r.outcome == RequestOutcome::kTimedOut) ++rep.timed_out;
    if (!is_ok(r)) continue;
    ++rep.completed;
    KUN_CHECK_GE(r.finish_us, 0) << "ok request " << r.index << " has no finish time";
    e2e.push_back(to_ms(r.finish_us - r.arrival_us));
    if (r.queue_us >= 0) queue.push_back(to_ms(r.queue_us));
    output_tokens += r.output_tokens;
    const bool ttft_ok = slo.ttft_ms <= 0.0 || ttft_ms_of(r) <= slo.ttft_ms;
    const double tpot = tpot_ms_of(r);
    const bool tpot_ok = slo.tpot_ms <= 0.0 || std::isnan(tpot) || tpot <= slo.tpot_ms;
    ttft_met += ttft_ok;
    tpot_met += tpot_ok;
    rep.slo_met += ttft_ok && tpot_ok;
  }
  rep.failed = rep.total - rep.completed;
  rep.ttft_ms = summarize(ttft_values_ms(records));
  rep.tpot_ms = summarize(tpot_values_ms(records));
  std::vector<std::int64_t> itl_us;  // summarized as integers (summarize_us_as_ms), the same figures
  for (const auto& r : records) {
    if (!is_ok(r)) continue;
    for (std::size_t i = 1; i < r.token_times_us.size(); ++i) itl_us.push_back(r.token_times_us[i] - r.token_times_us[i - 1]);
  }
  rep.itl_ms = summarize_us_as_ms(std::move(itl_us));
  rep.e2e_ms = summarize(std::move(e2e));
  rep.queue_ms = summarize(std::move(queue));
  if (rep.total > 0) {
    const auto total = static_cast<double>(rep.total);
    rep.slo_ttft_attainment = static_cast<double>(ttft_met) / total;
    rep.slo_tpot_attainment = static_cast<double>(tpot_met) / total;
    rep.slo_attainment = static_cast<double>(rep.slo_met) / total;
    rep.duration_s = static_cast<double>(last_us - first_us) / 1e6;
  }
  if (rep.duration_s > 0.0) {
    rep.goodput_rps = static_cast<double>(rep.slo_met) / rep.duration_s;
    rep.request_throughput_rps = static_cast<double>(rep.completed) / rep.duration_s;
    rep.output_tokens_per_s = output_tokens / rep.duration_s;
  }
  return rep;
}

nlohmann::json report_to_json(const Report& r) {
  nlohmann::json j;
  j["policy"] = r.policy;
  j["requests"] = {{"completed", r.completed},
                   {"failed", r.failed},
                   {"rejected", r.rejected},
                   {"timed_out", r.timed_out},
                   {"total", r.total}};
  j["ttft_ms"] = summary_json(r.ttft_ms);
  j["tpot_ms"] = summary_json(r.tpot_ms);
  j["itl_ms"] = summary_json(r.itl_ms);
  j["e2e_ms"] = summary_json(r.e2e_ms);
  j["queue_ms"] = summary_json(r.queue_ms);
  j["slo"] = {{"ttft_ms", r.slo.ttft_ms},
              {"tpot_ms", r.slo.tpot_ms},
              {"met", r.slo_met},
              {"ttft_attainment", r.slo_ttft_attainment},
              {"tpot_attainment", r.slo_tpot_attainment},
              {"attainment", r.slo_attainment}};
  j["goodput_rps"] = r.goodput_rps;
  j["duration_s"] = r.duration_s;
  j["request_throughput_rps"] = r.request_throughput_rps;
  j["output_tokens_per_s"] = r.output_tokens_per_s;
  return j;
}

std::string format_report_table(const std::vector<Report>& reports) {
  std::vector<std::pair<std::string, std::vector<std::string>>> rows;
  auto add = [&](const std::string& label, auto fn) {
    std::vector<std::string> cells;
    for (const auto& r : reports) cells.push_back(fn(r));
    rows.emplace_back(label, std::move(cells));
  };
  add("policy", [](const Report& r) { return r.policy; });
  add("completed/total", [](const Report& r) { return std::to_string(r.completed) + "/" + std::to_string(r.total); });
  add("rejected", [](const Report& r) { return std::to_string(r.rejected); });
  add("failed (all)", [](const Report& r) { return std::to_string(r.failed); });
  const std::pair<const char*, Summary Report::*> metrics[] = {
      {"TTFT", &Report::ttft_ms}, {"TPOT", &Report::tpot_ms}, {"ITL", &Report::itl_ms},
      {"E2E", &Report::e2e_ms},   {"queue", &Report::queue_ms}};
  for (const auto& [name, member] : metrics) {
    add(std::string(name) + " mean ms", [m = member](const Report& r) { return fixed((r.*m).mean, 1); });
    add(std::string(name) + " p50 ms", [m = member](const Report& r) { return fixed((r.*m).p50, 1); });
    add(std::string(name) + " p90 ms", [m = member](const Report& r) { return fixed((r.*m).p90, 1); });
    add(std::string(name) + " p99 ms", [m = member](const Report& r) { return fixed((r.*m).p99, 1); });
    add(std::string(name) + " p99.9 ms", [m = member](const Report& r) { return fixed((r.*m).p999, 1); });
  }
  add("SLO attainment %", [](const Report& r) { return fixed(100.0 * r.slo_attainment, 1); });
  add("goodput req/s", [](const Report& r) { return fixed(r.goodput_rps, 2); });
  add("output tok/s", [](const Report& r) { return fixed(r.output_tokens_per_s, 1); });
  add("duration s", [](const Report& r) { return fixed(r.duration_s, 1); });
  std::size_t label_w = 0;
  std::vector<std::size_t> col_w(reports.size(), 0);
  for (const auto& [label, cells] : rows) {
    label_w = std::max(label_w, label.size());
    for (std::size_t i = 0; i < cells.size(); ++i) col_w[i] = std::max(col_w[i], cells[i].size());
  }
  std::ostringstream out;
  for (const auto& [label, cells] : rows) {
    out << label << std::string(label_w - label.size(), ' ');
    for (std::size_t i = 0; i < cells.size(); ++i) {
      out << "  " << std::string(col_w[i] - cells[i].size(), ' ') << cells[i];
    }
    out << '\n';
  }
  return out.str();
}

Timeline build_timeline(const std::vector<RequestRecord>& records, const std::vector<GaugeSample>& gauges,
                        std::int64_t bucket_us) {
  KUN_CHECK_GT(bucket_us, 0);
  Timeline tl;
  tl.bucket_us = bucket_us;
  std::map<std::string, std::size_t> series_index;
  for (const auto& g : gauges) series_index.emplace(g.series, 0);
  for (auto& [name, idx] : series_index) {
    idx = tl.gauge_series.size();
    tl.gauge_series.push_back(name);
  }
  std::int64_t last_bucket = -1;
  auto bucket_of = [&](std::int64_t t_us) { return t_us < 0 ? std::int64_t{0} : t_us / bucket_us; };
  for (const auto& r : records) {
    last_bucket = std::max({last_bucket, bucket_of(r.arrival_us), r.finish_us >= 0 ? bucket_of(r.finish_us) : -1});
    if (!r.token_times_us.empty()) last_bucket = std::max(last_bucket, bucket_of(r.token_times_us.back()));
  }
  for (const auto& g : gauges) last_bucket = std::max(last_bucket, bucket_of(g.t_us));
  if (last_bucket < 0) return tl;
  tl.rows.resize(static_cast<std::size_t>(last_bucket + 1));
  std::vector<double> ttft_sum(tl.rows.size(), 0.0);
  std::vector<std::int64_t> ttft_n(tl.rows.size(), 0);
  std::vector<std::int64_t> gauge_t(tl.rows.size() * tl.gauge_series.size(), std::numeric_limits<std::int64_t>::min());
  for (std::size_t i = 0; i < tl.rows.size(); ++i) {
    tl.rows[i].bucket = static_cast<std::int64_t>(i);
    tl.rows[i].gauges.assign(tl.gauge_series.size(), kNaN);
  }
  for (const auto& r : records) {
    const auto a = static_cast<std::size_t>(bucket_of(r.arrival_us));
    ++tl.rows[a].arrivals;
    if (r.finish_us >= 0) {
      auto& row = tl.rows[static_cast<std::size_t>(bucket_of(r.finish_us))];
      if (is_ok(r)) ++row.completions;
      else ++row.failures;
    } else if (!is_ok(r)) {
      ++tl.rows[a].failures;
    }
    if (is_ok(r)) {
      ttft_sum[a] += ttft_ms_of(r);
      ++ttft_n[a];
    }
    if (!r.token_times_us.empty()) {
      const double per_chunk = r.output_tokens > 0 ? static_cast<double>(r.output_tokens) /
                                                         static_cast<double>(r.token_times_us.size())
                                                   : 1.0;
      for (std::int64_t t : r.token_times_us) tl.rows[static_cast<std::size_t>(bucket_of(t))].output_tokens += per_chunk;
    }
  }
  for (std::size_t i = 0; i < tl.rows.size(); ++i) {
    tl.rows[i].mean_ttft_ms = ttft_n[i] > 0 ? ttft_sum[i] / static_cast<double>(ttft_n[i]) : kNaN;
  }
  for (const auto& g : gauges) {
    const auto b = static_cast<std::size_t>(bucket_of(g.t_us));
    const std::size_t s = series_index.at(g.series);
    const std::size_t k = b * tl.gauge_series.size() + s;
    if (g.t_us >= gauge_t[k]) {
      gauge_t[k] = g.t_us;
      tl.rows[b].gauges[s] = g.value;
    }
  }
  return tl;
}

std::string timeline_to_csv(const Timeline& tl) {
  std::ostringstream out;
  out << "t_s,arrivals,completions,failures,output_tokens_per_s,mean_ttft_ms";
  for (const auto& s : tl.gauge_series) out << ',' << csv_cell(s);
  out << '\n';
  const double bucket_s = static_cast<double>(tl.bucket_us) / 1e6;
  auto num = [](double v) -> std::string {
    if (std::isnan(v)) return "";
    std::ostringstream ss;
    ss.precision(10);
    ss << v;
    return ss.str();
  };
  for (const auto& row : tl.rows) {
    out << num(static_cast<double>(row.bucket) * bucket_s) << ',' << row.arrivals << ',' << row.completions << ','
        << row.failures << ',' << num(row.output_tokens / bucket_s) << ',' << num(row.mean_ttft_ms);
    for (double g : row.gauges) out << ',' << num(g);
    out << '\n';
  }
  return out.str();
}

}  // namespace kun::workload
