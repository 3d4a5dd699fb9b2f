// kun_server_load_client: the load test's second process. Opens N concurrent connections to a
// server on 127.0.0.1, sends one streaming /v1/completions request on each (prompt "load-<i>"),
// parses the chunked SSE stream and records when each token's text arrived (steady_clock ns,
// CLOCK_MONOTONIC, comparable with the server process's clock). Prints a JSON summary on stdout
// and, with --out, one line per request: "<i> <t_token0> <t_token1> ...".
//
// usage: kun_server_load_client --port P [--connections 512] [--max-tokens 64]
//                               [--timeout-s 60] [--out FILE] [--model NAME]
#include <algorithm>
#include <array>
#include <utility>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#if !defined(BOOST_BEAST_USE_STD_STRING_VIEW) || !defined(BOOST_ASIO_NO_DEPRECATED)
#error "Asio/Beast users must link kun_asio (one set of Boost configuration macros per binary)"
#endif
#include <boost/asio.hpp>
#include <nlohmann/json.hpp>

namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Options {
  unsigned short port = 0;
  int connections = 512;
  int max_tokens = 64;
  int timeout_s = 60;
  std::string out;
  std::string model = "fake-model";
};

class Conn : public std::enable_shared_from_this<Conn> {
 public:
  Conn(asio::io_context& ioc, int index, const Options& opt) : socket_(ioc), index_(index), opt_(opt) {}

  void start() {
    start_ns_ = now_ns();
    const tcp::endpoint ep(asio::ip::address_v4::loopback(), opt_.port);
    socket_.async_connect(ep, [self = shared_from_this()](const error_code& ec) { self->on_connect(ec); });
  }
  void abort() {
    if (!done_) fail("timeout");
  }

  bool ok() const { return ok_; }
  const std::string& error() const { return error_; }
  const std::vector<std::int64_t>& token_ns() const { return token_ns_; }
  std::int64_t start_ns() const { return start_ns_; }
  int index() const { return index_; }

 private:
  void fail(const std::string& why) {
    if (done_) return;
    done_ = true;
    ok_ = false;
    error_ = why;
    error_code ec;
    socket_.close(ec);
  }

  void on_connect(const error_code& ec) {
    if (ec) return fail("connect: " + ec.message());
    error_code ignored;
    socket_.set_option(tcp::no_delay(true), ignored);
    nlohmann::json body = {{"model", opt_.model},
                           {"prompt", "load-" + std::to_string(index_)},
                           {"max_tokens", opt_.max_tokens},
                           {"stream", true},
                           {"ignore_eos", true}};
    const std::string b = body.dump();
    request_ = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               "Content-Length: " + std::to_string(b.size()) + "\r\n\r\n" + b;
    asio::async_write(socket_, asio::buffer(request_),
                      [self = shared_from_this()](const error_code& e, std::size_t) {
                        if (e) return self->fail("write: " + e.message());
                        self->read();
                      });
  }

  void read() {
    socket_.async_read_some(asio::buffer(buf_), [self = shared_from_this()](const error_code& ec, std::size_t n) {
      self->on_read(ec, n);
    });
  }

  void on_read(const error_code& ec, std::size_t n) {
    if (done_) return;
    if (ec) return fail("read: " + ec.message() + " after " + std::to_string(token_ns_.size()) + " tokens");
    const std::int64_t t = now_ns();
    in_.append(buf_.data(), n);
    if (!parse(t)) return;
    if (!done_) read();
  }

  // Returns false once finished or failed.
  bool parse(std::int64_t t) {
    if (!headers_done_) {
      const std::size_t e = in_.find("\r\n\r\n");
      if (e == std::string::npos) return true;
      if (in_.compare(0, 12, "HTTP/1.1 200") != 0) {
        fail("status: " + in_.substr(0, std::min<std::size_t>(in_.find("\r\n"), 40)));
        return false;
      }
      in_.erase(0, e + 4);
      headers_done_ = true;
    }
    // Chunked framing.
    for (;;) {
      const std::size_t le = in_.find("\r\n");
      if (le == std::string::npos) break;
      const std::size_t size = std::strtoul(in_.c_str(), nullptr, 16);
      if (in_.size() < le + 2 + size + 2) break;
      sse_.append(in_, le + 2, size);
      in_.erase(0, le + 2 + size + 2);
      if (size == 0) {
        ended_ = true;
        break;
      }
    }
    // SSE events.
    std::size_t pos;
    while ((pos = sse_.find("\n\n")) != std::string::npos) {
      const std::string ev = sse_.substr(0, pos);
      sse_.erase(0, pos + 2);
      if (ev.rfind("data: ", 0) != 0) {
        fail("bad event: " + ev.substr(0, 40));
        return false;
      }
      const std::string data = ev.substr(6);
      if (data == "[DONE]") {
        saw_done_ = true;
        continue;
      }
      const auto j = nlohmann::json::parse(data, nullptr, false);
      if (j.is_discarded() || !j.contains("choices") || j["choices"].empty()) {
        fail("bad chunk: " + data.substr(0, 60));
        return false;
      }
      const auto& choice = j["choices"][0];
      if (choice.contains("text") && choice["text"].is_string() &&
          !choice["text"].get<std::string>().empty()) {
        token_ns_.push_back(t);  // one byte-token of text per chunk with the fake engine
      }
      if (choice.contains("finish_reason") && !choice["finish_reason"].is_null()) finish_ = choice["finish_reason"];
    }
    if (ended_) {
      done_ = true;
      ok_ = saw_done_ && finish_ == "length" && static_cast<int>(token_ns_.size()) == opt_.max_tokens;
      if (!ok_) {
        error_ = "incomplete stream: done=" + std::to_string(saw_done_) + " finish=" + finish_ +
                 " tokens=" + std::to_string(token_ns_.size());
      }
      error_code ignored;
      socket_.close(ignored);
      return false;
    }
    return true;
  }

  tcp::socket socket_;
  int index_;
  const Options& opt_;
  std::string request_;
  std::array<char, 16384> buf_{};
  std::string in_, sse_, finish_;
  bool headers_done_ = false, ended_ = false, saw_done_ = false, done_ = false, ok_ = false;
  std::string error_;
  std::vector<std::int64_t> token_ns_;
  std::int64_t start_ns_ = 0;
};

struct Summary {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};
Summary summarize(std::vector<double> v) {
  Summary s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  auto pct = [&](double p) { return v[std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())))]; };
  s.mean = sum / static_cast<double>(v.size());
  s.p50 = pct(0.5);
  s.p90 = pct(0.9);
  s.p99 = pct(0.99);
  s.max = v.back();
  return s;
}
nlohmann::json to_json(const Summary& s) {
  return {{"mean", s.mean}, {"p50", s.p50}, {"p90", s.p90}, {"p99", s.p99}, {"max", s.max}};
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--port") opt.port = static_cast<unsigned short>(std::atoi(v.c_str()));
    else if (k == "--connections") opt.connections = std::atoi(v.c_str());
    else if (k == "--max-tokens") opt.max_tokens = std::atoi(v.c_str());
    else if (k == "--timeout-s") opt.timeout_s = std::atoi(v.c_str());
    else if (k == "--out") opt.out = v;
    else if (k == "--model") opt.model = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (opt.port == 0 || opt.connections < 1 || opt.max_tokens < 1) {
    std::fprintf(stderr, "usage: %s --port P [--connections N] [--max-tokens T] [--timeout-s S] [--out FILE]\n", argv[0]);
    return 2;
  }
  try {
    asio::io_context ioc(1);
    std::vector<std::shared_ptr<Conn>> conns;
    for (int i = 0; i < opt.connections; ++i) conns.push_back(std::make_shared<Conn>(ioc, i, opt));
    const std::int64_t t0 = now_ns();
    for (auto& c : conns) c->start();
    asio::steady_timer deadline(ioc, std::chrono::seconds(opt.timeout_s));
    deadline.async_wait([&](const error_code& ec) {
      if (ec) return;
      for (auto& c : conns) c->abort();
    });
    // Run until every connection finished, then cancel the deadline.
    std::size_t finished = 0;
    while (ioc.run_one() > 0) {
      finished = 0;
      for (auto& c : conns) finished += (c->ok() || !c->error().empty()) ? 1 : 0;
      if (finished == conns.size()) {
        deadline.cancel();
      }
    }
    const double wall_s = static_cast<double>(now_ns() - t0) * 1e-9;
    int ok = 0;
    std::vector<double> itl_ms, ttft_ms;
    nlohmann::json errors = nlohmann::json::array();
    for (auto& c : conns) {
      if (c->ok()) {
        ++ok;
      } else if (errors.size() < 5) {
        errors.push_back(c->error());
      }
      const auto& t = c->token_ns();
      if (!t.empty()) ttft_ms.push_back(static_cast<double>(t[0] - c->start_ns()) * 1e-6);
      for (std::size_t k = 1; k < t.size(); ++k) itl_ms.push_back(static_cast<double>(t[k] - t[k - 1]) * 1e-6);
    }
    if (!opt.out.empty()) {
      std::ofstream f(opt.out);
      for (auto& c : conns) {
        f << c->index();
        for (std::int64_t t : c->token_ns()) f << ' ' << t;
        f << '\n';
      }
    }
    nlohmann::json summary = {{"connections", opt.connections},
                              {"ok", ok},
                              {"failed", opt.connections - ok},
                              {"errors", errors},
                              {"wall_s", wall_s},
                              {"client_itl_ms", to_json(summarize(itl_ms))},
                              {"client_ttft_ms", to_json(summarize(ttft_ms))}};
    std::printf("%s\n", summary.dump().c_str());
    return ok == opt.connections ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "load client failed: %s\n", e.what());
    return 3;
  }
}
