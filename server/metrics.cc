#include "server/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <string>
#include <vector>

#include "common/check.h"

namespace kun::server {
namespace {

// Latency buckets in seconds (chosen for CPU-served models: sub-ms to minutes).
const std::vector<double> kTtftBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
                                          0.25,  0.5,    0.75,  1.0,  2.5,   5.0,  10.0,  20.0,
                                          40.0,  80.0,   160.0, 640.0};
const std::vector<double> kItlBuckets = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03,
                                         0.05,   0.075, 0.1,    0.15,  0.2,  0.3,  0.5,
                                         0.75,   1.0,   2.5,    5.0,   10.0, 20.0};
const std::vector<double> kE2eBuckets = {0.05, 0.1,  0.25, 0.5,  0.75,  1.0,   1.5,   2.0,
                                         2.5,  5.0,  10.0, 15.0, 20.0,  30.0,  45.0,  60.0,
                                         120., 240., 480., 960., 1920., 7680.};
const std::vector<double> kDropBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                          0.25,  0.5,    1.0,   2.5,  5.0,   10.0, 30.0};

std::string fmt_double(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v);
  KUN_CHECK(res.ec == std::errc());
  return std::string(buf, res.ptr);
}

std::string escape_label(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

class Writer {
 public:
  void family(std::string_view name, std::string_view type, std::string_view help) {
    out_ += "# HELP ";
    out_ += name;
    out_ += ' ';
    out_ += help;
    out_ += "\n# TYPE ";
    out_ += name;
    out_ += ' ';
    out_ += type;
    out_ += '\n';
  }
  // labels: already formatted `a="b",c="d"` (may be empty).
  void sample(std::string_view name, std::string_view labels, double value) {
    out_ += name;
    if (!labels.empty()) {
      out_ += '{';
      out_ += labels;
      out_ += '}';
    }
    out_ += ' ';
    out_ += fmt_double(value);
    out_ += '\n';
  }
  void histogram(std::string_view name, std::string_view labels, const Histogram::Snapshot& h) {
    const std::string sep = labels.empty() ? "" : ",";
    for (std::size_t i = 0; i < h.upper_bounds.size(); ++i) {
      sample(std::string(name) + "_bucket",
             std::string(labels) + sep + "le=\"" + fmt_double(h.upper_bounds[i]) + "\"",
             static_cast<double>(h.cumulative[i]));
    }
    sample(std::string(name) + "_bucket", std::string(labels) + sep + "le=\"+Inf\"",
           static_cast<double>(h.count));
    sample(std::string(name) + "_sum", labels, h.sum);
    sample(std::string(name) + "_count", labels, static_cast<double>(h.count));
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)),
      buckets_(std::make_unique<std::atomic<std::uint64_t>[]>(bounds_.size() + 1)) {
  KUN_CHECK(std::is_sorted(bounds_.begin(), bounds_.end()));
  for (std::size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0);
}

void Histogram::observe(double value) {
  if (!std::isfinite(value)) return;
  const auto it = std::lower_bound(bounds_.begin(), bounds_.end(), value);  // first bound >= v
  buckets_[static_cast<std::size_t>(it - bounds_.begin())].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  s.upper_bounds = bounds_;
  s.cumulative.resize(bounds_.size());
  std::uint64_t acc = 0;
  for (std::size_t i = 0; i < bounds_.size(); ++i) {
    acc += buckets_[i].load(std::memory_order_relaxed);
    s.cumulative[i] = acc;
  }
  acc += buckets_[bounds_.size()].load(std::memory_order_relaxed);
  s.count = acc;
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

Histogram::Snapshot histogram_of(const std::vector<double>& upper_bounds,
                                 const std::vector<double>& values) {
  Histogram h(upper_bounds);
  for (double v : values) h.observe(v);
  return h.snapshot();
}

ServerMetrics::ServerMetrics()
    : time_to_first_token_s(kTtftBuckets),
      inter_token_latency_s(kItlBuckets),
      e2e_latency_s(kE2eBuckets),
      queue_time_s(kE2eBuckets) {}

void ServerMetrics::count_response(int http_status) {
  std::size_t idx = kTrackedStatuses.size();
  for (std::size_t i = 0; i < kTrackedStatuses.size(); ++i) {
    if (kTrackedStatuses[i] == http_status) idx = i;
  }
  http_responses[idx].fetch_add(1, std::memory_order_relaxed);
}

void ServerMetrics::count_finished(engine::FinishReason reason) {
  std::size_t idx = 3;
  switch (reason) {
    case engine::FinishReason::kStop: idx = 0; break;
    case engine::FinishReason::kLength: idx = 1; break;
    case engine::FinishReason::kCancelled: idx = 2; break;
    case engine::FinishReason::kNone:
    case engine::FinishReason::kError: idx = 3; break;
  }
  finished[idx].fetch_add(1, std::memory_order_relaxed);
}

void RequestObserver::on_event(const engine::TokenEvent& ev, ServerMetrics& metrics) {
  if (ev.token >= 0) {
    if (last_token_us_ >= 0) {
      metrics.inter_token_latency_s.observe(static_cast<double>(ev.time_us - last_token_us_) * 1e-6);
    }
    last_token_us_ = ev.time_us;
  }
  if (!ev.finished) return;
  metrics.count_finished(ev.reason);
  const auto& t = ev.timings;
  if (t.arrival_us < 0) return;
  if (t.first_token_us >= 0) {
    metrics.time_to_first_token_s.observe(static_cast<double>(t.first_token_us - t.arrival_us) * 1e-6);
  }
  if (t.first_scheduled_us >= 0) {
    metrics.queue_time_s.observe(static_cast<double>(t.first_scheduled_us - t.arrival_us) * 1e-6);
  }
  if (t.finish_us >= 0) {
    metrics.e2e_latency_s.observe(static_cast<double>(t.finish_us - t.arrival_us) * 1e-6);
  }
}

std::string render_metrics(const ServerMetrics& m, const engine::ServingStats& stats,
                           std::string_view model_name) {
  Writer w;
  const std::string model = "model_name=\"" + escape_label(model_name) + "\"";

  std::int64_t running = 0, waiting = 0, blocks_total = 0, blocks_free = 0;
  for (const auto& inst : stats.instances) {
    running += inst.num_running;
    waiting += inst.num_waiting;
    blocks_total += inst.kv_blocks_total;
    blocks_free += inst.kv_blocks_free;
  }
  const double usage =
      blocks_total > 0 ? 1.0 - static_cast<double>(blocks_free) / static_cast<double>(blocks_total)
                       : 0.0;

  w.family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.");
  w.sample("vllm:num_requests_running", model, static_cast<double>(running));
  w.family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.");
  w.sample("vllm:num_requests_waiting", model, static_cast<double>(waiting));
  w.family("vllm:gpu_cache_usage_perc", "gauge",
           "KV-cache usage. 1 means 100 percent usage (device KV blocks in use / total).");
  w.sample("vllm:gpu_cache_usage_perc", model, usage);
  w.family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.");
  w.sample("vllm:kv_cache_usage_perc", model, usage);
  w.family("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions.");
  w.sample("vllm:num_preemptions_total", model, static_cast<double>(stats.num_preemptions));
  w.family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.");
  w.sample("vllm:prompt_tokens_total", model, static_cast<double>(stats.prompt_tokens_total));
  w.family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.");
  w.sample("vllm:generation_tokens_total", model,
           static_cast<double>(stats.generation_tokens_total));

  w.family("vllm:request_success_total", "counter",
           "Count of finished requests by finish reason (served through this HTTP server).");
  static constexpr std::array<const char*, 4> kReasons = {"stop", "length", "abort", "error"};
  for (std::size_t i = 0; i < kReasons.size(); ++i) {
    w.sample("vllm:request_success_total", model + ",finished_reason=\"" + kReasons[i] + "\"",
             static_cast<double>(m.finished[i].load(std::memory_order_relaxed)));
  }

  w.family("vllm:time_to_first_token_seconds", "histogram",
           "Time to first token (engine arrival to first token) in seconds.");
  w.histogram("vllm:time_to_first_token_seconds", model, m.time_to_first_token_s.snapshot());
  const auto itl = m.inter_token_latency_s.snapshot();
  w.family("vllm:time_per_output_token_seconds", "histogram",
           "Time between consecutive output tokens in seconds.");
  w.histogram("vllm:time_per_output_token_seconds", model, itl);
  w.family("vllm:inter_token_latency_seconds", "histogram",
           "Inter-token latency in seconds (same observations as time_per_output_token).");
  w.histogram("vllm:inter_token_latency_seconds", model, itl);
  w.family("vllm:e2e_request_latency_seconds", "histogram",
           "End-to-end request latency (engine arrival to finish) in seconds.");
  w.histogram("vllm:e2e_request_latency_seconds", model, m.e2e_latency_s.snapshot());
  w.family("vllm:request_queue_time_seconds", "histogram",
           "Time requests spent waiting before first scheduled, in seconds.");
  w.histogram("vllm:request_queue_time_seconds", model, m.queue_time_s.snapshot());

  // KunServe's own.
  w.family("kunserve_instance_memory_demand", "gauge",
           "KV blocks needed by running + waiting requests over the instance's KV capacity.");
  for (const auto& inst : stats.instances) {
    w.sample("kunserve_instance_memory_demand", "instance=\"" + std::to_string(inst.instance) + "\"",
             inst.demand);
  }
  w.family("kunserve_group_state", "gauge",
           "Group state of each instance (1 for the current state, 0 otherwise).");
  static constexpr std::array<const char*, 3> kStates = {"INITIAL", "DROPPED", "RESTORING"};
  for (const auto& inst : stats.instances) {
    bool known = false;
    for (const char* s : kStates) known = known || inst.group_state == s;
    for (const char* s : kStates) {
      w.sample("kunserve_group_state",
               "instance=\"" + std::to_string(inst.instance) + "\",state=\"" + s + "\"",
               inst.group_state == s ? 1.0 : 0.0);
    }
    if (!known) {
      w.sample("kunserve_group_state",
               "instance=\"" + std::to_string(inst.instance) + "\",state=\"" +
                   escape_label(inst.group_state) + "\"",
               1.0);
    }
  }
  w.family("kunserve_instance_group", "gauge", "Fused group id of each instance, -1 when independent.");
  for (const auto& inst : stats.instances) {
    w.sample("kunserve_instance_group", "instance=\"" + std::to_string(inst.instance) + "\"",
             static_cast<double>(inst.group));
  }
  w.family("kunserve_dropped_param_bytes", "gauge", "Parameter bytes dropped by each instance.");
  for (const auto& inst : stats.instances) {
    w.sample("kunserve_dropped_param_bytes", "instance=\"" + std::to_string(inst.instance) + "\"",
             static_cast<double>(inst.dropped_param_bytes));
  }
  w.family("kunserve_kv_blocks_capacity", "gauge", "KV blocks of each instance.");
  for (const auto& inst : stats.instances) {
    w.sample("kunserve_kv_blocks_capacity", "instance=\"" + std::to_string(inst.instance) + "\"",
             static_cast<double>(inst.kv_blocks_total));
  }
  w.family("kunserve_kv_blocks_free", "gauge", "Free KV blocks of each instance.");
  for (const auto& inst : stats.instances) {
    w.sample("kunserve_kv_blocks_free", "instance=\"" + std::to_string(inst.instance) + "\"",
             static_cast<double>(inst.kv_blocks_free));
  }
  w.family("kunserve_kv_blocks_exchanged_total", "counter",
           "KV blocks moved between devices by live KV exchange.");
  w.sample("kunserve_kv_blocks_exchanged_total", "",
           static_cast<double>(stats.kv_blocks_exchanged_total));
  w.family("kunserve_recomputed_tokens_total", "counter",
           "Prefill tokens computed again, by cause: a recompute preemption or a transition that lost the KV.");
  w.sample("kunserve_recomputed_tokens_total", "cause=\"transition\"",
           static_cast<double>(stats.transition_recomputed_tokens_total));
  w.sample("kunserve_recomputed_tokens_total", "cause=\"preemption\"",
           static_cast<double>(stats.recomputed_tokens_total - stats.transition_recomputed_tokens_total));
  w.family("kunserve_drops_total", "counter", "Completed parameter drops.");
  w.sample("kunserve_drops_total", "", static_cast<double>(stats.drops_total));
  w.family("kunserve_restores_total", "counter", "Completed parameter restores.");
  w.sample("kunserve_restores_total", "", static_cast<double>(stats.restores_total));
  w.family("kunserve_grows_total", "counter", "Fused groups grown from g to 2g members.");
  w.sample("kunserve_grows_total", "", static_cast<double>(stats.grows_total));
  w.family("kunserve_shrinks_total", "counter", "Fused groups halved (partial restores).");
  w.sample("kunserve_shrinks_total", "", static_cast<double>(stats.shrinks_total));
  w.family("kunserve_transition_failures_total", "counter",
           "Transitions, or steps of one, that failed and were rolled back, completed without the failed step or left "
           "to retry, by kind (runtime/README.md, Failures).");
  // Every kind the cluster runtime reports, zero until it happens, then any other it named.
  static const std::vector<std::string> kinds = {"drop", "restore", "split", "grow", "shrink", "drop_layer",
                                                 "weight_pull", "kv_move", "exchange", "repack", "migrate"};
  std::vector<std::string> all_kinds = kinds;
  for (const auto& [kind, n] : stats.transition_failures_total) {
    if (std::find(kinds.begin(), kinds.end(), kind) == kinds.end()) all_kinds.push_back(kind);
  }
  for (const std::string& kind : all_kinds) {
    const auto it = stats.transition_failures_total.find(kind);
    w.sample("kunserve_transition_failures_total", "kind=\"" + kind + "\"",
             it == stats.transition_failures_total.end() ? 0.0 : static_cast<double>(it->second));
  }
  std::vector<double> drop_s, restore_s;
  for (double ms : stats.drop_latency_ms) drop_s.push_back(ms * 1e-3);
  for (double ms : stats.restore_latency_ms) restore_s.push_back(ms * 1e-3);
  w.family("kunserve_drop_latency_seconds", "histogram", "Latency of parameter drops in seconds.");
  w.histogram("kunserve_drop_latency_seconds", "", histogram_of(kDropBuckets, drop_s));
  w.family("kunserve_restore_latency_seconds", "histogram",
           "Latency of parameter restores in seconds.");
  w.histogram("kunserve_restore_latency_seconds", "", histogram_of(kDropBuckets, restore_s));

  // HTTP layer.
  w.family("kunserve_http_open_connections", "gauge", "Open HTTP connections.");
  w.sample("kunserve_http_open_connections", "",
           static_cast<double>(m.open_connections.load(std::memory_order_relaxed)));
  w.family("kunserve_http_responses_total", "counter", "HTTP responses by status code.");
  for (std::size_t i = 0; i <= ServerMetrics::kTrackedStatuses.size(); ++i) {
    const std::string code = i < ServerMetrics::kTrackedStatuses.size()
                                 ? std::to_string(ServerMetrics::kTrackedStatuses[i])
                                 : std::string("other");
    w.sample("kunserve_http_responses_total", "code=\"" + code + "\"",
             static_cast<double>(m.http_responses[i].load(std::memory_order_relaxed)));
  }
  w.family("kunserve_http_client_disconnect_cancels_total", "counter",
           "Requests cancelled because their client went away mid-request.");
  w.sample("kunserve_http_client_disconnect_cancels_total", "",
           static_cast<double>(m.client_disconnect_cancels.load(std::memory_order_relaxed)));
  return w.take();
}

}  // namespace kun::server
