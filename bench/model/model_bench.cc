// Model-level throughput against physical limits measured in the same run (issues 2 and 3):
//  * decode tokens/s at batch 1, 8 and 32, each step's weight bytes / measured read bandwidth as
//    the roofline (ratio = roofline step time / measured step time);
//  * prefill tokens/s for a 512-token prompt against the measured peak FMA throughput;
//  * the engine's own overhead: step wall time minus the executor's time, as a fraction of the
//    step (the scheduler, KV bookkeeping and event delivery).
// Runs through the real engine (SingleInstance) so it measures what serving gets.
#include <chrono>
#include <cstdio>
#include <vector>

#include <CLI/CLI.hpp>

#include "common/units.h"
#include "kernels/roofline.h"
#include "model/config.h"
#include "runtime/single_instance.h"

using namespace kun;

namespace {

struct StepTimes {
  double wall_us = 0, exec_us = 0;
  std::int64_t steps = 0;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"model throughput vs rooflines"};
  std::string preset = "llama-350m";
  int threads = 2, steps = 20;
  app.add_option("--preset", preset);
  app.add_option("--threads", threads);
  app.add_option("--steps", steps, "decode steps timed per batch size");
  std::vector<int> batches = {1, 8, 32};
  bool prefill = true;
  app.add_option("--batches", batches, "decode batch sizes to time");
  app.add_option("--prefill", prefill, "time the 512-token prefill");
  CLI11_PARSE(app, argc, argv);
  auto config = model::preset_config(preset);
  if (!config.ok()) return 1;
  auto weights = model::synthetic_weights(*config, 0);
  runtime::InstanceOptions opt;
  opt.device.num_threads = threads;
  opt.device.weight_dtype = config->dtype;
  kv::KvGeometry g{opt.device.kv_block_size, config->num_kv_heads, config->head_dim, opt.device.kv_dtype};
  const std::int64_t kv_tokens = 40 * 640;
  opt.device.capacity_bytes = runtime::device_param_bytes(*config, config->dtype, 0, config->num_layers, opt.device.page_bytes) +
                              ceil_div(g.blocks_for_tokens(kv_tokens) * config->num_layers, g.blocks_per_page(opt.device.page_bytes)) *
                                  opt.device.page_bytes;
  opt.scheduler.max_num_batched_tokens = 1024;
  SteadyClock clock;
  auto inst = runtime::SingleInstance::create(opt, *weights, &clock);
  if (!inst.ok()) {
    std::fprintf(stderr, "%s\n", inst.status().to_string().c_str());
    return 1;
  }
  auto& engine = (*inst)->engine();
  kernels::ThreadPool& pool = (*inst)->device().pool();
  const double bw = kernels::measure_read_bandwidth_bytes_per_s(&pool, 512 * kMiB);
  const double peak = kernels::measure_peak_fma_flops_per_s(&pool);
  const std::int64_t db = dtype_bytes(config->dtype);
  // Bytes a decode step must read: every decoder layer's weights plus the LM head.
  const std::int64_t step_weight_bytes = (config->num_layers * config->layer_param_count() + config->embedding_param_count()) * db;
  std::printf("%s (%s, %lld layers), %d threads, isa %s\n", preset.c_str(), std::string(dtype_name(config->dtype)).c_str(),
              static_cast<long long>(config->num_layers), threads, std::string(kernels::isa_name(kernels::active_isa())).c_str());
  std::printf("measured: read bandwidth %.1f GB/s, peak FMA %.1f GFLOP/s; decode step reads %.1f MB of weights\n", bw / 1e9,
              peak / 1e9, static_cast<double>(step_weight_bytes) / 1e6);

  StepTimes times;
  engine.set_step_observer([&](const engine::StepPlan&, const engine::StepResult& r) { times.exec_us += static_cast<double>(r.duration_us); });
  auto timed_steps = [&](int n) {
    times = StepTimes{};
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) engine.run_step();
    times.wall_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    times.steps = n;
  };

  std::printf("\n%-10s %12s %14s %14s %12s %16s\n", "decode", "tokens/s", "step ms", "roofline ms", "ratio", "engine overhead");
  for (int batch : batches) {
    for (int i = 0; i < batch; ++i) {
      engine::RequestSpec spec;
      for (int t = 0; t < 32; ++t) spec.prompt_tokens.push_back(3 + (i * 97 + t * 13) % 30000);
      spec.max_tokens = steps + 8;
      spec.ignore_eos = true;
      if (!engine.submit(spec, nullptr).ok()) return 1;
    }
    engine.run_step();  // the prompts (one step: the budget covers them)
    engine.run_step();  // first decode step, warm
    timed_steps(steps);
    const double step_ms = times.wall_us / 1e3 / static_cast<double>(times.steps);
    const double roofline_ms = static_cast<double>(step_weight_bytes) / bw * 1e3;
    const double overhead = (times.wall_us - times.exec_us) / times.wall_us;
    std::printf("batch %-4d %12.1f %14.2f %14.2f %12.2f %15.2f%%\n", batch, batch / step_ms * 1e3, step_ms, roofline_ms,
                roofline_ms / step_ms, overhead * 100.0);
    while (engine.run_step()) {
    }
  }

  if (!prefill) return 0;
  // Prefill: one 512-token prompt in one step.
  engine::RequestSpec spec;
  for (int t = 0; t < 512; ++t) spec.prompt_tokens.push_back(3 + (t * 31) % 30000);
  spec.max_tokens = 1;
  if (!engine.submit(spec, nullptr).ok()) return 1;
  timed_steps(1);
  const double n = 512;
  const double linear_flops = 2.0 * n * static_cast<double>(config->num_layers * config->layer_param_count());
  const double attn_flops = 2.0 * 2.0 * static_cast<double>(config->num_layers) * (n * (n + 1) / 2) * static_cast<double>(config->q_dim());
  const double lm_head_flops = 2.0 * static_cast<double>(config->embedding_param_count());  // last position only
  const double flops = linear_flops + attn_flops + lm_head_flops;
  const double s = times.wall_us / 1e6;
  std::printf("\nprefill 512 tokens: %.1f tokens/s, %.1f GFLOP/s = %.2f of measured peak FMA (engine overhead %.2f%%)\n", n / s,
              flops / s / 1e9, flops / s / peak, (times.wall_us - times.exec_us) / times.wall_us * 100.0);
  return 0;
}
