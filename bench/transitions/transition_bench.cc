// Drop and restore latency with the bytes they move (issue 4), as a CLI report.
//
// A ClusterRuntime of N devices serves a few decoding requests; the bench then forces a drop of
// g instances and measures (a) the transition itself (pause at a step boundary, requests out,
// layers' pages to KV, group engine up) and (b) request-to-first-fused-step: the time until the
// next token of a running request comes out of the fused pipeline. Then it restores and measures
// the same way, with the weight bytes pulled from peers over the transport. With --link-gbps the
// transport paces transfers like a real link, so restore latency reflects the pull.
#include <chrono>
#include <condition_variable>
#include <algorithm>
#include <cstdio>
#include <mutex>
#include <vector>

#include <CLI/CLI.hpp>

#include "common/units.h"
#include "model/config.h"
#include "bench/transitions/bench_cluster.h"
#include "runtime/cluster_runtime.h"

using namespace kun;

namespace {

struct TokenClock {
  std::mutex mu;
  std::condition_variable cv;
  std::int64_t tokens = 0;
  std::chrono::steady_clock::time_point last;
};

double wait_next_token_ms(TokenClock& tc, std::chrono::steady_clock::time_point since) {
  std::unique_lock<std::mutex> lock(tc.mu);
  const std::int64_t seen = tc.tokens;
  tc.cv.wait_for(lock, std::chrono::seconds(60), [&] { return tc.tokens > seen && tc.last > since; });
  return std::chrono::duration<double, std::milli>(tc.last - since).count();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"drop / restore latency benchmark"};
  std::string preset = "llama-350m";
  std::int64_t devices = 4, degree = 2, kv_tokens = 4096;
  double link_gbps = 0.0;
  int threads = 1;
  app.add_option("--preset", preset);
  app.add_option("--devices", devices);
  app.add_option("--degree", degree);
  app.add_option("--kv-tokens-per-device", kv_tokens);
  app.add_option("--link-gbps", link_gbps, "pace transfers (0: plain memcpy)");
  app.add_option("--threads", threads);
  CLI11_PARSE(app, argc, argv);

  auto config = model::preset_config(preset);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", config.status().to_string().c_str());
    return 1;
  }
  auto weights = model::synthetic_weights(*config, 0);
  runtime::ClusterOptions o = bench::transition_bench_cluster(*config, devices, threads, kv_tokens, link_gbps);
  SteadyClock clock;
  auto rt = runtime::ClusterRuntime::create(o, *weights, &clock);
  if (!rt.ok()) {
    std::fprintf(stderr, "%s\n", rt.status().to_string().c_str());
    return 1;
  }
  (*rt)->start();
  TokenClock tc;
  for (std::int64_t i = 0; i < devices; ++i) {
    engine::RequestSpec spec;
    for (int t = 0; t < 32; ++t) spec.prompt_tokens.push_back(static_cast<std::int32_t>(3 + (i * 37 + t) % 1000));
    spec.max_tokens = std::min(kv_tokens, config->max_position_embeddings) / 2;  // keeps decoding through both transitions
    spec.ignore_eos = true;
    auto id = (*rt)->submit(spec, [&tc](const engine::TokenEvent& ev) {
      if (ev.token < 0) return;
      std::lock_guard<std::mutex> lock(tc.mu);
      ++tc.tokens;
      tc.last = std::chrono::steady_clock::now();
      tc.cv.notify_all();
    });
    if (!id.ok()) return 1;
  }
  wait_next_token_ms(tc, std::chrono::steady_clock::now());
  std::vector<std::int64_t> members;
  for (std::int64_t i = 0; i < degree; ++i) members.push_back(i);
  const auto stats_before = (*rt)->transfer_stats();
  auto t0 = std::chrono::steady_clock::now();
  auto group = (*rt)->drop(members);
  const double drop_transition_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (!group.ok()) {
    std::fprintf(stderr, "drop: %s\n", group.status().to_string().c_str());
    return 1;
  }
  const double drop_first_step_ms = wait_next_token_ms(tc, t0);
  const auto st = (*rt)->stats();
  std::int64_t dropped_bytes = 0;
  for (const auto& inst : st.instances) dropped_bytes += inst.dropped_param_bytes;
  for (int i = 0; i < 5; ++i) wait_next_token_ms(tc, std::chrono::steady_clock::now());
  t0 = std::chrono::steady_clock::now();
  if (Status s = (*rt)->restore(*group); !s.ok()) {
    std::fprintf(stderr, "restore: %s\n", s.to_string().c_str());
    return 1;
  }
  const double restore_transition_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const double restore_first_step_ms = wait_next_token_ms(tc, t0);
  const auto stats_after = (*rt)->transfer_stats();
  const std::int64_t pulled = stats_after.bytes_of(runtime::TransferKind::kWeights) - stats_before.bytes_of(runtime::TransferKind::kWeights);
  (*rt)->stop();
  std::printf("preset %s, %lld devices, drop degree %lld, link %s\n", preset.c_str(), static_cast<long long>(devices),
              static_cast<long long>(degree), o.link.describe().c_str());
  std::printf("drop:    transition %8.2f ms, to first fused step %8.2f ms, parameter bytes freed %lld (copied 0)\n",
              drop_transition_ms, drop_first_step_ms, static_cast<long long>(dropped_bytes));
  std::printf("restore: transition %8.2f ms, to first split step %8.2f ms, weight bytes pulled %lld (%.2f GB/s effective)\n",
              restore_transition_ms, restore_first_step_ms, static_cast<long long>(pulled),
              static_cast<double>(pulled) / (restore_transition_ms * 1e6));
  return 0;
}
