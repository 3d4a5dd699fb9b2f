// Regrouping a live group against forming and dissolving it in one go (issue 15), as a CLI report.
//
// One ClusterRuntime of 4 devices serves one decoding request per device throughout. Two paths to
// a group of 4 and back, one after the other on the same runtime:
//   A: drop {0,1,2,3} at once (g = 4), then restore it whole (4 -> 1);
//   B: drop {0,1} (g = 2), grow it with {2,3} (2 -> 4, members keep their layers' subsets),
//      shrink it (4 -> 2 + 2, each member pulls the layer range its new stage adds), restore both
//      halves.
// For each transition: the wall time of the call, the pause (how long the group was parked: the
// whole call for the stop-and-copy drop and growth; for a restore and a shrink, which run live,
// the pause at the start of their gather phase plus the switch, from their event) and the bytes
// it moved (weights pulled, KV copied). The shrink runs its live phase to its end (begin_shrink,
// then the switch once ready_to_split) as the policy loop does. The figures are ratios within the
// run: growth against a direct drop of 4, shrink against a whole restore of 4. With --link-gbps
// the transport paces transfers like a real link.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench/transitions/bench_cluster.h"
#include "model/config.h"
#include "runtime/cluster_runtime.h"

using namespace kun;

namespace {

struct Row {
  std::string what;
  double ms = 0;        // the call
  double pause_ms = 0;  // the group parked
  std::int64_t weight_bytes = 0, kv_bytes = 0;
};

struct TokenClock {
  std::mutex mu;
  std::condition_variable cv;
  std::int64_t tokens = 0;
};

void wait_tokens(TokenClock& tc, std::int64_t n) {
  std::unique_lock<std::mutex> lock(tc.mu);
  const std::int64_t target = tc.tokens + n;
  tc.cv.wait_for(lock, std::chrono::seconds(60), [&] { return tc.tokens >= target; });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"growth / shrink against drop / restore of a group of 4"};
  std::string preset = "llama-30m";
  std::int64_t kv_tokens = 2048;
  double link_gbps = 0.0;
  int threads = 1;
  app.add_option("--preset", preset);
  app.add_option("--kv-tokens-per-device", kv_tokens);
  app.add_option("--link-gbps", link_gbps, "pace transfers (0: plain memcpy)");
  app.add_option("--threads", threads);
  CLI11_PARSE(app, argc, argv);
  auto config = model::preset_config(preset);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", config.status().to_string().c_str());
    return 1;
  }
  if (config->num_layers < 4) {
    std::fprintf(stderr, "a group of 4 needs at least 4 layers\n");
    return 1;
  }
  auto weights = model::synthetic_weights(*config, 0);
  runtime::ClusterOptions o = bench::transition_bench_cluster(*config, 4, threads, kv_tokens, link_gbps);
  SteadyClock clock;
  auto rt = runtime::ClusterRuntime::create(o, *weights, &clock);
  if (!rt.ok()) {
    std::fprintf(stderr, "%s\n", rt.status().to_string().c_str());
    return 1;
  }
  runtime::ClusterRuntime& r = **rt;
  r.start();
  TokenClock tc;
  for (std::int64_t i = 0; i < 8; ++i) {
    engine::RequestSpec spec;
    for (int t = 0; t < 64; ++t) spec.prompt_tokens.push_back(static_cast<std::int32_t>(3 + (i * 37 + t) % 1000));
    spec.max_tokens = std::min(kv_tokens, config->max_position_embeddings) / 4;  // decoding through every transition
    spec.ignore_eos = true;
    auto id = r.submit(spec, [&tc](const engine::TokenEvent& ev) {
      if (ev.token < 0) return;
      std::lock_guard<std::mutex> lock(tc.mu);
      ++tc.tokens;
      tc.cv.notify_all();
    });
    if (!id.ok()) return 1;
  }
  wait_tokens(tc, 16);
  std::vector<Row> rows;
  std::vector<std::string> details;  // the live transitions' phases
  bool failed = false;
  // Runs `step`, timing it and counting the weight and KV bytes the transport moved meanwhile.
  const auto measure = [&](const std::string& what, const std::function<Status()>& step) {
    const runtime::TransferStats before = r.transfer_stats();
    const std::uint64_t events_before = r.events_total();
    const auto t0 = std::chrono::steady_clock::now();
    const Status s = step();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (!s.ok()) {
      std::fprintf(stderr, "%s: %s\n", what.c_str(), s.to_string().c_str());
      failed = true;
      return;
    }
    const runtime::TransferStats after = r.transfer_stats();
    const auto delta = [&](runtime::TransferKind k) { return after.bytes_of(k) - before.bytes_of(k); };
    // The live transitions' pauses from their events (the newest events_total() - events_before).
    double pause_ms = ms;
    const std::vector<runtime::ClusterEvent> events = r.events();
    const std::size_t fresh = std::min<std::size_t>(events.size(), static_cast<std::size_t>(r.events_total() - events_before));
    double live_pause_ms = 0;
    bool live = false;
    for (std::size_t i = events.size() - fresh; i < events.size(); ++i) {
      if (events[i].kind != "restore" && events[i].kind != "shrink") continue;
      live = true;
      live_pause_ms += events[i].begin_pause_ms + events[i].latency_ms;
      details.push_back(what + ": pause at begin " + std::to_string(events[i].begin_pause_ms) + " ms + switch " +
                        std::to_string(events[i].latency_ms) + " ms; live phase " + std::to_string(events[i].gather_ms) +
                        " ms; KV blocks gathered live " + std::to_string(events[i].kv_blocks_gathered_live) + ", at the switch " +
                        std::to_string(events[i].kv_blocks_exchanged) + "; blocks repacked " + std::to_string(events[i].blocks_repacked));
    }
    if (live) pause_ms = live_pause_ms;
    rows.push_back(Row{what, ms, pause_ms, delta(runtime::TransferKind::kWeights),
                       delta(runtime::TransferKind::kKvExchange) + delta(runtime::TransferKind::kKvMigration)});
    wait_tokens(tc, 8);
  };
  std::int64_t group = -1;
  measure("A drop 4", [&] {
    auto g = r.drop({0, 1, 2, 3});
    if (g.ok()) group = *g;
    return g.status();
  });
  measure("A restore 4 -> 1", [&] { return r.restore(group); });
  measure("B drop 2", [&] {
    auto g = r.drop({0, 1});
    if (g.ok()) group = *g;
    return g.status();
  });
  measure("B grow 2 -> 4", [&] {
    auto g = r.grow(group, {2, 3});
    if (g.ok()) group = *g;
    return g.status();
  });
  std::vector<std::int64_t> halves;
  measure("B shrink 4 -> 2+2", [&] {
    auto h = r.begin_shrink(group);
    if (!h.ok()) return h.status();
    for (int i = 0; i < 20000 && !r.ready_to_split(group); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    h = r.shrink(group);
    if (h.ok()) halves = *h;
    return h.status();
  });
  measure("B restore halves", [&] {
    for (std::int64_t h : halves) KUN_RETURN_IF_ERROR(r.restore(h));
    return ok_status();
  });
  r.stop();
  if (failed) return 1;
  std::printf("preset %s, 4 devices, KV for %lld tokens each, 8 decoding requests, link %s\n", preset.c_str(),
              static_cast<long long>(kv_tokens), o.link.describe().c_str());
  std::printf("%-20s %10s %10s %16s %14s\n", "transition", "call_ms", "pause_ms", "weights_pulled_B", "kv_copied_B");
  for (const Row& row : rows) {
    std::printf("%-20s %10.2f %10.2f %16lld %14lld\n", row.what.c_str(), row.ms, row.pause_ms, static_cast<long long>(row.weight_bytes),
                static_cast<long long>(row.kv_bytes));
  }
  for (const std::string& d : details) std::printf("%s\n", d.c_str());
  const auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
  std::printf("grow 2 -> 4 / drop 4 pause: %.2fx\n", ratio(rows[3].pause_ms, rows[0].pause_ms));
  std::printf("shrink 4 -> 2+2 / restore 4 -> 1 pause: %.2fx, weights pulled: %.2fx\n", ratio(rows[4].pause_ms, rows[1].pause_ms),
              ratio(static_cast<double>(rows[4].weight_bytes), static_cast<double>(rows[1].weight_bytes)));
  return 0;
}
