// The real `kunserve serve` binary as a user runs it (dummy weights, default flags otherwise):
// limits that agree out of the box, graceful drain on SIGTERM with exit code 0, a refused
// start that names the flag to change, the bounded event endpoint, and `kunserve bench`
// (with /metrics polling) against it.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <cctype>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "server/tests/test_client.h"

namespace kun::tools {
namespace {

using nlohmann::json;
using server::testing::HttpResponse;
using server::testing::make_request;
using server::testing::RawConnection;
using server::testing::sse_data;
using namespace std::chrono_literals;

// A child process with stdout+stderr captured (read by a thread), killed at destruction.
class Child {
 public:
  explicit Child(std::vector<std::string> args) {
    int fds[2];
    if (::pipe(fds) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(fds[1], STDOUT_FILENO);
      ::dup2(fds[1], STDERR_FILENO);
      ::close(fds[0]);
      ::close(fds[1]);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      std::_Exit(127);
    }
    ::close(fds[1]);
    fd_ = fds[0];
    reader_ = std::thread([this] {
      char buf[4096];
      for (;;) {
        const ssize_t n = ::read(fd_, buf, sizeof(buf));
        if (n <= 0) return;
        std::lock_guard<std::mutex> lock(mu_);
        output_.append(buf, static_cast<std::size_t>(n));
      }
    });
  }
  ~Child() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
    if (reader_.joinable()) reader_.join();
    if (fd_ >= 0) ::close(fd_);
  }
  std::string output() const {
    std::lock_guard<std::mutex> lock(mu_);
    return output_;
  }
  // The port from "serving ... on http://127.0.0.1:PORT", or 0 after the timeout / an exit.
  // (Plain string search: GCC 12's <regex> trips -Wmaybe-uninitialized under the sanitizers.)
  static std::uint16_t port_in(const std::string& out) {
    const std::string marker = " on http://127.0.0.1:";
    for (std::size_t line = out.find("serving "); line != std::string::npos; line = out.find("serving ", line + 1)) {
      const std::size_t end = out.find('\n', line);
      const std::size_t at = out.find(marker, line);
      if (at == std::string::npos || (end != std::string::npos && at > end)) continue;
      std::size_t digits = at + marker.size(), n = 0;
      while (digits + n < out.size() && std::isdigit(static_cast<unsigned char>(out[digits + n])) != 0) ++n;
      if (n > 0 && n <= 5) return static_cast<std::uint16_t>(std::stoi(out.substr(digits, n)));
    }
    return 0;
  }
  std::uint16_t wait_port(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (const std::uint16_t port = port_in(output()); port != 0) return port;
      if (poll_exit()) return 0;
      std::this_thread::sleep_for(20ms);
    }
    return 0;
  }
  void signal(int sig) { ::kill(pid_, sig); }
  // The exit code (-1 while running / killed by a signal) once the child ends within timeout.
  std::optional<int> wait_exit(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (poll_exit()) return exit_code_;
      std::this_thread::sleep_for(20ms);
    }
    return std::nullopt;
  }

 private:
  bool poll_exit() {
    if (exited_) return true;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    return exited_;
  }
  pid_t pid_ = -1;
  int fd_ = -1;
  bool exited_ = false;
  int exit_code_ = -1;
  mutable std::mutex mu_;
  std::string output_;
  std::thread reader_;
};

// The binary under test: this build's, or $KUNSERVE_TEST_BIN (to run the same checks against
// another build, e.g. the one before a fix).
std::string kunserve_bin() {
  const char* env = std::getenv("KUNSERVE_TEST_BIN");
  return env != nullptr && *env != '\0' ? std::string(env) : std::string(KUNSERVE_BIN);
}

HttpResponse http_exchange(std::uint16_t port, const std::string& raw, int timeout_ms = 10000) {
  return server::testing::exchange(port, raw, timeout_ms);
}

std::vector<std::string> serve_args(std::vector<std::string> extra = {}) {
  std::vector<std::string> a = {kunserve_bin(), "serve", "--load-format", "dummy", "--port", "0"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

const char* kChatNoMaxTokens = R"({"messages":[{"role":"user","content":"Tell me a story."}]})";

TEST(ServeProcess, DefaultFlagsAnswerChatWithoutMaxTokens) {
  Child serve(serve_args());
  const std::uint16_t port = serve.wait_port(60s);
  ASSERT_NE(port, 0) << serve.output();
  // The advertised context fits one instance's KV cache (1,024 tokens per device by default).
  HttpResponse models = http_exchange(port, make_request("GET", "/v1/models", ""));
  ASSERT_EQ(models.status, 200);
  const json card = json::parse(models.body)["data"][0];
  const std::int64_t max_len = card["max_model_len"];
  EXPECT_GE(max_len, 1024);
  EXPECT_LT(max_len, 2048) << "capped below the model's 2,048 positions";
  EXPECT_NE(serve.output().find("max_model_len capped to"), std::string::npos) << serve.output();

  HttpResponse chat = http_exchange(port, make_request("POST", "/v1/chat/completions", kChatNoMaxTokens), 120000);
  ASSERT_EQ(chat.status, 200) << chat.body;
  const json body = json::parse(chat.body);
  const std::int64_t prompt = body["usage"]["prompt_tokens"];
  const std::int64_t completion = body["usage"]["completion_tokens"];
  EXPECT_GT(completion, 0);
  EXPECT_LE(prompt + completion, max_len);
  const std::string finish = body["choices"][0]["finish_reason"];
  EXPECT_TRUE(finish == "stop" || finish == "length") << finish;

  std::string stream_body = std::string(kChatNoMaxTokens);
  stream_body.insert(stream_body.size() - 1, R"(,"stream":true)");
  HttpResponse stream = http_exchange(port, make_request("POST", "/v1/chat/completions", stream_body), 120000);
  ASSERT_EQ(stream.status, 200) << stream.body;
  EXPECT_EQ(stream.body.find("\"error\""), std::string::npos) << stream.body.substr(0, 500);
  EXPECT_EQ(sse_data(stream.body).back(), "[DONE]");

  // Too long for the context: a 400 before anything streams, also with stream: true.
  HttpResponse too_long = http_exchange(
      port, make_request("POST", "/v1/completions", R"({"prompt":"hi","max_tokens":2000,"stream":true})"));
  EXPECT_EQ(too_long.status, 400) << too_long.body;

  // The transition history endpoint answers (empty at rest, bounded by --event-history).
  HttpResponse events = http_exchange(port, make_request("GET", "/v1/kunserve/events", ""));
  ASSERT_EQ(events.status, 200);
  const json ev = json::parse(events.body);
  EXPECT_EQ(ev["capacity"], 4096);
  EXPECT_TRUE(ev["data"].is_array());

  serve.signal(SIGTERM);
  EXPECT_EQ(serve.wait_exit(30s), std::optional<int>(0)) << serve.output();
}

TEST(ServeProcess, RefusesAMaxModelLenTheKvCacheCannotHold) {
  Child serve(serve_args({"--max-model-len", "2000"}));
  EXPECT_EQ(serve.wait_exit(60s), std::optional<int>(1));
  const std::string out = serve.output();
  EXPECT_NE(out.find("--kv-tokens-per-device"), std::string::npos) << out;
  EXPECT_NE(out.find("--max-model-len"), std::string::npos) << out;
  // With room for it, the same flag works.
  Child ok(serve_args({"--max-model-len", "2000", "--kv-tokens-per-device", "2048", "--devices", "1"}));
  const std::uint16_t port = ok.wait_port(60s);
  ASSERT_NE(port, 0) << ok.output();
  const json card = json::parse(http_exchange(port, make_request("GET", "/v1/models", "")).body)["data"][0];
  EXPECT_EQ(card["max_model_len"], 2000);
  ok.signal(SIGINT);
  EXPECT_EQ(ok.wait_exit(30s), std::optional<int>(0)) << ok.output();
}

TEST(ServeProcess, SigtermDrainsThenCutsStreamsWithAnErrorEventAndExitsZero) {
  // llama-30m (64 MB of weights read per token) so the 1,000-token stream is still running when
  // the 0.5 s drain ends: the tiny preset can finish it first on a quiet host.
  Child serve(serve_args({"--drain-timeout-s", "0.5", "--devices", "1", "--preset", "llama-30m", "--threads", "1"}));
  const std::uint16_t port = serve.wait_port(60s);
  ASSERT_NE(port, 0) << serve.output();
  RawConnection stream(port);
  ASSERT_TRUE(stream.send_all(make_request(
      "POST", "/v1/completions", R"({"prompt":"once upon a time","max_tokens":1000,"ignore_eos":true,"stream":true})")));
  // Wait for the first tokens, then SIGTERM.
  for (int i = 0; i < 200 && stream.buffer().find("\"text\"") == std::string::npos; ++i) stream.read_more(100);
  ASSERT_NE(stream.buffer().find("\"text\""), std::string::npos) << stream.buffer();
  serve.signal(SIGTERM);
  // During the drain a new connection is answered 503 + Retry-After, not refused.
  HttpResponse during;
  for (int i = 0; i < 100; ++i) {
    during = http_exchange(port, make_request("GET", "/health", ""), 2000);
    if (during.status == 503) break;
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_EQ(during.status, 503);
  EXPECT_FALSE(during.header("retry-after").empty());
  // The stream was cut at the deadline: an error event, then [DONE], then the chunked end.
  HttpResponse r = stream.read_response(20000);
  EXPECT_EQ(r.status, 200);
  EXPECT_TRUE(r.complete);
  const auto events = sse_data(r.body);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.back(), "[DONE]");
  EXPECT_NE(events[events.size() - 2].find("\"error\""), std::string::npos) << events[events.size() - 2];
  EXPECT_EQ(serve.wait_exit(30s), std::optional<int>(0)) << serve.output();
}

TEST(ServeProcess, BenchAgainstTheRealServerWithMetricsPolling) {
  Child serve(serve_args({"--served-model-name", "tiny-served", "--api-key", "bench-key"}));
  const std::uint16_t port = serve.wait_port(60s);
  ASSERT_NE(port, 0) << serve.output();
  const std::string json_path =
      (std::filesystem::temp_directory_path() / ("kunserve_bench_" + std::to_string(::getpid()) + ".json")).string();
  // The key comes from the environment, as a user would pass it.
  ::setenv("KUNSERVE_API_KEY", "bench-key", 1);
  Child bench({kunserve_bin(), "bench", "--host", "127.0.0.1", "--port", std::to_string(port), "--load-format", "dummy",
               "--trace", "poisson", "--rate", "8", "--duration-s", "2", "--max-prompt", "48", "--max-output", "16",
               "--json", json_path});
  ::unsetenv("KUNSERVE_API_KEY");
  const auto code = bench.wait_exit(60s);
  ASSERT_EQ(code, std::optional<int>(0)) << bench.output();
  EXPECT_EQ(bench.output().find("field name too large"), std::string::npos) << bench.output();
  std::ifstream f(json_path);
  const json report = json::parse(f, nullptr, false);
  std::filesystem::remove(json_path);
  ASSERT_TRUE(report.is_object()) << bench.output();
  EXPECT_GT(report["requests"]["completed"].get<std::int64_t>(), 0) << report.dump();
  EXPECT_EQ(report["requests"]["failed"].get<std::int64_t>(), 0) << report.dump();
  // The /metrics poller (on by default against a server) worked: samples, no failed polls.
  EXPECT_EQ(report["runtime"]["metrics_poll_errors"].get<std::int64_t>(), 0) << report.dump();
  EXPECT_GT(report["runtime"]["metrics_samples"].get<std::int64_t>(), 0) << report.dump();
  serve.signal(SIGTERM);
  EXPECT_EQ(serve.wait_exit(30s), std::optional<int>(0)) << serve.output();
}

}  // namespace
}  // namespace kun::tools
