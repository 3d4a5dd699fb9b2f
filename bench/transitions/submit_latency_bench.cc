// Submit latency while the cluster runs transitions (issue 12), as a CLI report.
//
// A ClusterRuntime of N devices keeps a few long requests decoding. A client thread calls
// submit() at a steady rate with short requests and times each call; each sample is tagged by
// whether a drop or restore (of instances 0..g-1) was in progress when the call began. The main
// thread alternates quiet periods with a drop followed by a restore, so both kinds of sample come
// from the same run. With --link-gbps the transport paces transfers (the restore's weight pull
// and KV gather), which makes transitions long, as on a real link.
//
// The report: submit latency p50 / p99 without and during transitions, their ratio, and the mean
// transition wall time: a control path that waited for the transition (a cluster-wide lock held
// throughout, as before issue 12) would put the p99 during transitions near that time.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "common/units.h"
#include "model/config.h"
#include "bench/transitions/bench_cluster.h"
#include "runtime/cluster_runtime.h"

using namespace kun;

namespace {

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const auto i = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1));
  return v[i];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"submit latency during transitions"};
  std::string preset = "llama-30m";
  std::int64_t devices = 4, degree = 2, kv_tokens = 2048;
  double link_gbps = 2.0;
  int threads = 1, rounds = 4, submit_interval_us = 1000, quiet_ms = 300;
  app.add_option("--preset", preset);
  app.add_option("--devices", devices);
  app.add_option("--degree", degree);
  app.add_option("--kv-tokens-per-device", kv_tokens);
  app.add_option("--link-gbps", link_gbps, "pace transfers (0: plain memcpy)");
  app.add_option("--threads", threads);
  app.add_option("--rounds", rounds, "drop + restore cycles");
  app.add_option("--submit-interval-us", submit_interval_us);
  app.add_option("--quiet-ms", quiet_ms, "time without a transition before each cycle");
  CLI11_PARSE(app, argc, argv);

  auto config = model::preset_config(preset);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", config.status().to_string().c_str());
    return 1;
  }
  auto weights = model::synthetic_weights(*config, 0);
  runtime::ClusterOptions o = bench::transition_bench_cluster(*config, devices, threads, kv_tokens, link_gbps);
  o.scheduler.max_waiting_requests = 1 << 20;
  SteadyClock clock;
  auto rt = runtime::ClusterRuntime::create(o, *weights, &clock);
  if (!rt.ok()) {
    std::fprintf(stderr, "%s\n", rt.status().to_string().c_str());
    return 1;
  }
  (*rt)->start();
  for (std::int64_t i = 0; i < devices; ++i) {  // background decoding on every instance
    engine::RequestSpec spec;
    for (int t = 0; t < 32; ++t) spec.prompt_tokens.push_back(static_cast<std::int32_t>(3 + (i * 37 + t) % 1000));
    spec.max_tokens = std::min(kv_tokens, config->max_position_embeddings) / 4;
    spec.ignore_eos = true;
    if (!(*rt)->submit(spec, nullptr).ok()) return 1;
  }

  std::atomic<bool> in_transition{false}, done{false};
  std::vector<double> quiet_us, during_us;
  std::int64_t refused = 0;
  std::thread client([&] {
    std::int64_t n = 0;
    auto next = std::chrono::steady_clock::now();
    while (!done.load()) {
      engine::RequestSpec spec;
      for (int t = 0; t < 8; ++t) spec.prompt_tokens.push_back(static_cast<std::int32_t>(3 + (n * 11 + t) % 1000));
      spec.max_tokens = 1;
      ++n;
      const bool during = in_transition.load();
      const auto t0 = std::chrono::steady_clock::now();
      auto id = (*rt)->submit(spec, nullptr);
      const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      if (!id.ok()) ++refused;
      (during || in_transition.load() ? during_us : quiet_us).push_back(us);
      next += std::chrono::microseconds(submit_interval_us);
      std::this_thread::sleep_until(next);
    }
  });
  std::vector<std::int64_t> members;
  for (std::int64_t i = 0; i < degree; ++i) members.push_back(i);
  double transition_ms_total = 0;
  int transitions = 0;
  for (int r = 0; r < rounds; ++r) {
    std::this_thread::sleep_for(std::chrono::milliseconds(quiet_ms));
    in_transition.store(true);
    auto t0 = std::chrono::steady_clock::now();
    auto group = (*rt)->drop(members);
    transition_ms_total += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    in_transition.store(false);
    if (!group.ok()) {
      std::fprintf(stderr, "drop: %s\n", group.status().to_string().c_str());
      done.store(true);
      client.join();
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(quiet_ms));
    in_transition.store(true);
    t0 = std::chrono::steady_clock::now();
    const Status s = (*rt)->restore(*group);
    transition_ms_total += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    in_transition.store(false);
    transitions += 2;
    if (!s.ok()) {
      std::fprintf(stderr, "restore: %s\n", s.to_string().c_str());
      done.store(true);
      client.join();
      return 1;
    }
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(quiet_ms));
  done.store(true);
  client.join();
  (*rt)->stop();
  const double q50 = percentile(quiet_us, 0.5), q99 = percentile(quiet_us, 0.99);
  const double d50 = percentile(during_us, 0.5), d99 = percentile(during_us, 0.99);
  const double transition_ms = transition_ms_total / std::max(transitions, 1);
  std::printf("preset %s, %lld devices, degree %lld, link %s, %d drop+restore cycles, a submit every %d us\n", preset.c_str(),
              static_cast<long long>(devices), static_cast<long long>(degree), o.link.describe().c_str(), rounds, submit_interval_us);
  std::printf("submit latency without a transition: p50 %8.1f us, p99 %8.1f us (%zu submits)\n", q50, q99, quiet_us.size());
  std::printf("submit latency during a transition:  p50 %8.1f us, p99 %8.1f us (%zu submits)\n", d50, d99, during_us.size());
  std::printf("ratio during / without: p50 %.2fx, p99 %.2fx\n", q50 > 0 ? d50 / q50 : 0.0, q99 > 0 ? d99 / q99 : 0.0);
  std::printf("mean transition wall time %.2f ms; p99 submit during a transition / transition time = %.4f "
              "(near 1 if submits waited for transitions)\n",
              transition_ms, transition_ms > 0 ? d99 / (transition_ms * 1e3) : 0.0);
  if (refused > 0) std::printf("%lld submits refused\n", static_cast<long long>(refused));
  return 0;
}
