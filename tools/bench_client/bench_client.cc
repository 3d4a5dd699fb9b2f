#include "tools/bench_client/bench_client.h"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <limits>
#include <memory>
#include <optional>

#include "tools/bench_client/beast_includes.h"

#include "common/check.h"
#include "workload/random.h"

namespace kun::bench {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using SteadyTime = std::chrono::steady_clock::time_point;
using workload::RequestOutcome;
using workload::RequestRecord;

constexpr std::size_t kReadBufferBytes = 16 * 1024;
constexpr std::size_t kMaxErrorBodyBytes = 2048;
constexpr std::int64_t kProgressPeriodMs = 250;
constexpr int kProgressBarWidth = 30;

class Runner;

// One request on its own connection: connect, POST, read the SSE stream, record.
class RequestSession : public std::enable_shared_from_this<RequestSession> {
 public:
  RequestSession(Runner& runner, std::size_t index);
  void start();
  void cancel();

 private:
  void on_connect(beast::error_code ec, const tcp::endpoint&);
  void on_write(beast::error_code ec, std::size_t);
  void on_header(beast::error_code ec, std::size_t);
  void read_body();
  void on_body(beast::error_code ec, std::size_t);
  void on_timeout(beast::error_code ec);
  void process_event(const std::string& payload, std::int64_t t_us);
  void finish(RequestOutcome outcome, std::string error);
  void finish_after_error(const beast::error_code& ec);

  Runner& runner_;
  std::size_t index_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  http::request<http::string_body> request_;
  std::optional<http::response_parser<http::buffer_body>> parser_;
  net::steady_timer deadline_;
  SseParser sse_;
  char read_buffer_[kReadBufferBytes];
  std::string error_body_;
  int status_ = 0;
  bool done_seen_ = false;
  bool malformed_ = false;
  std::string server_error_;
  std::int64_t usage_tokens_ = -1;
  bool timed_out_ = false;
  bool finished_ = false;
};

// A GET of the /metrics page.
class MetricsSession : public std::enable_shared_from_this<MetricsSession> {
 public:
  explicit MetricsSession(Runner& runner);
  void start();
  void cancel() {
    beast::error_code ec;
    stream_.socket().close(ec);
  }

 private:
  void on_connect(beast::error_code ec, const tcp::endpoint&);
  void on_write(beast::error_code ec, std::size_t);
  void on_read(beast::error_code ec, std::size_t);

  Runner& runner_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  http::request<http::empty_body> request_;
  http::response_parser<http::string_body> parser_;
};

class Runner {
 public:
  Runner(const BenchClientConfig& config, const workload::Trace& trace)
      : config_(config),
        trace_(trace),
        dispatch_timer_(ioc_),
        progress_timer_(ioc_),
        metrics_timer_(ioc_) {}

  Status run(BenchResult* result) {
    const std::size_t n = trace_.size();
    result_.records.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      RequestRecord& r = result_.records[i];
      r.index = static_cast<std::int64_t>(i);
      r.arrival_us = trace_.requests[i].arrival_us;
      r.prompt_tokens = trace_.requests[i].prompt_tokens;
      r.expected_output_tokens = std::max(1, trace_.requests[i].output_tokens);
    }
    beast::error_code ec;
    tcp::resolver resolver(ioc_);
    endpoints_ = resolver.resolve(config_.host, std::to_string(config_.port), ec);
    if (ec) return unavailable("cannot resolve " + config_.host + ":" + std::to_string(config_.port) + ": " + ec.message());
    progress_enabled_ = config_.progress == ProgressMode::kOn ||
                        (config_.progress == ProgressMode::kAuto && isatty(STDOUT_FILENO) == 1);
    start_ = std::chrono::steady_clock::now();
    if (n > 0) {
      schedule_dispatch();
      if (progress_enabled_) schedule_progress();
      if (config_.metrics_interval_ms > 0) poll_metrics();
      ioc_.run();
    }
    result_.wall_us = now_us();
    if (progress_enabled_) {
      print_progress();
      std::fputs("\n", stdout);
      std::fflush(stdout);
    }
    *result = std::move(result_);
    return ok_status();
  }

  std::int64_t now_us() const {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start_).count();
  }
  SteadyTime time_at(std::int64_t t_us) const { return start_ + std::chrono::microseconds(t_us); }
  net::io_context& ioc() { return ioc_; }
  const tcp::resolver::results_type& endpoints() const { return endpoints_; }
  const BenchClientConfig& config() const { return config_; }
  const workload::Trace& trace() const { return trace_; }
  RequestRecord& record(std::size_t i) { return result_.records[i]; }

  void on_request_finished(RequestOutcome outcome) {
    KUN_CHECK_GT(in_flight_, 0u);
    --in_flight_;
    ++finished_;
    if (outcome == RequestOutcome::kOk) ++ok_;
    else if (outcome == RequestOutcome::kRejected) ++rejected_;
    else ++failed_;
    while (!waiting_.empty() && has_slot()) {
      const std::size_t next = waiting_.front();
      waiting_.pop_front();
      launch(next);
    }
    if (finished_ == trace_.size()) stop();
  }

  void on_metrics(std::int64_t t_us, bool ok, const std::string& body) {
    metrics_session_.reset();
    if (!ok) {
      // A poll that stop() cut short when the last request finished did not fail.
      if (!stopped_) ++result_.metrics_errors;
      return;
    }
    const PrometheusParse parsed = parse_prometheus_text(body);
    for (const auto& s : parsed.samples) {
      const auto& prefixes = config_.metric_prefixes;
      const bool keep = prefixes.empty() || std::any_of(prefixes.begin(), prefixes.end(), [&](const std::string& p) {
                          return s.name.compare(0, p.size(), p) == 0;
                        });
      if (keep) result_.gauges.push_back({t_us, s.series, s.value});
    }
  }

 private:
  bool has_slot() const {
    return config_.max_in_flight <= 0 || in_flight_ < static_cast<std::size_t>(config_.max_in_flight);
  }

  void schedule_dispatch() {
    if (next_ >= trace_.size()) return;
    dispatch_timer_.expires_at(time_at(trace_.requests[next_].arrival_us));
    dispatch_timer_.async_wait([this](beast::error_code ec) {
      if (ec) return;
      const std::int64_t now = now_us();
      while (next_ < trace_.size() && trace_.requests[next_].arrival_us <= now) {
        const std::size_t i = next_++;
        if (has_slot()) launch(i);
        else waiting_.push_back(i);
      }
      schedule_dispatch();
    });
  }

  void launch(std::size_t i) {
    ++in_flight_;
    auto session = std::make_shared<RequestSession>(*this, i);
    session->start();
  }

  void schedule_progress() {
    progress_timer_.expires_after(std::chrono::milliseconds(kProgressPeriodMs));
    progress_timer_.async_wait([this](beast::error_code ec) {
      if (ec || stopped_) return;
      print_progress();
      schedule_progress();
    });
  }

  void print_progress() {
    const std::size_t n = trace_.size();
    const double frac = n == 0 ? 1.0 : static_cast<double>(finished_) / static_cast<double>(n);
    const int filled = static_cast<int>(frac * kProgressBarWidth);
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(kProgressBarWidth, '.');
    std::printf("\r[%s] %zu/%zu done  ok %zu  rejected %zu  failed %zu  in flight %zu  %.1f s   ", bar.c_str(),
                finished_, n, ok_, rejected_, failed_, in_flight_, static_cast<double>(now_us()) / 1e6);
    std::fflush(stdout);
  }

  void poll_metrics() {
    if (stopped_) return;
    auto session = std::make_shared<MetricsSession>(*this);
    metrics_session_ = session;
    session->start();
    metrics_timer_.expires_after(std::chrono::milliseconds(config_.metrics_interval_ms));
    metrics_timer_.async_wait([this](beast::error_code ec) {
      if (ec || stopped_) return;
      poll_metrics();
    });
  }

  void stop() {
    stopped_ = true;
    dispatch_timer_.cancel();
    progress_timer_.cancel();
    metrics_timer_.cancel();
    if (auto m = metrics_session_.lock()) m->cancel();
  }

  const BenchClientConfig& config_;
  const workload::Trace& trace_;
  net::io_context ioc_;
  tcp::resolver::results_type endpoints_;
  SteadyTime start_;
  net::steady_timer dispatch_timer_;
  net::steady_timer progress_timer_;
  net::steady_timer metrics_timer_;
  std::weak_ptr<MetricsSession> metrics_session_;
  std::deque<std::size_t> waiting_;
  BenchResult result_;
  std::size_t next_ = 0;
  std::size_t in_flight_ = 0;
  std::size_t finished_ = 0;
  std::size_t ok_ = 0, rejected_ = 0, failed_ = 0;
  bool progress_enabled_ = false;
  bool stopped_ = false;
};

// ---- RequestSession ----

RequestSession::RequestSession(Runner& runner, std::size_t index)
    : runner_(runner), index_(index), stream_(runner.ioc()), deadline_(runner.ioc()) {}

void RequestSession::start() {
  const BenchClientConfig& cfg = runner_.config();
  const nlohmann::json body = make_request_body(cfg, index_, runner_.trace().requests[index_]);
  request_.method(http::verb::post);
  request_.target(cfg.completions_path);
  request_.version(11);
  request_.set(http::field::host, cfg.host + ":" + std::to_string(cfg.port));
  request_.set(http::field::user_agent, "kunserve-bench");
  request_.set(http::field::content_type, "application/json");
  request_.set(http::field::accept, "text/event-stream");
  request_.set(http::field::connection, "close");
  if (!cfg.api_key.empty()) request_.set(http::field::authorization, "Bearer " + cfg.api_key);
  request_.body() = body.dump();
  request_.prepare_payload();
  // From the moment the request is sent (a request waiting for a max_in_flight slot is not yet timed).
  deadline_.expires_after(std::chrono::milliseconds(cfg.request_timeout_ms));
  deadline_.async_wait(beast::bind_front_handler(&RequestSession::on_timeout, shared_from_this()));
  stream_.expires_after(std::chrono::milliseconds(cfg.connect_timeout_ms));
  stream_.async_connect(runner_.endpoints(), beast::bind_front_handler(&RequestSession::on_connect, shared_from_this()));
}

void RequestSession::cancel() {
  beast::error_code ec;
  stream_.socket().close(ec);
}

void RequestSession::on_timeout(beast::error_code ec) {
  if (ec || finished_) return;  // cancelled: the request finished first
  timed_out_ = true;
  cancel();
}

void RequestSession::on_connect(beast::error_code ec, const tcp::endpoint&) {
  if (ec) return finish_after_error(ec);
  stream_.expires_never();
  beast::error_code ignored;
  stream_.socket().set_option(tcp::no_delay(true), ignored);
  http::async_write(stream_, request_, beast::bind_front_handler(&RequestSession::on_write, shared_from_this()));
}

void RequestSession::on_write(beast::error_code ec, std::size_t) {
  if (ec) return finish_after_error(ec);
  parser_.emplace();
  parser_->body_limit(std::numeric_limits<std::uint64_t>::max());
  http::async_read_header(stream_, buffer_, *parser_,
                          beast::bind_front_handler(&RequestSession::on_header, shared_from_this()));
}

void RequestSession::on_header(beast::error_code ec, std::size_t) {
  if (ec) return finish_after_error(ec);
  status_ = static_cast<int>(parser_->get().result_int());
  RequestRecord& rec = runner_.record(index_);
  rec.http_status = status_;
  if (status_ == 429 || status_ == 503) {
    const auto it = parser_->get().find(http::field::retry_after);
    if (it != parser_->get().end()) {
      const std::string_view v(it->value().data(), it->value().size());
      double secs = 0.0;
      const auto [ptr, perr] = std::from_chars(v.data(), v.data() + v.size(), secs);
      if (perr == std::errc() && ptr == v.data() + v.size()) rec.retry_after_s = secs;
    }
  }
  if (parser_->is_done()) {
    if (status_ == 200) return finish(RequestOutcome::kFailed, "empty response body");
    return finish(status_ == 429 || status_ == 503 ? RequestOutcome::kRejected : RequestOutcome::kFailed,
                  "HTTP " + std::to_string(status_));
  }
  read_body();
}

void RequestSession::read_body() {
  auto& body = parser_->get().body();
  body.data = read_buffer_;
  body.size = sizeof(read_buffer_);
  http::async_read_some(stream_, buffer_, *parser_, beast::bind_front_handler(&RequestSession::on_body, shared_from_this()));
}

void RequestSession::on_body(beast::error_code ec, std::size_t) {
  if (ec == http::error::need_buffer) ec = {};
  const std::int64_t t_us = runner_.now_us();
  const std::size_t got = sizeof(read_buffer_) - parser_->get().body().size;
  if (got > 0) {
    const std::string_view bytes(read_buffer_, got);
    if (status_ == 200) {
      for (const std::string& payload : sse_.feed(bytes)) process_event(payload, t_us);
    } else if (error_body_.size() < kMaxErrorBodyBytes) {
      error_body_.append(bytes.substr(0, kMaxErrorBodyBytes - error_body_.size()));
    }
  }
  if (ec) return finish_after_error(ec);
  if (!parser_->is_done()) return read_body();
  if (status_ != 200) {
    return finish(status_ == 429 || status_ == 503 ? RequestOutcome::kRejected : RequestOutcome::kFailed,
                  "HTTP " + std::to_string(status_) + ": " + error_body_);
  }
  const RequestRecord& rec = runner_.record(index_);
  if (!server_error_.empty()) return finish(RequestOutcome::kFailed, "server error in stream: " + server_error_);
  if (malformed_) return finish(RequestOutcome::kFailed, "malformed SSE event");
  if (rec.token_times_us.empty()) return finish(RequestOutcome::kFailed, "stream ended without tokens");
  finish(RequestOutcome::kOk, "");
}

void RequestSession::process_event(const std::string& payload, std::int64_t t_us) {
  if (payload == "[DONE]") {
    done_seen_ = true;
    return;
  }
  RequestRecord& rec = runner_.record(index_);
  try {
    const nlohmann::json j = nlohmann::json::parse(payload, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      malformed_ = true;
      return;
    }
    if (j.contains("error")) {
      server_error_ = j["error"].dump();
      return;
    }
    bool has_token = false;
    if (j.contains("choices") && j["choices"].is_array()) {
      for (const auto& c : j["choices"]) {
        if (c.contains("text") && c["text"].is_string() && !c["text"].get_ref<const std::string&>().empty()) has_token = true;
        if (c.contains("delta") && c["delta"].is_object() && c["delta"].contains("content") &&
            c["delta"]["content"].is_string() && !c["delta"]["content"].get_ref<const std::string&>().empty()) {
          has_token = true;
        }
        if (c.contains("token_ids") && c["token_ids"].is_array() && !c["token_ids"].empty()) has_token = true;
      }
    }
    if (has_token) {
      if (rec.first_token_us < 0) rec.first_token_us = t_us;
      rec.token_times_us.push_back(t_us);
    }
    auto read_queue = [&](const nlohmann::json& o) {
      if (o.is_object() && o.contains("queue_time_ms") && o["queue_time_ms"].is_number()) {
        rec.queue_us = static_cast<std::int64_t>(std::llround(o["queue_time_ms"].get<double>() * 1000.0));
      }
    };
    read_queue(j);
    if (j.contains("usage") && j["usage"].is_object()) {
      const auto& u = j["usage"];
      if (u.contains("completion_tokens") && u["completion_tokens"].is_number_integer()) {
        usage_tokens_ = u["completion_tokens"].get<std::int64_t>();
      }
      read_queue(u);
    }
    if (j.contains("metrics")) read_queue(j["metrics"]);
  } catch (const nlohmann::json::exception&) {
    malformed_ = true;
  }
}

void RequestSession::finish_after_error(const beast::error_code& ec) {
  if (timed_out_) {
    return finish(RequestOutcome::kTimedOut, "timeout after " + std::to_string(runner_.config().request_timeout_ms) + " ms");
  }
  // A server that closes the connection right after [DONE] finished the request.
  if (status_ == 200 && done_seen_ && server_error_.empty() && !runner_.record(index_).token_times_us.empty()) {
    return finish(RequestOutcome::kOk, "");
  }
  if (status_ == 429 || status_ == 503) return finish(RequestOutcome::kRejected, "HTTP " + std::to_string(status_));
  std::string what = status_ == 0 ? "connection failed: " : "disconnected: ";
  finish(RequestOutcome::kFailed, what + ec.message());
}

void RequestSession::finish(RequestOutcome outcome, std::string error) {
  if (finished_) return;
  finished_ = true;
  RequestRecord& rec = runner_.record(index_);
  rec.finish_us = runner_.now_us();
  if (outcome == RequestOutcome::kOk && !rec.token_times_us.empty()) rec.finish_us = std::max(rec.finish_us, rec.token_times_us.back());
  rec.outcome = outcome;
  rec.error = std::move(error);
  rec.output_tokens = usage_tokens_ >= 0 ? static_cast<std::int32_t>(usage_tokens_)
                                         : static_cast<std::int32_t>(rec.token_times_us.size());
  deadline_.cancel();
  beast::error_code ignored;
  stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
  stream_.socket().close(ignored);
  runner_.on_request_finished(outcome);
}

// ---- MetricsSession ----

MetricsSession::MetricsSession(Runner& runner) : runner_(runner), stream_(runner.ioc()) {}

void MetricsSession::start() {
  const BenchClientConfig& cfg = runner_.config();
  request_.method(http::verb::get);
  request_.target(cfg.metrics_path);
  request_.version(11);
  request_.set(http::field::host, cfg.host + ":" + std::to_string(cfg.port));
  request_.set(http::field::connection, "close");
  if (!cfg.api_key.empty()) request_.set(http::field::authorization, "Bearer " + cfg.api_key);
  parser_.body_limit(64 * 1024 * 1024);
  // Whole poll bounded by the polling period (at least 1 s).
  stream_.expires_after(std::chrono::milliseconds(std::max<std::int64_t>(1000, cfg.metrics_interval_ms)));
  stream_.async_connect(runner_.endpoints(), beast::bind_front_handler(&MetricsSession::on_connect, shared_from_this()));
}

void MetricsSession::on_connect(beast::error_code ec, const tcp::endpoint&) {
  if (ec) return runner_.on_metrics(runner_.now_us(), false, "");
  http::async_write(stream_, request_, beast::bind_front_handler(&MetricsSession::on_write, shared_from_this()));
}

void MetricsSession::on_write(beast::error_code ec, std::size_t) {
  if (ec) return runner_.on_metrics(runner_.now_us(), false, "");
  http::async_read(stream_, buffer_, parser_, beast::bind_front_handler(&MetricsSession::on_read, shared_from_this()));
}

void MetricsSession::on_read(beast::error_code ec, std::size_t) {
  const bool ok = !ec && parser_.get().result_int() == 200;
  runner_.on_metrics(runner_.now_us(), ok, ok ? parser_.get().body() : std::string());
  beast::error_code ignored;
  stream_.socket().close(ignored);
}

bool parse_number(std::string_view s, double* out) {
  if (s == "NaN") {
    *out = std::numeric_limits<double>::quiet_NaN();
    return true;
  }
  if (s == "+Inf" || s == "Inf") {
    *out = std::numeric_limits<double>::infinity();
    return true;
  }
  if (s == "-Inf") {
    *out = -std::numeric_limits<double>::infinity();
    return true;
  }
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && ptr == s.data() + s.size();
}

}  // namespace

StatusOr<std::string> http_get(const BenchClientConfig& config, const std::string& path) {
  net::io_context ioc;
  tcp::resolver resolver(ioc);
  beast::error_code ec;
  const auto endpoints = resolver.resolve(config.host, std::to_string(config.port), ec);
  if (ec) return unavailable("cannot resolve " + config.host + ":" + std::to_string(config.port) + ": " + ec.message());
  beast::tcp_stream stream(ioc);
  stream.expires_after(std::chrono::milliseconds(std::max<std::int64_t>(1000, config.connect_timeout_ms)));
  http::request<http::empty_body> req{http::verb::get, path, 11};
  req.set(http::field::host, config.host + ":" + std::to_string(config.port));
  req.set(http::field::connection, "close");
  if (!config.api_key.empty()) req.set(http::field::authorization, "Bearer " + config.api_key);
  http::response_parser<http::string_body> parser;
  parser.body_limit(64 * 1024 * 1024);
  beast::flat_buffer buffer;
  std::string failure;
  stream.async_connect(endpoints, [&](beast::error_code e, const tcp::endpoint&) {
    if (e) {
      failure = "connect: " + e.message();
      return;
    }
    http::async_write(stream, req, [&](beast::error_code we, std::size_t) {
      if (we) {
        failure = "write: " + we.message();
        return;
      }
      http::async_read(stream, buffer, parser, [&](beast::error_code re, std::size_t) {
        if (re) failure = "read: " + re.message();
      });
    });
  });
  ioc.run();
  beast::error_code ignored;
  stream.socket().close(ignored);
  if (!failure.empty()) {
    return unavailable("GET http://" + config.host + ":" + std::to_string(config.port) + path + ": " + failure);
  }
  if (parser.get().result_int() != 200) {
    return unavailable("GET " + path + ": HTTP " + std::to_string(parser.get().result_int()) + ": " +
                       parser.get().body().substr(0, 200));
  }
  return parser.get().body();
}

StatusOr<std::string> fetch_served_model(const BenchClientConfig& config) {
  KUN_ASSIGN_OR_RETURN(std::string body, http_get(config, "/v1/models"));
  const nlohmann::json j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_object() && j.contains("data") && j["data"].is_array() && !j["data"].empty() &&
      j["data"][0].is_object() && j["data"][0].contains("id") && j["data"][0]["id"].is_string()) {
    return j["data"][0]["id"].get<std::string>();
  }
  return invalid_argument("GET /v1/models: no model id in the answer");
}

nlohmann::json make_request_body(const BenchClientConfig& config, std::size_t index, const workload::TraceRequest& r) {
  nlohmann::json body;
  body["model"] = config.model;
  if (config.prompt_builder) {
    body["prompt"] = config.prompt_builder(index, r);
  } else if (config.prompt_kind == PromptKind::kTokenIds) {
    KUN_CHECK_GT(config.vocab_size, config.first_token_id);
    workload::Rng rng(config.seed * 0x9e3779b97f4a7c15ULL + index);
    const auto span = static_cast<std::uint64_t>(config.vocab_size - config.first_token_id);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(std::max(1, r.prompt_tokens)));
    for (auto& id : ids) id = config.first_token_id + static_cast<std::int32_t>(rng.uniform_index(span));
    body["prompt"] = std::move(ids);
  } else {
    std::string text;
    text.reserve(static_cast<std::size_t>(std::max(1, r.prompt_tokens)) * 3);
    for (std::int32_t i = 0; i < std::max(1, r.prompt_tokens); ++i) text += i == 0 ? "hi" : " hi";
    body["prompt"] = std::move(text);
  }
  body["max_tokens"] = std::max(1, r.output_tokens);
  body["stream"] = true;
  body["ignore_eos"] = config.ignore_eos;
  body["stream_options"] = {{"include_usage", true}};
  body["temperature"] = 0;
  return body;
}

std::vector<std::string> SseParser::feed(std::string_view bytes) {
  std::vector<std::string> events;
  for (char c : bytes) {
    if (c != '\n') {
      line_ += c;
      continue;
    }
    if (!line_.empty() && line_.back() == '\r') line_.pop_back();
    if (line_.empty()) {
      if (has_data_) events.push_back(std::move(data_));
      data_.clear();
      has_data_ = false;
    } else if (line_.compare(0, 5, "data:") == 0) {
      std::string_view v(line_);
      v.remove_prefix(5);
      if (!v.empty() && v.front() == ' ') v.remove_prefix(1);
      if (has_data_) data_ += '\n';
      data_.append(v);
      has_data_ = true;
    }
    line_.clear();
  }
  return events;
}

PrometheusParse parse_prometheus_text(std::string_view text) {
  PrometheusParse out;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t eol = text.find('\n', pos);
    if (eol == std::string_view::npos) eol = text.size();
    std::string_view line = text.substr(pos, eol - pos);
    pos = eol + 1;
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.remove_suffix(1);
    while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
    if (line.empty() || line.front() == '#') continue;
    std::size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ' && line[i] != '\t') ++i;
    PrometheusSample s;
    s.name = std::string(line.substr(0, i));
    if (i < line.size() && line[i] == '{') {
      bool in_quotes = false;
      std::size_t j = i + 1;
      for (; j < line.size(); ++j) {
        if (in_quotes && line[j] == '\\') {
          ++j;
          continue;
        }
        if (line[j] == '"') in_quotes = !in_quotes;
        if (!in_quotes && line[j] == '}') break;
      }
      if (j >= line.size()) {
        ++out.malformed_lines;
        continue;
      }
      i = j + 1;
    }
    s.series = std::string(line.substr(0, i));
    std::string_view rest = line.substr(i);
    while (!rest.empty() && (rest.front() == ' ' || rest.front() == '\t')) rest.remove_prefix(1);
    const std::size_t sp = rest.find_first_of(" \t");
    const std::string_view value = rest.substr(0, sp);  // an optional timestamp follows
    if (s.name.empty() || !parse_number(value, &s.value)) {
      ++out.malformed_lines;
      continue;
    }
    out.samples.push_back(std::move(s));
  }
  return out;
}

StatusOr<BenchResult> run_bench(const BenchClientConfig& config, const workload::Trace& trace) {
  if (config.port == 0) return invalid_argument("bench client: port must be set");
  if (config.request_timeout_ms <= 0) return invalid_argument("bench client: request_timeout_ms must be > 0");
  if (config.metrics_interval_ms < 0) return invalid_argument("bench client: metrics_interval_ms must be >= 0");
  if (config.prompt_kind == PromptKind::kTokenIds && !config.prompt_builder &&
      config.vocab_size <= config.first_token_id) {
    return invalid_argument("bench client: vocab_size must exceed first_token_id");
  }
  workload::check_trace(trace);
  BenchResult result;
  try {
    Runner runner(config, trace);
    KUN_RETURN_IF_ERROR(runner.run(&result));
  } catch (const std::exception& e) {
    return internal_error(std::string("bench client: ") + e.what());
  }
  return result;
}

StatusOr<std::vector<workload::RequestRecord>> run_load(const BenchClientConfig& config, const workload::Trace& trace) {
  KUN_ASSIGN_OR_RETURN(BenchResult result, run_bench(config, trace));
  return std::move(result.records);
}

}  // namespace kun::bench
