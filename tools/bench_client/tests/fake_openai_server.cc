#include "tools/bench_client/tests/fake_openai_server.h"

#include <chrono>
#include <cstdio>

#include "tools/bench_client/beast_includes.h"

namespace kun::bench::testing {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

FakeOpenAiServer::FakeOpenAiServer(Script script, std::string metrics_text)
    : script_(std::move(script)), metrics_text_(std::move(metrics_text)), acceptor_(ioc_) {
  const tcp::endpoint ep(net::ip::make_address("127.0.0.1"), 0);
  acceptor_.open(ep.protocol());
  acceptor_.set_option(net::socket_base::reuse_address(true));
  acceptor_.bind(ep);
  acceptor_.listen(net::socket_base::max_listen_connections);
  port_ = acceptor_.local_endpoint().port();
  accept_thread_ = std::thread([this] { accept_loop(); });
}

FakeOpenAiServer::~FakeOpenAiServer() {
  stop_ = true;
  // Wake the blocking accept with a connection of our own.
  try {
    net::io_context ioc;
    tcp::socket s(ioc);
    s.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port_));
  } catch (const std::exception&) {
  }
  accept_thread_.join();
  std::vector<std::thread> conns;
  {
    std::lock_guard<std::mutex> lock(mu_);
    conns.swap(connections_);
  }
  for (auto& t : conns) t.join();
}

void FakeOpenAiServer::accept_loop() {
  for (;;) {
    beast::error_code ec;
    tcp::socket socket(ioc_);
    acceptor_.accept(socket, ec);
    if (stop_) return;
    if (ec) continue;
    std::lock_guard<std::mutex> lock(mu_);
    connections_.emplace_back([this, s = std::move(socket)]() mutable { serve(std::move(s)); });
  }
}

bool FakeOpenAiServer::sleep_until_or_stop(std::chrono::steady_clock::time_point t) const {
  while (std::chrono::steady_clock::now() < t) {
    if (stop_) return false;
    const auto step = std::min<std::chrono::steady_clock::duration>(t - std::chrono::steady_clock::now(),
                                                                      std::chrono::milliseconds(20));
    std::this_thread::sleep_for(step);
  }
  return !stop_;
}

void FakeOpenAiServer::serve(tcp::socket socket) {
  beast::error_code ec;
  socket.set_option(tcp::no_delay(true), ec);
  beast::flat_buffer buffer;
  http::request<http::string_body> req;
  http::read(socket, buffer, req, ec);
  if (ec) return;
  const auto t0 = std::chrono::steady_clock::now();
  if (req.method() == http::verb::get && req.target() == "/metrics") {
    ++metrics_seen_;
    http::response<http::string_body> res{http::status::ok, 11};
    res.set(http::field::content_type, "text/plain; version=0.0.4");
    res.body() = metrics_text_;
    res.prepare_payload();
    http::write(socket, res, ec);
    socket.shutdown(tcp::socket::shutdown_both, ec);
    return;
  }
  const nlohmann::json body = nlohmann::json::parse(req.body(), nullptr, false);
  const std::size_t number = completions_seen_++;
  const FakeReply reply = script_(number, body);
  if (reply.hang_ms > 0 && !sleep_until_or_stop(t0 + std::chrono::milliseconds(reply.hang_ms))) return;
  if (reply.status != 200) {
    http::response<http::string_body> res{static_cast<http::status>(reply.status), 11};
    res.set(http::field::content_type, "application/json");
    if (!reply.retry_after.empty()) res.set(http::field::retry_after, reply.retry_after);
    res.body() = R"({"error":{"message":"scripted error","type":"overloaded","code":)" + std::to_string(reply.status) + "}}";
    res.prepare_payload();
    http::write(socket, res, ec);
    socket.shutdown(tcp::socket::shutdown_both, ec);
    return;
  }
  int tokens = reply.tokens;
  if (tokens <= 0 && body.is_object() && body.contains("max_tokens")) tokens = body["max_tokens"].get<int>();
  auto write_chunk = [&](const std::string& data) {
    char size[32];
    std::snprintf(size, sizeof size, "%zx\r\n", data.size());
    const std::string chunk = std::string(size) + data + "\r\n";
    net::write(socket, net::buffer(chunk), ec);
    return !ec;
  };
  const std::string head =
      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
      "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
  net::write(socket, net::buffer(head), ec);
  if (ec) return;
  for (int k = 0; k < tokens; ++k) {
    if (k == reply.disconnect_after_tokens) {
      socket.close(ec);  // abrupt: no terminating chunk
      return;
    }
    const auto due = t0 + std::chrono::milliseconds(reply.first_token_ms + k * reply.token_gap_ms);
    if (!sleep_until_or_stop(due)) return;
    const nlohmann::json ev = {{"id", "cmpl-" + std::to_string(number)},
                               {"object", "text_completion"},
                               {"choices", {{{"index", 0}, {"text", " t" + std::to_string(k)}, {"finish_reason", nullptr}}}}};
    if (!write_chunk("data: " + ev.dump() + "\n\n")) return;
  }
  nlohmann::json usage = {{"prompt_tokens", 1}, {"completion_tokens", tokens}, {"total_tokens", tokens + 1}};
  if (reply.queue_ms >= 0) usage["queue_time_ms"] = reply.queue_ms;
  const nlohmann::json last = {{"id", "cmpl-" + std::to_string(number)}, {"choices", nlohmann::json::array()}, {"usage", usage}};
  if (!write_chunk("data: " + last.dump() + "\n\n")) return;
  if (!write_chunk("data: [DONE]\n\n")) return;
  net::write(socket, net::buffer(std::string("0\r\n\r\n")), ec);
  socket.shutdown(tcp::socket::shutdown_both, ec);
}

}  // namespace kun::bench::testing
