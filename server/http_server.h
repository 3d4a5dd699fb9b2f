// The OpenAI-compatible HTTP/1.1 server (Boost.Beast on Asio) in front of an engine FrontDoor.
//
// Threads: `io_threads` I/O threads run every connection on its own strand; they parse HTTP,
// tokenize, call FrontDoor::submit / cancel / stats, detokenize and write responses. The
// engine's serving thread only runs the token callback, which updates lock-free histograms and
// posts the event to the connection's strand (never blocks on I/O, never touches a socket).
// Nothing here touches engine state directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

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
  int retry_after_s = 1;          // Retry-After for 429 / 503
  int max_connections = 8192;     // beyond this new connections get 503 and are closed
  int listen_backlog = 2048;
  ProtocolLimits limits;
};

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
  // Graceful shutdown: stops accepting, answers new requests with 503, closes idle keep-alive
  // connections, lets in-flight requests finish for up to drain_timeout_ms, then cancels the
  // rest at the front door, closes every connection and joins the I/O threads. Idempotent.
  // Must not be called from an I/O thread.
  void stop();
  const ServerMetrics& metrics() const;
  // Number of open client connections (for tests).
  std::size_t num_connections() const;

  struct Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kun::server
