#include "server/http_server.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <future>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <ctime>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <unordered_map>
#include <vector>

#if !defined(BOOST_BEAST_USE_STD_STRING_VIEW) || !defined(BOOST_ASIO_NO_DEPRECATED)
#error "Asio/Beast users must link kun_asio (one set of Boost configuration macros per binary)"
#endif
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "common/check.h"
#include "common/log.h"
#include "server/stop_matcher.h"
#include "server/utf8.h"

namespace kun::server {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;
using Strand = asio::strand<asio::io_context::executor_type>;

namespace {

class Session;

// Routes token events from the serving thread to the owning connection's strand. Holds only
// executors and weak pointers (never a socket), and is closed before the io_context dies, so
// a callback the engine keeps after shutdown is harmless.
class EventRelay {
 public:
  void add(std::uint64_t key, Strand strand, std::weak_ptr<Session> session) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!open_) return;
    entries_.emplace(key, Entry{std::move(strand), std::move(session)});
  }
  void remove(std::uint64_t key) {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.erase(key);
  }
  void deliver(std::uint64_t key, const engine::TokenEvent& ev);
  void close() {
    std::unordered_map<std::uint64_t, Entry> dead;
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = false;
      dead.swap(entries_);
    }
  }

 private:
  struct Entry {
    Strand strand;
    std::weak_ptr<Session> session;
  };
  std::mutex mu_;
  bool open_ = true;
  std::unordered_map<std::uint64_t, Entry> entries_;
};

// A request's metrics observer plus a flag the connection sets when a stop string ended it
// (so the engine's kCancelled final event counts as "stop").
struct RequestTracker {
  RequestObserver observer;
  std::atomic<bool> stopped_by_string{false};
};

std::string hex64(std::uint64_t v) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i) {
    s[static_cast<std::size_t>(i)] = kDigits[v & 0xF];
    v >>= 4;
  }
  return s;
}

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

ApiError make_error(int status, std::string type, std::string message,
                    std::optional<std::string> code = std::nullopt) {
  ApiError e;
  e.http_status = status;
  e.type = std::move(type);
  e.message = std::move(message);
  e.code = std::move(code);
  return e;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Client text quoted in a message, cut to `max_bytes` (messages stay small whatever was sent).
std::string clip(std::string_view s, std::size_t max_bytes = 200) {
  if (s.size() <= max_bytes) return std::string(s);
  return std::string(s.substr(0, max_bytes)) + "...";
}

// Compares without an early exit, so the time taken does not tell how much of a guessed key
// was right (the length is not secret).
bool constant_time_equal(std::string_view a, std::string_view b) {
  unsigned diff = a.size() == b.size() ? 0u : 1u;
  const std::size_t n = std::max(a.size(), b.size());
  for (std::size_t i = 0; i < n; ++i) {
    const auto x = static_cast<unsigned char>(i < a.size() ? a[i] : 0);
    const auto y = static_cast<unsigned char>(i < b.size() ? b[i] : 0);
    diff |= static_cast<unsigned>(x ^ y);
  }
  return diff == 0;
}

// The host part of a Host header value: "[::1]:8000" -> "::1", "Example.com:80" -> "example.com".
std::string host_name_of(std::string_view value) {
  value = trim(value);
  if (!value.empty() && value.front() == '[') {
    const std::size_t close = value.find(']');
    return lower(close == std::string_view::npos ? value.substr(1) : value.substr(1, close - 1));
  }
  const std::size_t colon = value.find(':');
  if (colon != std::string_view::npos && value.find(':', colon + 1) == std::string_view::npos) {
    value = value.substr(0, colon);
  }
  return lower(value);
}

bool is_loopback_address(const std::string& host) {
  error_code ec;
  const auto addr = asio::ip::make_address(host, ec);
  return !ec && addr.is_loopback();
}

// `application/json`, optionally with `charset=utf-8` (any case, optionally quoted).
bool is_json_content_type(std::string_view value) {
  const std::size_t semi = value.find(';');
  if (lower(trim(value.substr(0, semi))) != "application/json") return false;
  std::string_view params = semi == std::string_view::npos ? std::string_view() : value.substr(semi + 1);
  while (!trim(params).empty()) {
    const std::size_t next = params.find(';');
    const std::string_view param = trim(params.substr(0, next));
    params = next == std::string_view::npos ? std::string_view() : params.substr(next + 1);
    if (param.empty()) continue;
    const std::size_t eq = param.find('=');
    if (eq == std::string_view::npos) return false;
    const std::string name = lower(trim(param.substr(0, eq)));
    std::string_view v = trim(param.substr(eq + 1));
    if (v.size() >= 2 && v.front() == '"' && v.back() == '"') v = v.substr(1, v.size() - 2);
    if (name == "charset" && lower(v) != "utf-8" && lower(v) != "utf8") return false;
  }
  return true;
}

}  // namespace

struct HttpServer::Impl {
  Impl(ServerConfig cfg, engine::FrontDoor& fd, const model::Tokenizer& tok)
      : config(std::move(cfg)),
        front_door(fd),
        tokenizer(tok),
        info(fd.model_info()),
        ioc(config.io_threads),
        acceptor(asio::make_strand(ioc)),
        retry_timer(acceptor.get_executor()) {
    model_name = config.model_name.empty() ? info.name : config.model_name;
    allowed_hosts = effective_allowed_hosts(config);
    any_host = std::find(allowed_hosts.begin(), allowed_hosts.end(), "*") != allowed_hosts.end();
    any_origin = std::find(config.allowed_origins.begin(), config.allowed_origins.end(), "*") !=
                 config.allowed_origins.end();
    std::random_device rd;
    id_seed = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  }

  bool host_allowed(std::string_view value) const {
    if (any_host) return true;
    const std::string name = host_name_of(value);
    return std::find(allowed_hosts.begin(), allowed_hosts.end(), name) != allowed_hosts.end();
  }
  bool origin_allowed(std::string_view origin) const {
    if (config.allowed_origins.empty() || origin.empty()) return false;
    if (any_origin) return true;
    return std::find(config.allowed_origins.begin(), config.allowed_origins.end(), origin) !=
           config.allowed_origins.end();
  }
  bool requires_api_key(std::string_view path) const {
    if (config.api_key.empty()) return false;
    if (path == "/v1" || path.rfind("/v1/", 0) == 0) return true;
    return path == "/metrics" && config.metrics_require_api_key;
  }

  std::string new_id(const char* prefix) {
    return std::string(prefix) + hex64(splitmix64(id_seed + id_counter.fetch_add(1)));
  }

  void do_accept();
  void register_session(std::uint64_t id, const std::shared_ptr<Session>& s);
  void unregister_session(std::uint64_t id);
  void for_each_session(const std::function<void(const std::shared_ptr<Session>&)>& fn);
  bool wait_sessions_empty(std::chrono::milliseconds timeout);
  void stop();

  ServerConfig config;
  engine::FrontDoor& front_door;
  const model::Tokenizer& tokenizer;
  engine::ModelInfo info;
  std::string model_name;
  std::uint16_t bound_port = 0;
  std::shared_ptr<ServerMetrics> metrics = std::make_shared<ServerMetrics>();
  std::shared_ptr<EventRelay> relay = std::make_shared<EventRelay>();
  std::atomic<bool> stopping{false};
  std::atomic<std::int64_t> in_flight{0};  // submitted requests whose response is not finished
  std::vector<std::string> allowed_hosts;  // effective list; {"*"}: any
  bool any_host = true;
  bool any_origin = false;
  std::once_flag stop_once;
  std::uint64_t id_seed = 0;
  std::atomic<std::uint64_t> id_counter{0};
  std::atomic<std::uint64_t> next_key{1};

  mutable std::mutex sessions_mu;
  std::condition_variable sessions_cv;
  std::unordered_map<std::uint64_t, std::weak_ptr<Session>> sessions;

  // Declared last among the asio objects' owners so it is destroyed first (with every handler
  // and session it still holds) while the members above are alive.
  asio::io_context ioc;
  tcp::acceptor acceptor;
  asio::steady_timer retry_timer;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::vector<std::thread> threads;
};

namespace {

// One client connection. Everything below runs on the connection's strand.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(HttpServer::Impl& server, tcp::socket socket, std::uint64_t id)
      : server_(server),
        socket_(std::move(socket)),
        strand_(socket_.get_executor().target<Strand>() != nullptr
                    ? *socket_.get_executor().target<Strand>()
                    : asio::make_strand(server.ioc)),
        read_timer_(strand_),
        write_timer_(strand_),
        id_(id) {
    server_.metrics->open_connections.fetch_add(1, std::memory_order_relaxed);
  }

  ~Session() {
    // Destroyed on an I/O thread or while the io_context is torn down; the front door outlives
    // the server, so a still-running request can be cancelled here.
    if (request_ && request_->engine_active) server_.front_door.cancel(request_->request_id);
    if (request_) server_.relay->remove(request_->key);
    release_in_flight();
    server_.metrics->open_connections.fetch_sub(1, std::memory_order_relaxed);
    server_.unregister_session(id_);
  }

  std::uint64_t id() const { return id_; }
  const Strand& strand() const { return strand_; }

  void start(bool reject) {
    error_code ec;
    socket_.set_option(tcp::no_delay(true), ec);
    if (server_.stopping.load()) {
      // Accepted during the drain: read the request (briefly) and answer 503 + Retry-After.
      draining_ = true;
      keep_alive_ = false;
    }
    if (reject) {
      keep_alive_ = false;
      send_error(make_error(503, "service_unavailable_error", "too many connections",
                            std::string("service_unavailable")));
      return;
    }
    read_header();
  }

  // stop() phase 1: close idle connections, let busy ones finish their current response.
  void begin_drain() {
    draining_ = true;
    keep_alive_ = false;
    if (phase_ == Phase::kReadHeader && buffer_.size() == 0 && served_any_) close();
    if (phase_ == Phase::kIdleMonitor) close();
  }
  // stop() at the drain deadline: a request still running is cancelled at the front door and
  // answered (a stream gets an error event and [DONE], a non-streaming request a 503).
  void drain_deadline() {
    if (closed_ || !request_ || request_->done) return;
    if (request_->engine_active) {
      request_->engine_active = false;
      server_.front_door.cancel(request_->request_id);
    }
    ApiError e = make_error(503, "service_unavailable_error",
                            "the server shut down before the request finished (drain timeout)",
                            std::string("service_unavailable"));
    e.retry_after_s = server_.config.retry_after_s;
    finish_error(e);
  }
  // stop() phase 2: cancel whatever is left and close.
  void abort() { close(); }

  void on_engine_event(std::uint64_t key, const engine::TokenEvent& ev);

 private:
  enum class Phase { kReadHeader, kReadBody, kHandling, kIdleMonitor, kClosed };

  struct ActiveRequest {
    std::uint64_t key = 0;
    RequestId request_id;
    bool engine_active = false;  // submitted and its final event not yet seen
    bool done = false;           // response finished (from the client's point of view)
    PreparedRequest prepared;
    std::optional<ResponseFormatter> formatter;
    std::optional<model::IncrementalDetokenizer> detok;
    std::optional<StopMatcher> stop;
    std::shared_ptr<RequestTracker> tracker;
    std::string text;  // non-streaming: accumulated output
    std::int64_t prompt_tokens = 0;
    std::int64_t completion_tokens = 0;
  };

  // ---- timers ----
  void arm(asio::steady_timer& timer, std::uint64_t& gen, int ms) {
    const std::uint64_t my_gen = ++gen;
    timer.expires_after(std::chrono::milliseconds(ms));
    timer.async_wait([self = shared_from_this(), &gen, my_gen](const error_code& ec) {
      if (ec || gen != my_gen) return;  // cancelled or re-armed
      self->close();
    });
  }
  void disarm(asio::steady_timer& timer, std::uint64_t& gen) {
    ++gen;
    timer.cancel();
  }

  // ---- reading ----
  void read_header() {
    if (closed_) return;
    if (draining_ && served_any_ && buffer_.size() == 0) {
      close();
      return;
    }
    phase_ = Phase::kReadHeader;
    parser_.emplace();
    parser_->header_limit(static_cast<std::uint32_t>(server_.config.max_header_bytes));
    parser_->body_limit(server_.config.max_body_bytes);
    arm(read_timer_, read_gen_,
        draining_ ? std::min(server_.config.header_timeout_ms, server_.config.drain_header_timeout_ms)
                  : server_.config.header_timeout_ms);
    http::async_read_header(socket_, buffer_, *parser_,
                            [self = shared_from_this()](const error_code& ec, std::size_t) {
                              self->on_header(ec);
                            });
  }

  void on_header(const error_code& ec) {
    if (closed_) return;
    if (ec) {
      on_read_error(ec);
      return;
    }
    phase_ = Phase::kReadBody;
    const auto& req = parser_->get();
    if (auto e = check_header(req)) {
      // The body is never parsed: the connection is closed after the error (RFC 9112 6.1 for
      // a Transfer-Encoding we do not implement, so no request can be smuggled in a body).
      keep_alive_ = false;
      linger_ = true;
      disarm(read_timer_, read_gen_);
      phase_ = Phase::kHandling;
      send_error(*e);
      return;
    }
    if (beast::iequals(req[http::field::expect], "100-continue")) {
      enqueue("HTTP/1.1 100 Continue\r\n\r\n");
    }
    arm(read_timer_, read_gen_, server_.config.body_timeout_ms);
    http::async_read(socket_, buffer_, *parser_,
                     [self = shared_from_this()](const error_code& e, std::size_t) { self->on_body(e); });
  }

  void on_body(const error_code& ec) {
    if (closed_) return;
    if (ec) {
      on_read_error(ec);
      return;
    }
    disarm(read_timer_, read_gen_);
    phase_ = Phase::kHandling;
    handle(parser_->release());
  }

  // Framing and Host checks on the header alone, before any body byte is read.
  std::optional<ApiError> check_header(const http::request<http::string_body>& req) const {
    std::string te;
    std::size_t te_lines = 0;
    for (auto range = req.equal_range(http::field::transfer_encoding); range.first != range.second;
         ++range.first) {
      if (te_lines++ > 0) te += ", ";
      te += std::string(range.first->value());
    }
    if (te_lines > 0) {
      const std::string coding = lower(trim(te));
      if (coding != "chunked") {
        if (coding.find("chunked") != std::string::npos) {
          return make_error(400, "invalid_request_error",
                            "malformed Transfer-Encoding '" + clip(te, 64) +
                                "': only a single 'chunked' is accepted",
                            std::string("bad_transfer_encoding"));
        }
        return make_error(501, "not_implemented_error",
                          "Transfer-Encoding '" + clip(te, 64) +
                              "' is not implemented: only 'chunked' is accepted",
                          std::string("unsupported_transfer_encoding"));
      }
      if (req.count(http::field::content_length) > 0) {
        return make_error(400, "invalid_request_error",
                          "a request must not carry both Transfer-Encoding and Content-Length",
                          std::string("bad_transfer_encoding"));
      }
    }
    const std::size_t hosts = req.count(http::field::host);
    if (hosts > 1) {
      return make_error(400, "invalid_request_error", "more than one Host header", std::string("invalid_host"));
    }
    // HTTP/1.0 may omit Host; browsers (the DNS rebinding vector) always send it.
    if (hosts == 0 && req.version() >= 11) {
      return make_error(400, "invalid_request_error", "the Host header is required", std::string("invalid_host"));
    }
    if (hosts == 1) {
      const auto host = req[http::field::host];
      if (!server_.host_allowed(std::string_view(host.data(), host.size()))) {
        return make_error(400, "invalid_request_error",
                          "Host '" + clip(std::string_view(host.data(), host.size()), 64) +
                              "' is not allowed (see --allowed-hosts)",
                          std::string("invalid_host"));
      }
    }
    return std::nullopt;
  }

  void on_read_error(const error_code& ec) {
    if (ec == http::error::end_of_stream || ec == asio::error::eof ||
        ec == asio::error::operation_aborted || ec == asio::error::connection_reset) {
      close();
      return;
    }
    keep_alive_ = false;
    linger_ = true;  // the client may still be sending: drain before closing (see graceful_close)
    disarm(read_timer_, read_gen_);
    if (ec == http::error::body_limit) {
      send_error(make_error(413, "invalid_request_error",
                            "request body exceeds the limit of " +
                                std::to_string(server_.config.max_body_bytes) + " bytes",
                            std::string("request_too_large")));
    } else if (ec == http::error::header_limit) {
      send_error(make_error(431, "invalid_request_error", "request header fields too large"));
    } else if (ec == http::error::partial_message) {
      close();
    } else if (ec.category() == http::make_error_code(http::error::bad_method).category()) {
      send_error(make_error(400, "invalid_request_error", "malformed HTTP request: " + ec.message(),
                            std::string("bad_request")));
    } else {
      close();
    }
  }

  // While an engine request runs, keep a read pending so a client that goes away is noticed
  // at once (EOF / reset) and its request cancelled. Bytes that arrive (a pipelined next
  // request) stay in buffer_ for the next parse.
  void start_monitor() {
    if (monitor_in_flight_ || closed_) return;
    // A pipelined next request is already buffered: stop reading (a second read cannot be
    // started on the socket later); a vanished client is then noticed by the failing write.
    if (buffer_.size() > 0) return;
    monitor_in_flight_ = true;
    socket_.async_read_some(buffer_.prepare(4096),
                            [self = shared_from_this()](const error_code& ec, std::size_t n) {
                              self->on_monitor(ec, n);
                            });
  }

  void on_monitor(const error_code& ec, std::size_t n) {
    monitor_in_flight_ = false;
    if (closed_) return;
    if (ec == asio::error::eof && n == 0 && request_ && phase_ == Phase::kHandling) {
      // The client shut down its sending side after the request (a half-close): it may still
      // read, so the response goes on. A client that closed completely is noticed by the next
      // write failing (a stream notices within a token or two; a non-streaming request runs
      // to its end). Nothing more is read from this connection.
      keep_alive_ = false;
      return;
    }
    if (ec) {
      if (request_ && request_->engine_active && !request_->done) {
        server_.metrics->client_disconnect_cancels.fetch_add(1, std::memory_order_relaxed);
      }
      close();  // cancels the engine request if still running
      return;
    }
    buffer_.commit(n);
    if (phase_ == Phase::kIdleMonitor) {
      read_header();
      return;
    }
    start_monitor();
  }

  // ---- routing ----
  void handle(http::request<http::string_body> req) {
    keep_alive_ = keep_alive_ && req.keep_alive() && !draining_;
    http11_ = req.version() >= 11;
    served_any_ = true;
    std::string_view target(req.target().data(), req.target().size());
    const std::size_t q = target.find('?');
    const std::string_view path = target.substr(0, q);
    const auto method = req.method();
    const auto origin_field = req[http::field::origin];
    const std::string_view origin(origin_field.data(), origin_field.size());
    cors_headers_.clear();
    if (server_.origin_allowed(origin)) {
      cors_headers_ = "Access-Control-Allow-Origin: " + (server_.any_origin ? std::string("*") : std::string(origin)) +
                      "\r\nVary: Origin\r\n";
    }

    if (server_.stopping.load()) {
      keep_alive_ = false;
      ApiError e = make_error(503, "service_unavailable_error", "the server is shutting down",
                              std::string("service_unavailable"));
      e.retry_after_s = server_.config.retry_after_s;
      send_error(e);
      return;
    }
    if (method == http::verb::options && !server_.config.allowed_origins.empty()) {
      if (cors_headers_.empty()) {
        send_error(make_error(403, "invalid_request_error",
                              "CORS origin '" + clip(origin, 100) + "' is not allowed (see --allowed-origins)",
                              std::string("cors_origin_not_allowed")));
        return;
      }
      send_preflight();
      return;
    }
    if (server_.requires_api_key(path)) {
      const auto auth_field = req[http::field::authorization];
      const std::string_view auth = trim(std::string_view(auth_field.data(), auth_field.size()));
      const bool bearer = auth.size() > 7 && beast::iequals(auth.substr(0, 7), "Bearer ");
      if (!bearer || !constant_time_equal(trim(auth.substr(7)), server_.config.api_key)) {
        ApiError e = make_error(401, "invalid_request_error",
                                bearer ? "Incorrect API key provided."
                                       : "You didn't provide an API key. Send it in the Authorization "
                                         "header as 'Authorization: Bearer YOUR_KEY'.",
                                std::string("invalid_api_key"));
        send_error(e, "WWW-Authenticate: Bearer\r\n");
        return;
      }
    }
    auto only = [&](http::verb allowed) {
      if (method == allowed) return true;
      ApiError e = make_error(405, "invalid_request_error",
                              "method " + std::string(req.method_string()) + " is not allowed for " +
                                  std::string(path) + " (use " +
                                  std::string(http::to_string(allowed)) + ")",
                              std::string("method_not_allowed"));
      send_error(e, "Allow: " + std::string(http::to_string(allowed)) + "\r\n");
      return false;
    };
    if (path == "/v1/completions" || path == "/v1/chat/completions") {
      if (!only(http::verb::post)) return;
      const auto ct = req[http::field::content_type];
      if (!is_json_content_type(std::string_view(ct.data(), ct.size()))) {
        send_error(make_error(415, "invalid_request_error",
                              "the request body must be JSON sent with 'Content-Type: application/json', got '" +
                                  clip(std::string_view(ct.data(), ct.size()), 64) + "'",
                              std::string("unsupported_media_type")));
        return;
      }
      handle_generate(path == "/v1/completions" ? Endpoint::kCompletions : Endpoint::kChatCompletions,
                      req.body());
    } else if (path == "/v1/models") {
      if (!only(http::verb::get)) return;
      nlohmann::json list = {{"object", "list"}, {"data", nlohmann::json::array({model_card()})}};
      send_json(200, list.dump());
    } else if (path.rfind("/v1/models/", 0) == 0) {
      if (!only(http::verb::get)) return;
      const std::string_view name = path.substr(std::string_view("/v1/models/").size());
      if (name != server_.model_name) {
        ApiError e = make_error(404, "invalid_request_error",
                                "The model `" + clip(name) + "` does not exist.",
                                std::string("model_not_found"));
        e.param = "model";
        send_error(e);
        return;
      }
      send_json(200, model_card().dump());
    } else if (path == "/health") {
      if (!only(http::verb::get)) return;
      send_json(200, "{\"status\":\"ok\"}");
    } else if (path == "/metrics") {
      if (!only(http::verb::get)) return;
      const engine::ServingStats stats = server_.front_door.stats();
      send_response(200, "text/plain; version=0.0.4; charset=utf-8",
                    render_metrics(*server_.metrics, stats, server_.model_name), "");
    } else if (auto route = server_.config.json_routes.find(std::string(path));
               route != server_.config.json_routes.end()) {
      if (!only(http::verb::get)) return;
      send_json(200, route->second());
    } else {
      send_error(make_error(404, "invalid_request_error",
                            "Invalid URL (" + clip(std::string_view(req.method_string().data(),
                                                                    req.method_string().size()),
                                                   16) +
                                " " + clip(path) + ")",
                            std::string("not_found")));
    }
  }

  nlohmann::json model_card() const {
    return {{"id", server_.model_name},
            {"object", "model"},
            {"created", created_at()},
            {"owned_by", "kunserve"},
            {"max_model_len", server_.info.max_context_tokens}};
  }

  static std::int64_t created_at() { return static_cast<std::int64_t>(std::time(nullptr)); }

  void handle_generate(Endpoint endpoint, const std::string& body) {
    std::size_t bad_at = 0;
    if (!is_valid_utf8(body, &bad_at)) {
      send_error(bad_request("the request body is not valid UTF-8 (first bad byte at offset " +
                             std::to_string(bad_at) + ")"));
      return;
    }
    ParsedRequest parsed;
    if (auto e = parse_request(endpoint, body, server_.config.limits, parsed)) {
      send_error(*e);
      return;
    }
    auto req = std::make_unique<ActiveRequest>();
    if (auto e = prepare_request(std::move(parsed), server_.tokenizer, server_.info,
                                 server_.model_name, server_.config.limits, req->prepared)) {
      send_error(*e);
      return;
    }
    req->key = server_.next_key.fetch_add(1);
    req->prompt_tokens = static_cast<std::int64_t>(req->prepared.spec.prompt_tokens.size());
    req->tracker = std::make_shared<RequestTracker>();
    req->formatter.emplace(endpoint,
                           server_.new_id(endpoint == Endpoint::kChatCompletions ? "chatcmpl-" : "cmpl-"),
                           created_at(), server_.model_name, req->prepared.include_usage);
    req->detok.emplace(server_.tokenizer, req->prepared.skip_special_tokens);
    if (!req->prepared.stop.empty()) req->stop.emplace(req->prepared.stop);

    server_.relay->add(req->key, strand_, weak_from_this());
    engine::TokenCallback cb = [relay = server_.relay, metrics = server_.metrics,
                                tracker = req->tracker, key = req->key](const engine::TokenEvent& ev) {
      if (ev.finished && ev.reason == engine::FinishReason::kCancelled &&
          tracker->stopped_by_string.load(std::memory_order_relaxed)) {
        engine::TokenEvent copy = ev;
        copy.reason = engine::FinishReason::kStop;
        tracker->observer.on_event(copy, *metrics);
      } else {
        tracker->observer.on_event(ev, *metrics);
      }
      relay->deliver(key, ev);
    };
    engine::RequestSpec spec = req->prepared.spec;
    // Counted before submit so stop() never sees a submitted request as not in flight.
    counted_in_flight_ = true;
    server_.in_flight.fetch_add(1, std::memory_order_relaxed);
    StatusOr<RequestId> id = server_.front_door.submit(std::move(spec), std::move(cb));
    if (!id.ok()) {
      release_in_flight();
      server_.relay->remove(req->key);
      send_error(api_error_from_status(id.status(), server_.config.retry_after_s));
      return;
    }
    req->request_id = *id;
    req->engine_active = true;
    request_ = std::move(req);
    // Keep this session alive while the engine works for it, even when no socket operation is
    // pending (e.g. a pipelined request is buffered, so no monitor read runs). Released when
    // the response completes or the session closes.
    self_hold_ = shared_from_this();
    // A stream's 200 head waits for the request's first engine event: a request the engine
    // rejects before generating anything (e.g. it can never fit the instance's KV) still gets
    // its HTTP 4xx/5xx, never 200 plus an error event.
    stream_head_sent_ = false;
    start_monitor();
  }

  void ensure_stream_head() {
    if (stream_head_sent_ || !request_ || !request_->prepared.stream) return;
    stream_head_sent_ = true;
    chunked_ = http11_;
    if (!http11_) keep_alive_ = false;
    std::string head = "HTTP/1.1 200 OK\r\nServer: kunserve\r\nContent-Type: text/event-stream\r\n"
                       "Cache-Control: no-cache\r\n";
    head += cors_headers_;
    head += chunked_ ? "Transfer-Encoding: chunked\r\n" : "";
    head += keep_alive_ ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n";
    server_.metrics->count_response(200);
    enqueue(std::move(head));
    if (request_->prepared.endpoint == Endpoint::kChatCompletions) {
      enqueue_body(request_->formatter->role_chunk());
    }
  }

  void send_preflight() {
    server_.metrics->count_response(204);
    std::string out = "HTTP/1.1 204 No Content\r\nServer: kunserve\r\n" + cors_headers_ +
                      "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n"
                      "Access-Control-Allow-Headers: Authorization, Content-Type\r\n"
                      "Access-Control-Max-Age: 600\r\n";
    out += keep_alive_ ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n";
    response_complete_ = true;
    enqueue(std::move(out));
  }

  void release_in_flight() {
    if (!counted_in_flight_) return;
    counted_in_flight_ = false;
    server_.in_flight.fetch_sub(1, std::memory_order_relaxed);
  }

  // ---- engine events ----
  void emit_text(const std::string& text) {
    if (text.empty()) return;
    if (request_->prepared.stream) {
      ensure_stream_head();
      enqueue_body(request_->formatter->text_chunk(text));
    } else {
      request_->text += text;
    }
  }

  void finish_ok(std::string tail, const char* finish_reason) {
    ActiveRequest& r = *request_;
    r.done = true;
    server_.relay->remove(r.key);
    if (r.prepared.stream) {
      ensure_stream_head();
      std::string out = r.formatter->finish_chunks(tail, finish_reason);
      if (r.prepared.include_usage) out += r.formatter->usage_chunk(r.prompt_tokens, r.completion_tokens);
      out += ResponseFormatter::done_event();
      enqueue_body(out);
      end_stream();
    } else {
      r.text += tail;
      send_json(200, r.formatter->full_response(r.text, finish_reason, r.prompt_tokens,
                                                r.completion_tokens));
    }
  }

  void finish_error(const ApiError& error) {
    ActiveRequest& r = *request_;
    r.done = true;
    server_.relay->remove(r.key);
    if (r.prepared.stream && stream_head_sent_) {
      enqueue_body(ResponseFormatter::error_event(error) + ResponseFormatter::done_event());
      end_stream();
    } else {
      send_error(error);
    }
  }

 public:
  void handle_event(const engine::TokenEvent& ev) {
    ActiveRequest& r = *request_;
    if (ev.finished) r.engine_active = false;
    if (r.done) return;
    if (ev.num_generated_tokens > 0) r.completion_tokens = ev.num_generated_tokens;
    if (ev.num_prompt_tokens > 0) r.prompt_tokens = ev.num_prompt_tokens;
    if (!ev.finished) ensure_stream_head();
    std::string text = ev.token >= 0 ? r.detok->push(ev.token) : std::string();
    if (r.stop) {
      text = r.stop->push(text);
      if (r.stop->matched()) {
        if (r.engine_active) {
          r.tracker->stopped_by_string.store(true, std::memory_order_relaxed);
          server_.front_door.cancel(r.request_id);
        }
        finish_ok(std::move(text), "stop");
        return;
      }
    }
    if (!ev.finished) {
      emit_text(text);
      return;
    }
    if (ev.reason == engine::FinishReason::kError || ev.reason == engine::FinishReason::kCancelled ||
        ev.reason == engine::FinishReason::kNone) {
      emit_text(text);
      Status st = ev.error;
      if (st.ok()) {
        st = ev.reason == engine::FinishReason::kCancelled
                 ? unavailable("the request was cancelled by the server")
                 : internal_error("the engine failed the request");
      }
      finish_error(api_error_from_status(st, server_.config.retry_after_s));
      return;
    }
    std::string tail = r.detok->flush();
    if (r.stop) {
      tail = r.stop->push(tail);
      if (!r.stop->matched()) tail += r.stop->flush();
    }
    finish_ok(text + tail, openai_finish_reason(ev.reason));
  }

 private:
  // ---- writing ----
  void enqueue(std::string data) {
    if (closed_) return;
    out_pending_ += data;
    if (!writing_) flush();
  }

  void enqueue_body(const std::string& data) {
    if (data.empty()) return;
    if (chunked_) {
      char size[32];
      const int len = std::snprintf(size, sizeof(size), "%zx\r\n", data.size());
      std::string framed;
      framed.reserve(data.size() + static_cast<std::size_t>(len) + 2);
      framed.append(size, static_cast<std::size_t>(len));
      framed += data;
      framed += "\r\n";
      enqueue(std::move(framed));
    } else {
      enqueue(data);
    }
  }

  void end_stream() {
    if (chunked_) enqueue("0\r\n\r\n");
    chunked_ = false;
    response_complete_ = true;
    if (!writing_) after_response();
  }

  void flush() {
    if (out_pending_.empty() || closed_) return;
    writing_ = true;
    out_writing_.swap(out_pending_);
    out_pending_.clear();
    arm(write_timer_, write_gen_, server_.config.write_timeout_ms);
    asio::async_write(socket_, asio::buffer(out_writing_),
                      [self = shared_from_this()](const error_code& ec, std::size_t) {
                        self->on_write(ec);
                      });
  }

  void on_write(const error_code& ec) {
    writing_ = false;
    out_writing_.clear();
    if (closed_) return;
    if (ec) {
      if (request_ && request_->engine_active && !request_->done) {
        server_.metrics->client_disconnect_cancels.fetch_add(1, std::memory_order_relaxed);
      }
      close();
      return;
    }
    disarm(write_timer_, write_gen_);
    if (!out_pending_.empty()) {
      flush();
      return;
    }
    if (response_complete_) after_response();
  }

  // The response has been written completely: next request, or close.
  void after_response() {
    response_complete_ = false;
    release_in_flight();
    const std::shared_ptr<Session> hold = std::move(self_hold_);  // released at return
    if (request_ && !request_->engine_active) {
      request_.reset();
    } else if (request_) {
      // Finished by a stop string: the engine's final event is still on its way; keep the
      // request so a close can still cancel it, but do not route its events anywhere.
      request_.reset();
    }
    if (!keep_alive_ || draining_) {
      graceful_close();
      return;
    }
    if (monitor_in_flight_) {
      phase_ = Phase::kIdleMonitor;
      arm(read_timer_, read_gen_, server_.config.header_timeout_ms);
      return;
    }
    read_header();
  }

  void send_response(int status, std::string_view content_type, const std::string& body,
                     const std::string& extra_headers) {
    server_.metrics->count_response(status);
    std::string out = "HTTP/1.1 " + std::to_string(status) + " " +
                      std::string(http::obsolete_reason(static_cast<http::status>(status))) +
                      "\r\nServer: kunserve\r\nContent-Type: " + std::string(content_type) +
                      "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n" + cors_headers_ + extra_headers +
                      (keep_alive_ ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n");
    out += body;
    response_complete_ = true;
    enqueue(std::move(out));
  }

  void send_json(int status, const std::string& body) {
    send_response(status, "application/json", body, "");
  }

  void send_error(const ApiError& e, const std::string& extra_headers = "") {
    std::string headers = extra_headers;
    if (e.retry_after_s >= 0) headers += "Retry-After: " + std::to_string(e.retry_after_s) + "\r\n";
    send_response(e.http_status, "application/json", error_body(e), headers);
  }

  void graceful_close() {
    error_code ec;
    socket_.shutdown(tcp::socket::shutdown_send, ec);
    if (!linger_) {
      close();
      return;
    }
    // Lingering close: closing with unread input makes the kernel send RST, which can destroy
    // the error response before the client reads it. Discard input for a bounded time first.
    linger_ = false;
    arm(read_timer_, read_gen_, kLingerMs);
    discard();
  }

  void discard() {
    socket_.async_read_some(asio::buffer(discard_buf_),
                            [self = shared_from_this()](const error_code& ec, std::size_t n) {
                              if (self->closed_) return;
                              self->discarded_bytes_ += n;
                              if (ec || self->discarded_bytes_ > kLingerMaxBytes) {
                                self->close();
                                return;
                              }
                              self->discard();
                            });
  }

 public:
  void close() {
    if (closed_) return;
    closed_ = true;
    phase_ = Phase::kClosed;
    if (request_) {
      server_.relay->remove(request_->key);
      if (request_->engine_active) {
        request_->engine_active = false;
        server_.front_door.cancel(request_->request_id);
      }
    }
    release_in_flight();
    disarm(read_timer_, read_gen_);
    disarm(write_timer_, write_gen_);
    error_code ec;
    socket_.close(ec);
    self_hold_.reset();  // may drop the last reference: nothing may follow
  }

 private:
  HttpServer::Impl& server_;
  tcp::socket socket_;
  Strand strand_;
  asio::steady_timer read_timer_;
  asio::steady_timer write_timer_;
  std::uint64_t read_gen_ = 0;
  std::uint64_t write_gen_ = 0;
  std::uint64_t id_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  Phase phase_ = Phase::kReadHeader;
  bool closed_ = false;
  bool draining_ = false;
  bool keep_alive_ = true;
  bool http11_ = true;
  bool chunked_ = false;
  bool monitor_in_flight_ = false;
  bool writing_ = false;
  bool response_complete_ = false;
  bool served_any_ = false;         // a request was read on this connection
  bool stream_head_sent_ = false;   // the current stream's 200 head is out
  bool counted_in_flight_ = false;  // counted in server_.in_flight
  std::string cors_headers_;        // Access-Control-* for the current response ("" = none)
  std::string out_pending_;
  std::string out_writing_;
  std::unique_ptr<ActiveRequest> request_;
  std::shared_ptr<Session> self_hold_;
  bool linger_ = false;
  std::size_t discarded_bytes_ = 0;
  std::array<char, 16384> discard_buf_{};
  static constexpr int kLingerMs = 2000;
  static constexpr std::size_t kLingerMaxBytes = 64u << 20;
};

void Session::on_engine_event(std::uint64_t key, const engine::TokenEvent& ev) {
  if (closed_ || !request_ || request_->key != key) return;
  handle_event(ev);
}

void EventRelay::deliver(std::uint64_t key, const engine::TokenEvent& ev) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return;
  asio::post(it->second.strand, [session = it->second.session, key, ev] {
    if (auto s = session.lock()) s->on_engine_event(key, ev);
  });
  if (ev.finished) entries_.erase(it);
}

}  // namespace

// ---- HttpServer::Impl ----

void HttpServer::Impl::register_session(std::uint64_t id, const std::shared_ptr<Session>& s) {
  std::lock_guard<std::mutex> lock(sessions_mu);
  sessions.emplace(id, s);
}

void HttpServer::Impl::unregister_session(std::uint64_t id) {
  std::lock_guard<std::mutex> lock(sessions_mu);
  sessions.erase(id);
  if (sessions.empty()) sessions_cv.notify_all();
}

void HttpServer::Impl::for_each_session(const std::function<void(const std::shared_ptr<Session>&)>& fn) {
  std::vector<std::shared_ptr<Session>> live;
  {
    std::lock_guard<std::mutex> lock(sessions_mu);
    for (auto& [id, w] : sessions) {
      if (auto s = w.lock()) live.push_back(std::move(s));
    }
  }
  for (auto& s : live) fn(s);
}

bool HttpServer::Impl::wait_sessions_empty(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(sessions_mu);
  return sessions_cv.wait_for(lock, timeout, [this] { return sessions.empty(); });
}

void HttpServer::Impl::do_accept() {
  acceptor.async_accept(asio::make_strand(ioc), [this](const error_code& ec, tcp::socket socket) {
    // Keeps accepting during the drain: new connections get 503 + Retry-After, not a refusal.
    if (!acceptor.is_open()) return;
    if (ec) {
      if (ec == asio::error::operation_aborted) return;
      // Out of descriptors or a transient error: back off briefly, keep accepting.
      KUN_LOG(kWarn) << "accept failed: " << ec.message();
      retry_timer.expires_after(std::chrono::milliseconds(50));
      retry_timer.async_wait([this](const error_code& e) {
        if (!e) do_accept();
      });
      return;
    }
    const std::uint64_t id = next_key.fetch_add(1);
    bool reject = false;
    {
      std::lock_guard<std::mutex> lock(sessions_mu);
      reject = static_cast<int>(sessions.size()) >= config.max_connections;
    }
    auto session = std::make_shared<Session>(*this, std::move(socket), id);
    register_session(id, session);
    asio::dispatch(session->strand(), [session, reject] { session->start(reject); });
    do_accept();
  });
}

void HttpServer::Impl::stop() {
  std::call_once(stop_once, [this] {
    using Clock = std::chrono::steady_clock;
    stopping.store(true);
    for_each_session([](const std::shared_ptr<Session>& s) {
      asio::post(s->strand(), [s] { s->begin_drain(); });
    });
    auto wait_in_flight = [this](Clock::time_point deadline) {
      while (in_flight.load() > 0 && Clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      return in_flight.load() == 0;
    };
    if (!wait_in_flight(Clock::now() + std::chrono::milliseconds(config.drain_timeout_ms))) {
      KUN_LOG(kWarn) << "HttpServer::stop: " << in_flight.load() << " requests still running after the "
                     << config.drain_timeout_ms << " ms drain; answering them with an error";
      for_each_session([](const std::shared_ptr<Session>& s) {
        asio::post(s->strand(), [s] { s->drain_deadline(); });
      });
      wait_in_flight(Clock::now() + std::chrono::milliseconds(2000));
    }
    // Closes left after a response (lingering), then everything else.
    wait_sessions_empty(std::chrono::milliseconds(200));
    {
      std::promise<void> closed;
      asio::post(acceptor.get_executor(), [this, &closed] {
        error_code ec;
        acceptor.close(ec);
        retry_timer.cancel();
        closed.set_value();
      });
      closed.get_future().wait_for(std::chrono::seconds(2));
    }
    for_each_session([](const std::shared_ptr<Session>& s) {
      asio::post(s->strand(), [s] { s->abort(); });
    });
    if (!wait_sessions_empty(std::chrono::milliseconds(2000))) {
      KUN_LOG(kWarn) << "HttpServer::stop: connections still open after abort; tearing down";
    }
    relay->close();
    work.reset();
    ioc.stop();
    for (auto& t : threads) t.join();
    threads.clear();
    // No handler runs any more: close what is left here (cancels engine requests, breaks the
    // sessions' self references) before the io_context and its handlers are destroyed.
    for_each_session([](const std::shared_ptr<Session>& s) { s->close(); });
  });
}

// ---- HttpServer ----

std::vector<std::string> effective_allowed_hosts(const ServerConfig& config) {
  if (!config.allowed_hosts.empty()) {
    std::vector<std::string> out;
    for (const std::string& h : config.allowed_hosts) out.push_back(h == "*" ? h : host_name_of(h));
    return out;
  }
  if (is_loopback_address(config.host) || lower(config.host) == "localhost") {
    return {"localhost", "127.0.0.1", "::1"};
  }
  return {"*"};
}

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() {
  if (impl_) stop();
}

StatusOr<std::unique_ptr<HttpServer>> HttpServer::start(ServerConfig config,
                                                         engine::FrontDoor& front_door,
                                                         const model::Tokenizer& tokenizer) {
  if (config.io_threads < 1 || config.io_threads > 256) {
    return invalid_argument("io_threads must be in [1, 256]");
  }
  if (config.max_body_bytes == 0 || config.max_header_bytes < 256) {
    return invalid_argument("max_body_bytes must be > 0 and max_header_bytes >= 256");
  }
  if (config.header_timeout_ms <= 0 || config.body_timeout_ms <= 0 || config.write_timeout_ms <= 0 ||
      config.drain_timeout_ms < 0 || config.max_connections < 1) {
    return invalid_argument("timeouts and max_connections must be positive");
  }
  auto impl = std::make_unique<Impl>(std::move(config), front_door, tokenizer);
  try {
    const auto address = asio::ip::make_address(impl->config.host);
    const tcp::endpoint endpoint(address, impl->config.port);
    impl->acceptor.open(endpoint.protocol());
    impl->acceptor.set_option(asio::socket_base::reuse_address(true));
    impl->acceptor.bind(endpoint);
    impl->acceptor.listen(impl->config.listen_backlog);
    impl->bound_port = impl->acceptor.local_endpoint().port();
  } catch (const boost::system::system_error& e) {
    return unavailable("cannot listen on " + impl->config.host + ":" +
                       std::to_string(impl->config.port) + ": " + e.what());
  }
  impl->work.emplace(impl->ioc.get_executor());
  Impl* raw = impl.get();
  asio::post(impl->acceptor.get_executor(), [raw] { raw->do_accept(); });
  for (int i = 0; i < raw->config.io_threads; ++i) {
    raw->threads.emplace_back([raw] {
      for (;;) {
        try {
          raw->ioc.run();
          return;
        } catch (const std::exception& e) {
          // Handlers catch their own errors; anything escaping is logged and the loop resumes.
          KUN_LOG(kError) << "I/O thread: unexpected exception: " << e.what();
        }
      }
    });
  }
  KUN_LOG(kInfo) << "serving " << raw->model_name << " on http://" << raw->config.host << ":"
                 << raw->bound_port << " with " << raw->config.io_threads << " I/O threads";
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

std::uint16_t HttpServer::port() const { return impl_->bound_port; }
const std::string& HttpServer::model_name() const { return impl_->model_name; }
void HttpServer::stop() { impl_->stop(); }
void HttpServer::stop(std::chrono::milliseconds drain) {
  impl_->config.drain_timeout_ms = static_cast<int>(std::max<std::int64_t>(0, drain.count()));
  impl_->stop();
}
const ServerMetrics& HttpServer::metrics() const { return *impl_->metrics; }
std::size_t HttpServer::num_in_flight() const {
  return static_cast<std::size_t>(std::max<std::int64_t>(0, impl_->in_flight.load()));
}
std::size_t HttpServer::num_connections() const {
  std::lock_guard<std::mutex> lock(impl_->sessions_mu);
  return impl_->sessions.size();
}

}  // namespace kun::server
