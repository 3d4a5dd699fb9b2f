// (f) Load test from a second process: kun_server_load_client opens 512 concurrent streaming
// requests over loopback against a server on the fake front door, whose serving thread emits
// each request's tokens on a fixed schedule. Every request must complete, and the test reports
// the HTTP layer's added latency per token two ways:
//   - client-observed inter-token time minus the engine's scripted inter-token time;
//   - per token, client arrival time minus the moment the fake engine handed that token to the
//     server's callback (both CLOCK_MONOTONIC, so comparable across the two processes).
// Environment overrides: KUN_LOAD_CONNECTIONS (512), KUN_LOAD_MAX_TOKENS (64),
// KUN_LOAD_ITL_US (20000), KUN_LOAD_IO_THREADS (2).
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "server/tests/server_test_util.h"

extern char** environ;

// Sanitizers slow the server several-fold: there the test still requires every stream to
// complete (and TSan to stay quiet) but skips the latency and overlap bounds.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr bool kTimingAsserts = false;
#else
constexpr bool kTimingAsserts = true;
#endif

namespace kun::server::testing {
namespace {

// The latency bounds assume the host is not oversubscribed: with the 1-minute load average above
// twice the cores (builds beside the suite), 512 streams wait for time slices, not for the server.
bool host_oversubscribed() {
  std::ifstream f("/proc/loadavg");
  double load1 = 0.0;
  if (!(f >> load1)) return false;
  const long cores = ::sysconf(_SC_NPROCESSORS_ONLN);
  const bool over = cores > 0 && load1 > 2.0 * static_cast<double>(cores);
  if (over) std::printf("[load] load average %.1f on %ld cores: latency bounds not checked\n", load1, cores);
  return over;
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::atoi(v) : fallback;
}

struct Stats {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
  std::size_t n = 0;
};
Stats stats_of(std::vector<double> v) {
  Stats s;
  s.n = v.size();
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
std::string fmt(const Stats& s) {
  char buf[200];
  std::snprintf(buf, sizeof(buf), "mean %.3f  p50 %.3f  p90 %.3f  p99 %.3f  max %.3f ms (n=%zu)", s.mean, s.p50,
                s.p90, s.p99, s.max, s.n);
  return buf;
}

TEST(LoadTest, ConcurrentStreamingFromASecondProcess) {
  const int connections = env_int("KUN_LOAD_CONNECTIONS", 512);
  const int max_tokens = env_int("KUN_LOAD_MAX_TOKENS", 64);
  const int itl_us = env_int("KUN_LOAD_ITL_US", 20000);
  FakeConfig fc;
  fc.inter_token_us = itl_us;
  fc.first_token_us = itl_us;
  fc.max_requests = static_cast<std::size_t>(connections) * 2;
  fc.max_context_tokens = 4096;
  ServerConfig sc;
  sc.io_threads = env_int("KUN_LOAD_IO_THREADS", 2);
  ServerHarness h(fc, sc);
  h.fake().enable_emit_log(true);

  const std::string out_path = ::testing::TempDir() + "/kun_load_client_times.txt";
  const std::string summary_path = ::testing::TempDir() + "/kun_load_client_summary.json";
  std::vector<std::string> args = {KUN_SERVER_LOAD_CLIENT, "--port", std::to_string(h.port()),
                                   "--connections", std::to_string(connections),
                                   "--max-tokens", std::to_string(max_tokens),
                                   "--timeout-s", "90", "--out", out_path};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, summary_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = -1;
  ASSERT_EQ(posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ), 0) << argv[0];
  posix_spawn_file_actions_destroy(&actions);

  // Bounded wait for the client.
  int status = 0;
  bool exited = false;
  for (int i = 0; i < 1200 && !exited; ++i) {  // <= 120 s
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      exited = true;
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  if (!exited) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    FAIL() << "load client did not finish in time";
  }
  std::ifstream sf(summary_path);
  std::stringstream ss;
  ss << sf.rdbuf();
  const auto summary = nlohmann::json::parse(ss.str(), nullptr, false);
  ASSERT_FALSE(summary.is_discarded()) << ss.str();
  std::printf("[load] client summary: %s\n", summary.dump().c_str());
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_EQ(summary["ok"], connections);
  EXPECT_EQ(summary["failed"], 0);
  // All requests were in the engine at the same time: the HTTP layer held them concurrently.
  std::printf("[load] most requests in the engine at once: %zu\n", h.fake().max_active_seen());
  if (kTimingAsserts) {
    EXPECT_EQ(h.fake().max_active_seen(), static_cast<std::size_t>(connections));
  }

  // Correlate client arrivals with engine emit times, request by request.
  ASSERT_TRUE(h.fake().wait_idle(std::chrono::milliseconds(5000)));
  std::map<int, std::vector<std::int64_t>> emits;
  for (auto& log : h.fake().take_emit_log()) {
    std::string prompt;
    for (std::int32_t t : log.prompt_tokens) {
      if (t < 256) prompt.push_back(static_cast<char>(t));
    }
    if (prompt.rfind("load-", 0) == 0) emits[std::atoi(prompt.c_str() + 5)] = std::move(log.emit_ns);
  }
  std::ifstream tf(out_path);
  std::string line;
  std::vector<double> delay_ms, client_itl_ms, engine_itl_ms, added_itl_ms;
  int matched = 0;
  while (std::getline(tf, line)) {
    std::istringstream ls(line);
    int idx = -1;
    ls >> idx;
    std::vector<std::int64_t> arrivals;
    std::int64_t t;
    while (ls >> t) arrivals.push_back(t);
    auto it = emits.find(idx);
    if (it == emits.end() || it->second.size() != arrivals.size()) continue;
    ++matched;
    const auto& e = it->second;
    for (std::size_t k = 0; k < arrivals.size(); ++k) {
      delay_ms.push_back(static_cast<double>(arrivals[k] - e[k]) * 1e-6);
      if (k > 0) {
        const double c = static_cast<double>(arrivals[k] - arrivals[k - 1]) * 1e-6;
        const double g = static_cast<double>(e[k] - e[k - 1]) * 1e-6;
        client_itl_ms.push_back(c);
        engine_itl_ms.push_back(g);
        added_itl_ms.push_back(c - itl_us * 1e-3);
      }
    }
  }
  EXPECT_EQ(matched, connections);
  const Stats delay = stats_of(delay_ms), citl = stats_of(client_itl_ms), eitl = stats_of(engine_itl_ms),
              added = stats_of(added_itl_ms);
  std::printf("[load] %d concurrent streams x %d tokens, scripted inter-token time %.1f ms, %d I/O threads\n",
              connections, max_tokens, itl_us * 1e-3, sc.io_threads);
  std::printf("[load] engine (fake) inter-token time, actual : %s\n", fmt(eitl).c_str());
  std::printf("[load] client-observed inter-token time       : %s\n", fmt(citl).c_str());
  std::printf("[load] client ITL - scripted ITL (HTTP added) : %s\n", fmt(added).c_str());
  std::printf("[load] per-token delay engine emit -> client  : %s\n", fmt(delay).c_str());
  // Loose sanity bounds (2 shared cores, client and server on the same machine).
  if (kTimingAsserts && !host_oversubscribed()) {
    EXPECT_LT(delay.p50, 50.0);
    EXPECT_LT(std::abs(added.mean), 5.0);
  }
  std::filesystem::remove(out_path);
  std::filesystem::remove(summary_path);
}

}  // namespace
}  // namespace kun::server::testing
