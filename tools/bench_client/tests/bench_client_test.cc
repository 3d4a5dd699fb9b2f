// Bench client against a scripted fake OpenAI server on 127.0.0.1: the reported TTFT/TPOT/ITL
// percentiles equal the scripted ones within a tolerance, errors are counted, nothing crashes.
//
// Tolerance: the client measures from the scheduled send time, so a TTFT includes the loopback
// connect + request write + the server thread's wake-up (sub-millisecond on an idle machine,
// a few ms on a loaded 2-core CI box). Scripted delays are met with sleep_until on the server,
// so measured values are never below the script (minus 1 ms timer granularity) and at most
// kSlackMs above for p50/p90/means; p99s may catch a scheduling hiccup of a loaded machine (seen:
// +26 ms ITL p99 at load average 9 on 2 cores): kTailSlackMs.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "tools/bench_client/bench_client.h"
#include "tools/bench_client/plots.h"
#include "tools/bench_client/tests/fake_openai_server.h"
#include "workload/report.h"

namespace kun::bench {
namespace {

using testing::FakeOpenAiServer;
using testing::FakeReply;
using workload::RequestOutcome;

// Under ASan/TSan every step is several times slower, so timing bounds widen (the sanitizer runs
// are there to find memory and threading errors, not to measure).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
constexpr double kSlackMs = kSanitized ? 60.0 : 8.0;
constexpr double kTailSlackMs = kSanitized ? 150.0 : 50.0;
constexpr double kTpotToleranceMs = kSanitized ? 8.0 : 2.0;

workload::Trace uniform_trace(int n, std::int64_t gap_us, std::int32_t output_tokens) {
  workload::Trace t;
  t.name = "uniform";
  for (int i = 0; i < n; ++i) t.requests.push_back({i * gap_us, 16, output_tokens});
  return t;
}

BenchClientConfig config_for(const FakeOpenAiServer& server) {
  BenchClientConfig c;
  c.host = "127.0.0.1";
  c.port = server.port();
  c.model = "fake";
  c.vocab_size = 1000;
  c.request_timeout_ms = 10'000;
  c.progress = ProgressMode::kOff;
  return c;
}

void expect_near_above(double got, double want, double slack, const char* what) {
  EXPECT_GE(got, want - 1.0) << what;
  EXPECT_LE(got, want + slack) << what;
}

TEST(SseParserTest, SplitsEventsAcrossReads) {
  SseParser p;
  EXPECT_TRUE(p.feed("data: {\"a\"").empty());
  auto ev = p.feed(":1}\r\n\r\ndata: x\n: comment\nevent: y\ndata: z\n\ndata: [DONE]\n");
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[0], "{\"a\":1}");
  EXPECT_EQ(ev[1], "x\nz");
  ev = p.feed("\n");
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0], "[DONE]");
}

TEST(PrometheusTest, ParsesGaugesWithLabels) {
  const std::string text =
      "# HELP kunserve_memory_demand KV demand\n"
      "# TYPE kunserve_memory_demand gauge\n"
      "kunserve_memory_demand{instance=\"0\"} 0.75\n"
      "kunserve_memory_demand{instance=\"1\",note=\"a } b\"} 1.5e-1 1700000000\n"
      "kunserve_group_state 2\n"
      "vllm:num_requests_waiting{model_name=\"m\"} +Inf\n"
      "broken{ 3\n"
      "no_value\n";
  const PrometheusParse p = parse_prometheus_text(text);
  ASSERT_EQ(p.samples.size(), 4u);
  EXPECT_EQ(p.malformed_lines, 2);
  EXPECT_EQ(p.samples[0].name, "kunserve_memory_demand");
  EXPECT_EQ(p.samples[0].series, "kunserve_memory_demand{instance=\"0\"}");
  EXPECT_DOUBLE_EQ(p.samples[0].value, 0.75);
  EXPECT_DOUBLE_EQ(p.samples[1].value, 0.15);
  EXPECT_EQ(p.samples[2].series, "kunserve_group_state");
  EXPECT_TRUE(std::isinf(p.samples[3].value));
}

TEST(RequestBodyTest, HasOpenAiStreamingFields) {
  BenchClientConfig c;
  c.model = "m";
  c.vocab_size = 100;
  const nlohmann::json b = make_request_body(c, 3, {0, 25, 7});
  EXPECT_EQ(b["model"], "m");
  ASSERT_TRUE(b["prompt"].is_array());
  EXPECT_EQ(b["prompt"].size(), 25u);
  for (const auto& id : b["prompt"]) {
    EXPECT_GE(id.get<int>(), c.first_token_id);
    EXPECT_LT(id.get<int>(), 100);
  }
  EXPECT_EQ(b["max_tokens"], 7);
  EXPECT_EQ(b["stream"], true);
  EXPECT_EQ(b["ignore_eos"], true);
  EXPECT_EQ(b["stream_options"]["include_usage"], true);
  EXPECT_EQ(b["temperature"], 0);
  EXPECT_EQ(make_request_body(c, 3, {0, 25, 7}), b);  // deterministic
  c.prompt_kind = PromptKind::kText;
  EXPECT_TRUE(make_request_body(c, 0, {0, 3, 1})["prompt"].is_string());
}

// 40 requests, 25 ms apart; request i: first token after 50 + 20 * (i % 5) ms, then a token every
// 20 ms, 8 tokens. TTFT values are {50, 70, 90, 110, 130} x 8: p50 90, p90 130, mean 90.
TEST(BenchClientTest, TimingsMatchScript) {
  FakeOpenAiServer server([](std::size_t, const nlohmann::json& body) {
    FakeReply r;
    const int i = body["prompt"][0].get<int>();  // the prompt builder encodes the index
    r.first_token_ms = 50 + 20 * (i % 5);
    r.token_gap_ms = 20;
    r.tokens = 8;
    r.queue_ms = 5.0;
    return r;
  });
  BenchClientConfig cfg = config_for(server);
  cfg.prompt_builder = [](std::size_t index, const workload::TraceRequest&) {
    return nlohmann::json::array({static_cast<int>(index)});
  };
  const auto start = std::chrono::steady_clock::now();
  auto result = run_bench(cfg, uniform_trace(40, 25'000, 8));
  ASSERT_TRUE(result.ok()) << result.status().to_string();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  ASSERT_EQ(result->records.size(), 40u);
  for (const auto& r : result->records) {
    ASSERT_EQ(r.outcome, RequestOutcome::kOk) << r.index << ": " << r.error;
    EXPECT_EQ(r.output_tokens, 8);
    EXPECT_EQ(r.token_times_us.size(), 8u);
    EXPECT_EQ(r.http_status, 200);
  }
  const workload::Report rep = workload::build_report(result->records, "fake", workload::SloSpec{100, 30});
  std::printf("TTFT mean %.2f p50 %.2f p90 %.2f p99 %.2f | TPOT mean %.2f p99 %.2f | ITL p50 %.2f p99 %.2f | "
              "E2E p50 %.2f\n",
              rep.ttft_ms.mean, rep.ttft_ms.p50, rep.ttft_ms.p90, rep.ttft_ms.p99, rep.tpot_ms.mean, rep.tpot_ms.p99,
              rep.itl_ms.p50, rep.itl_ms.p99, rep.e2e_ms.p50);
  expect_near_above(rep.ttft_ms.mean, 90.0, kSlackMs, "ttft mean");
  expect_near_above(rep.ttft_ms.p50, 90.0, kSlackMs, "ttft p50");
  expect_near_above(rep.ttft_ms.p90, 130.0, kSlackMs, "ttft p90");
  expect_near_above(rep.ttft_ms.p99, 130.0, kTailSlackMs, "ttft p99");
  EXPECT_NEAR(rep.tpot_ms.mean, 20.0, kTpotToleranceMs);
  EXPECT_NEAR(rep.tpot_ms.p50, 20.0, kTpotToleranceMs);
  EXPECT_NEAR(rep.itl_ms.p50, 20.0, kTpotToleranceMs);
  EXPECT_EQ(rep.itl_ms.count, 40 * 7);
  EXPECT_LE(rep.itl_ms.p99, 20.0 + kTailSlackMs);
  expect_near_above(rep.e2e_ms.p50, 90.0 + 7 * 20.0, kSlackMs, "e2e p50");
  EXPECT_EQ(rep.queue_ms.count, 40);
  EXPECT_DOUBLE_EQ(rep.queue_ms.p50, 5.0);
  // SLO TTFT 100 ms: the 50/70/90 ms requests (24 of 40) meet it (TPOT 20 <= 30), 110/130 do not.
  if (!kSanitized) {
    EXPECT_EQ(rep.slo_met, 24);
  }
  EXPECT_EQ(rep.completed, 40);
  EXPECT_EQ(rep.failed, 0);
}

// Request i % 5: 0 ok, 1 rejected (429 + Retry-After), 2 HTTP 500, 3 disconnect after 3
// tokens, 4 rejected (503, no Retry-After).
TEST(BenchClientTest, CountsRejectionsFailuresAndDisconnects) {
  FakeOpenAiServer server([](std::size_t, const nlohmann::json& body) {
    FakeReply r;
    r.first_token_ms = 10;
    r.token_gap_ms = 5;
    r.tokens = 6;
    switch (body["prompt"][0].get<int>() % 5) {
      case 1:
        r.status = 429;
        r.retry_after = "2";
        break;
      case 2:
        r.status = 500;
        break;
      case 3:
        r.disconnect_after_tokens = 3;
        break;
      case 4:
        r.status = 503;
        break;
      default:
        break;
    }
    return r;
  });
  BenchClientConfig cfg = config_for(server);
  cfg.prompt_builder = [](std::size_t index, const workload::TraceRequest&) {
    return nlohmann::json::array({static_cast<int>(index)});
  };
  auto result = run_bench(cfg, uniform_trace(25, 10'000, 6));
  ASSERT_TRUE(result.ok()) << result.status().to_string();
  for (const auto& r : result->records) {
    switch (r.index % 5) {
      case 0:
        EXPECT_EQ(r.outcome, RequestOutcome::kOk) << r.error;
        break;
      case 1:
        EXPECT_EQ(r.outcome, RequestOutcome::kRejected);
        EXPECT_EQ(r.http_status, 429);
        EXPECT_DOUBLE_EQ(r.retry_after_s, 2.0);
        break;
      case 2:
        EXPECT_EQ(r.outcome, RequestOutcome::kFailed);
        EXPECT_EQ(r.http_status, 500);
        EXPECT_NE(r.error.find("scripted error"), std::string::npos) << r.error;
        break;
      case 3:
        EXPECT_EQ(r.outcome, RequestOutcome::kFailed);
        EXPECT_EQ(r.token_times_us.size(), 3u);
        EXPECT_NE(r.error.find("disconnected"), std::string::npos) << r.error;
        break;
      case 4:
        EXPECT_EQ(r.outcome, RequestOutcome::kRejected);
        EXPECT_EQ(r.http_status, 503);
        EXPECT_LT(r.retry_after_s, 0.0);
        break;
    }
  }
  const workload::Report rep = workload::build_report(result->records, "fake", {});
  EXPECT_EQ(rep.total, 25);
  EXPECT_EQ(rep.completed, 5);
  EXPECT_EQ(rep.rejected, 10);
  EXPECT_EQ(rep.failed, 20);
  const nlohmann::json j = workload::report_to_json(rep);
  EXPECT_EQ(j["requests"]["failed"], 20);
}

TEST(BenchClientTest, TimeoutFiresAndMaxInFlightQueues) {
  FakeOpenAiServer server([](std::size_t n, const nlohmann::json&) {
    FakeReply r;
    r.first_token_ms = 5;
    r.token_gap_ms = 5;
    r.tokens = 3;
    if (n == 0) r.hang_ms = 3000;  // the first request to arrive hangs
    return r;
  });
  BenchClientConfig cfg = config_for(server);
  cfg.request_timeout_ms = 400;
  cfg.max_in_flight = 1;
  const auto start = std::chrono::steady_clock::now();
  auto result = run_bench(cfg, uniform_trace(3, 1'000, 3));
  ASSERT_TRUE(result.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
  EXPECT_EQ(result->records[0].outcome, RequestOutcome::kTimedOut);
  EXPECT_EQ(result->records[1].outcome, RequestOutcome::kOk) << result->records[1].error;
  EXPECT_EQ(result->records[2].outcome, RequestOutcome::kOk);
  // Requests 1 and 2 waited client-side for the slot: their TTFT includes the 400 ms timeout.
  EXPECT_GE(result->records[1].first_token_us - result->records[1].arrival_us, 390'000);
}

TEST(BenchClientTest, ConnectionRefusedIsCountedNotFatal) {
  std::uint16_t port = 0;
  {
    FakeOpenAiServer server([](std::size_t, const nlohmann::json&) { return FakeReply{}; });
    port = server.port();
  }  // closed: nothing listens on the port now
  BenchClientConfig cfg;
  cfg.port = port;
  cfg.progress = ProgressMode::kOff;
  auto result = run_bench(cfg, uniform_trace(3, 1'000, 2));
  ASSERT_TRUE(result.ok());
  for (const auto& r : result->records) {
    EXPECT_EQ(r.outcome, RequestOutcome::kFailed);
    EXPECT_NE(r.error.find("connection failed"), std::string::npos) << r.error;
  }
  BenchClientConfig bad;
  bad.port = 0;
  EXPECT_FALSE(run_bench(bad, uniform_trace(1, 0, 1)).ok());
}

TEST(BenchClientTest, PollsMetricsIntoTimeline) {
  FakeOpenAiServer server(
      [](std::size_t, const nlohmann::json&) {
        FakeReply r;
        r.first_token_ms = 20;
        r.token_gap_ms = 20;
        r.tokens = 5;
        return r;
      },
      "# TYPE kunserve_memory_demand gauge\nkunserve_memory_demand{instance=\"0\"} 0.5\n"
      "kunserve_group_state{instance=\"0\"} 1\nother_metric 3\n");
  BenchClientConfig cfg = config_for(server);
  cfg.metrics_interval_ms = 100;
  auto result = run_bench(cfg, uniform_trace(10, 100'000, 5));
  ASSERT_TRUE(result.ok());
  EXPECT_GE(server.metrics_seen(), 5u);
  EXPECT_EQ(result->metrics_errors, 0);
  ASSERT_FALSE(result->gauges.empty());
  for (const auto& g : result->gauges) EXPECT_EQ(g.series.rfind("kunserve_", 0), 0u) << g.series;
  const workload::Timeline tl = workload::build_timeline(result->records, result->gauges);
  ASSERT_EQ(tl.gauge_series.size(), 2u);
  EXPECT_DOUBLE_EQ(tl.rows[0].gauges[1], 0.5);  // sorted: group_state, memory_demand
  EXPECT_EQ(tl.rows[0].arrivals, 10);

  // Plot scripts render with gnuplot when it is installed.
  const auto dir = std::filesystem::temp_directory_path() / ("kun_bench_plot_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string csv = (dir / "timeline.csv").string();
  const std::string cdf = (dir / "ttft.csv").string();
  ASSERT_TRUE(write_text_file(csv, workload::timeline_to_csv(tl)).ok());
  ASSERT_TRUE(write_text_file(cdf, ttft_cdf_csv(result->records)).ok());
  // One row per request, in trace order, with its times (requests_csv).
  const std::string rows = requests_csv(result->records);
  EXPECT_EQ(rows.substr(0, rows.find('\n')),
            "index,arrival_us,queue_us,first_token_us,finish_us,prompt_tokens,output_tokens,recomputed_tokens,outcome");
  EXPECT_EQ(static_cast<std::size_t>(std::count(rows.begin(), rows.end(), '\n')), result->records.size() + 1);
  {
    const workload::RequestRecord& r0 = result->records.front();
    const std::string first = rows.substr(rows.find('\n') + 1, rows.find('\n', rows.find('\n') + 1) - rows.find('\n') - 1);
    EXPECT_EQ(first.substr(0, first.find(',')), std::to_string(r0.index));
    EXPECT_NE(first.find("," + std::to_string(r0.first_token_us) + ","), std::string::npos) << first;
  }
  const std::string s1 = timeline_plot_script(tl, csv, (dir / "timeline.png").string(), "fake server");
  const std::string s2 = ttft_cdf_plot_script({{"fake", cdf}, {"fake again", cdf}}, (dir / "ttft.png").string(), "TTFT");
  EXPECT_NE(s1.find("kunserve_memory_demand"), std::string::npos);
  EXPECT_NE(s2.find("fake again"), std::string::npos);
  ASSERT_TRUE(write_text_file((dir / "timeline.gp").string(), s1).ok());
  ASSERT_TRUE(write_text_file((dir / "ttft.gp").string(), s2).ok());
  if (std::system("command -v gnuplot > /dev/null 2>&1") == 0) {
    EXPECT_TRUE(run_gnuplot((dir / "timeline.gp").string()).ok());
    EXPECT_TRUE(run_gnuplot((dir / "ttft.gp").string()).ok());
    EXPECT_GT(std::filesystem::file_size(dir / "timeline.png"), 1000u);
    EXPECT_GT(std::filesystem::file_size(dir / "ttft.png"), 1000u);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kun::bench
