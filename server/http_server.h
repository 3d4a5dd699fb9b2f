// The OpenAI-compatible HTTP/1.1 server (Boost.Beast on Asio) in front of an engine FrontDoor.
//
// Threads: `io_threads` I/O threads run every connection on its own strand; they parse HTTP,
// tokenize, call FrontDoor::submit / cancel / stats, detokenize and write responses. The
// engine's serving thread only runs the token callback, which updates lock-free histograms and
// posts the event to the connection's strand (never blocks on I/O, never touches a socket).
// Nothing here touches engine state directly.
#pragma once

#include <cstddef>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "engine/api.h"
#include "model/tokenizer.h"
#include "server/metrics.h"
#include "server/openai_protocol.h"

namespace kun::server {

struct ServerConfig {
  std::string host = "127.0.0.1";
  std::uint16_t port = 8000;  // 0: pick a free port (see HttpServer::port())
  std::string model_name;     // served model id; empty: FrontDoor::model_info().name
  int io_threads = 2;
  std::size_t max_body_bytes = 8u << 20;    // larger bodies get 413
  std::size_t max_header_bytes = 16u << 10;  // larger headers get 431
  int header_timeout_ms = 30000;  // to receive a request's header (and keep-alive idle time)
  int body_timeout_ms = 60000;    // to receive a request's body once its header arrived
  int write_timeout_ms = 60000;   // for one write to a client that stops reading
  int drain_timeout_ms = 5000;    // stop(): how long in-flight requests may finish
  int drain_header_timeout_ms = 1000;  // during the drain: a new connection's header, then 503
  int retry_after_s = 1;          // Retry-After for 429 / 503
  int max_connections = 8192;     // beyond this new connections get 503 and are closed
  int listen_backlog = 2048;
  ProtocolLimits limits;

  // Access control. api_key non-empty: every /v1/* route (and /metrics with
  // metrics_require_api_key) needs `Authorization: Bearer <api_key>` (constant-time compare),
  // else 401 invalid_api_key. /health stays open.
  std::string api_key;
  bool metrics_require_api_key = false;
  // CORS: off when empty (no Access-Control-* headers, OPTIONS is 405). Otherwise the listed
  // origins ("*": any) get Access-Control-Allow-Origin and preflight OPTIONS answers 204.
  std::vector<std::string> allowed_origins;
  // Host header allow list (DNS rebinding protection): host names or addresses, compared
  // case-insensitively without the port; "*" allows any. Empty: when `host` is a loopback
  // address, localhost / 127.0.0.1 / ::1 only; otherwise any. HTTP/1.1 requests without Host
  // are 400 regardless; HTTP/1.0 ones without Host are served (no browser sends those).
  std::vector<std::string> allowed_hosts;
  // Extra GET routes answered with the JSON the function returns (e.g. /v1/kunserve/events);
  // paths under /v1/ are protected by api_key like the others. Called on an I/O thread.
  std::map<std::string, std::function<std::string()>> json_routes;
};

// The Host allow list the server enforces for `config` (see ServerConfig::allowed_hosts);
// {"*"} means any.
std::vector<std::string> effective_allowed_hosts(const ServerConfig& config);

class HttpServer {
 public:
  // Binds, listens and starts the I/O threads. `front_door` and `tokenizer` must outlive the
  // server. Errors: kInvalidArgument (bad config), kUnavailable (cannot bind / listen).
  static StatusOr<std::unique_ptr<HttpServer>> start(ServerConfig config,
                                                     engine::FrontDoor& front_door,
                                                     const model::Tokenizer& tokenizer);
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  std::uint16_t port() const;
  const std::string& model_name() const;
  // Graceful shutdown: closes idle keep-alive connections, answers every new request (on new
  // or existing connections) with 503 + Retry-After, lets in-flight requests finish for up to
  // drain_timeout_ms; at the deadline a stream still running gets an SSE error event and
  // [DONE], a non-streaming request a 503, and their engine requests are cancelled. Then it
  // stops accepting, closes every connection and joins the I/O threads. Idempotent. Must not
  // be called from an I/O thread.
  void stop();
  // As stop(), with this drain instead of drain_timeout_ms (0: streams get their error event at
  // once), e.g. when the devices behind the front door are gone. Before any stop().
  void stop(std::chrono::milliseconds drain);
  const ServerMetrics& metrics() const;
  // Number of open client connections (for tests).
  std::size_t num_connections() const;
  // Requests submitted to the front door whose response is not finished yet.
  std::size_t num_in_flight() const;

  struct Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kun::server
