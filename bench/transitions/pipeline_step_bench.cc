// Step time of the same decoding batch on one independent instance and on fused pipeline groups
// of degree 2 and 4 (threadless engines, so this times the executor and its stage threads), with
// the measured pipeline bubble fraction. A CLI report.
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <cstdio>
#include <vector>

#include <CLI/CLI.hpp>

#include "common/units.h"
#include "model/config.h"
#include "runtime/cluster_runtime.h"

using namespace kun;

int main(int argc, char** argv) {
  CLI::App app{"fused pipeline step time"};
  std::string preset = "tiny";
  int batch = 16, steps = 50, prompt = 64;
  bool threaded = false;
  app.add_option("--preset", preset);
  app.add_flag("--threaded", threaded,
               "engine threads running (as in serving): all 4 devices busy, g=2 means two groups of 2");
  app.add_option("--batch", batch);
  app.add_option("--steps", steps);
  app.add_option("--prompt", prompt);
  CLI11_PARSE(app, argc, argv);
  auto config = model::preset_config(preset);
  if (!config.ok()) return 1;
  auto weights = model::synthetic_weights(*config, 0);
  std::printf("preset %s, batch %d decoding requests, prompt %d\n", preset.c_str(), batch, prompt);
  for (std::int64_t g : {1, 2, 4}) {
    runtime::ClusterOptions o;
    o.num_instances = 4;
    o.device.weight_dtype = config->dtype;
    kv::KvGeometry geo{o.device.kv_block_size, config->num_kv_heads, config->head_dim, o.device.kv_dtype};
    o.device.capacity_bytes = runtime::device_param_bytes(*config, config->dtype, 0, config->num_layers, o.device.page_bytes) +
                              runtime::device_workspace_bytes(*config, o.device) +
                              ceil_div(geo.blocks_for_tokens(8192) * config->num_layers, geo.blocks_per_page(o.device.page_bytes)) *
                                  o.device.page_bytes;
    o.run_policy_thread = false;
    if (threaded) o.coordinator.policy = cluster::Policy::kRecompute;  // no transitions of its own
    o.router.policy = cluster::RoutePolicy::kRoundRobin;
    SteadyClock clock;
    auto rt = runtime::ClusterRuntime::create(o, *weights, &clock);
    if (!rt.ok()) return 1;
    if (threaded) {
      // Every device busy: 4 / g groups of g (or 4 instances), batch requests on each unit.
      for (std::int64_t first = 0; g > 1 && first < 4; first += g) {
        std::vector<std::int64_t> members;
        for (std::int64_t i = 0; i < g; ++i) members.push_back(first + i);
        if (!(*rt)->drop(members).ok()) return 1;
      }
      (*rt)->start();
      std::mutex mu;
      std::condition_variable cv;
      int open = 4 * batch;
      std::int64_t tokens = 0;
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < 4 * batch; ++i) {
        engine::RequestSpec spec;
        for (int t = 0; t < prompt; ++t) spec.prompt_tokens.push_back(3 + (i * 31 + t) % 1000);
        spec.max_tokens = steps;
        spec.ignore_eos = true;
        auto id = (*rt)->submit(spec, [&](const engine::TokenEvent& ev) {
          std::lock_guard<std::mutex> lock(mu);
          if (ev.token >= 0) ++tokens;
          if (ev.finished && --open == 0) cv.notify_all();
        });
        if (!id.ok()) return 1;
      }
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return open == 0; });
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const engine::ServingStats st = (*rt)->stats();
      const double busy = st.pipeline_stage_busy_s, idle = st.pipeline_stage_idle_s;
      std::printf("g=%lld threaded: %d requests x %d tokens in %.3f s: %.1f tokens/s, bubble %.2f\n",
                  static_cast<long long>(g), 4 * batch, steps, s, static_cast<double>(tokens) / s,
                  busy + idle > 0 ? idle / (busy + idle) : 0.0);
      (*rt)->stop();
      continue;
    }
    if (g > 1) {
      std::vector<std::int64_t> members;
      for (std::int64_t i = 0; i < g; ++i) members.push_back(i);
      if (!(*rt)->drop(members).ok()) return 1;
    }
    for (int i = 0; i < batch * (g > 1 ? 1 : 1); ++i) {
      engine::RequestSpec spec;
      for (int t = 0; t < prompt; ++t) spec.prompt_tokens.push_back(3 + (i * 31 + t) % 1000);
      spec.max_tokens = steps + 10;
      spec.ignore_eos = true;
      if (!(*rt)->submit(spec, nullptr).ok()) return 1;
    }
    for (int i = 0; i < 3; ++i) (*rt)->run_step_all();  // prefill
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) (*rt)->run_step_all();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / steps;
    std::printf("g=%lld: %.3f ms per step (all units), %.1f tokens/s\n", static_cast<long long>(g), ms, batch / ms * 1e3);
  }
  return 0;
}
