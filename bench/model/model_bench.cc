// Model-level throughput against physical limits measured in the same run (issues 2, 3, 14):
//  * decode tokens/s at batch 1, 8 and 32 against whichever limit binds: the bytes a step must
//    read (every weight once, plus the K and V of every token each sequence attends to, averaged
//    over the timed steps) over the read bandwidth (probed right before and right after the
//    timed steps), or the step's flops over the compute peak (ratio = limit step time / measured
//    step time); the ratio to the weights' bytes alone is printed too;
//  * prefill tokens/s for a 512-token prompt against the compute peak: the highest of the
//    measured f32-FMA and bf16-dot (vdpbf16ps) peaks and, when the GEMM runs on AMX, the AMX
//    TDPBF16PS peak, all probed with --threads threads;
//  * --gemm-activations f32|bf16|amx picks the GEMM's activations (kernels::GemmActivations; bf16
//    runs vdpbf16ps where the CPU has AVX-512-BF16, amx runs AMX tiles);
//  * every figure is the median of --reps repetitions, with the spread [min .. max];
//  * the engine's own overhead: step wall time minus the executor's time, as a fraction of the
//    step (the scheduler, KV bookkeeping and event delivery);
//  * --model PATH (a GGUF file or HF safetensors directory) times that model instead of the
//    preset's synthetic weights; --json adds one JSON line with every figure (medians):
//    scripts/compare_llamacpp.py runs it and llama.cpp on one file.
// Runs through the real engine (SingleInstance) so it measures what serving gets.
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "common/units.h"
#include "kernels/roofline.h"
#include "model/config.h"
#include "model/weight_source.h"
#include "runtime/single_instance.h"

using namespace kun;

namespace {

struct StepTimes {
  double wall_us = 0, exec_us = 0;
  std::int64_t steps = 0;
  std::int64_t kv_tokens_read = 0;  // per step, per sequence: the tokens its attention reads
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"model throughput vs rooflines"};
  std::string preset = "llama-350m";
  std::string model_path;
  int threads = 2, steps = 20;
  app.add_option("--preset", preset);
  app.add_option("--model", model_path, "GGUF file or HF safetensors directory to time instead of the preset's synthetic weights");
  app.add_option("--threads", threads);
  app.add_option("--steps", steps, "decode steps timed per batch size");
  std::vector<int> batches = {1, 8, 32};
  bool prefill = true;
  app.add_option("--batches", batches, "decode batch sizes to time");
  app.add_option("--prefill", prefill, "time the 512-token prefill");
  int reps = 3;
  app.add_option("--reps", reps, "repetitions of every figure (the median is reported)")->check(CLI::PositiveNumber);
  int bw_mib = 512;
  app.add_option("--bw-mib", bw_mib, "buffer of the read-bandwidth probe (MiB, >> last-level cache)");
  bool json = false;
  app.add_flag("--json", json, "end with one JSON line: decode tokens/s and ratio per batch, prefill tokens/s and ratio");
  std::string gemm_activations;
  app.add_option("--gemm-activations", gemm_activations,
                 "f32 | bf16 | amx: activations of the bf16 GEMM (default: KUN_GEMM_ACTIVATIONS, else amx where the CPU has AMX-BF16, else bf16 on AMD with AVX-512-BF16, else f32)")
      ->check(CLI::IsMember({"f32", "bf16", "amx"}));
  CLI11_PARSE(app, argc, argv);
  // Read once per process by the kernels (before any kernel runs), so set it here.
  if (!gemm_activations.empty()) ::setenv("KUN_GEMM_ACTIVATIONS", gemm_activations.c_str(), 1);
  std::unique_ptr<model::WeightSource> weights;
  std::string model_name = preset;
  if (model_path.empty()) {
    auto preset_config = model::preset_config(preset);
    if (!preset_config.ok()) {
      std::fprintf(stderr, "%s\n", preset_config.status().to_string().c_str());
      return 1;
    }
    weights = model::synthetic_weights(*preset_config, 0);
  } else {
    auto opened = model::open_weights(model_path);
    if (!opened.ok()) {
      std::fprintf(stderr, "%s\n", opened.status().to_string().c_str());
      return 1;
    }
    weights = std::move(*opened);
    model_name = model_path;
  }
  const model::ModelConfig* config = &weights->config();
  // Prompt tokens 3 + (i * 97 + t * 13) % token_range: inside any vocabulary.
  const int token_range = static_cast<int>(std::min<std::int64_t>(30000, config->vocab_size - 3));
  runtime::InstanceOptions opt;
  opt.device.num_threads = threads;
  opt.device.weight_dtype = config->dtype;
  kv::KvGeometry g{opt.device.kv_block_size, config->num_kv_heads, config->head_dim, opt.device.kv_dtype};
  const std::int64_t kv_tokens = 40 * 640;
  opt.device.capacity_bytes = runtime::device_param_bytes(*config, config->dtype, 0, config->num_layers, opt.device.page_bytes) +
                              runtime::device_workspace_bytes(*config, opt.device) +
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
  kernels::ThreadPool pool(threads);  // the device's own pool belongs to its agent
  const std::int64_t probe_bytes = static_cast<std::int64_t>(bw_mib) * kMiB;
  // Compute peak: f32 FMA or the bf16 dot product, whichever this CPU does faster (flop/s), as the issue
  // asks (reported here; every figure below uses the peaks probed around its own steps).
  // The bf16-dot peak is vdpbf16ps's, or AMX's when the GEMM runs on AMX tiles (the other modes
  // cannot reach that one).
  const bool amx = kernels::active_gemm_activations() == kernels::GemmActivations::kAmx;
  const char* dot_name = amx ? "AMX" : "bf16-dot";
  auto dot_peak = [&] {
    return amx ? kernels::measure_peak_amx_flops_per_s(&pool) : kernels::measure_peak_bf16_dot_flops_per_s(&pool);
  };
  auto compute_peak = [&] { return std::max(kernels::measure_peak_fma_flops_per_s(&pool), dot_peak()); };
  const double peak_fma = kernels::measure_peak_fma_flops_per_s(&pool);
  const double peak_dot = dot_peak();
  const double peak = std::max(peak_fma, peak_dot);
  const std::int64_t db = dtype_bytes(config->dtype);
  // Bytes a decode step must read: every decoder layer's weights plus the LM head.
  const std::int64_t step_weight_bytes = (config->num_layers * config->layer_param_count() + config->embedding_param_count()) * db;
  const double step_weight_flops_per_token =
      2.0 * static_cast<double>(config->num_layers * config->layer_param_count() + config->embedding_param_count());
  std::printf("%s (%s, %lld layers), %d threads, isa %s, gemm activations %s, median of %d repetitions [min .. max]\n",
              model_name.c_str(), std::string(dtype_name(config->dtype)).c_str(), static_cast<long long>(config->num_layers),
              threads, std::string(kernels::isa_name(kernels::active_isa())).c_str(),
              std::string(kernels::gemm_activations_name(kernels::active_gemm_activations())).c_str(), reps);
  std::printf("measured: peak FMA %.1f GFLOP/s, peak %s %.1f GFLOP/s -> compute limit %.1f GFLOP/s (%s); "
              "decode step reads %.1f MB of weights\n",
              peak_fma / 1e9, dot_name, peak_dot / 1e9, peak / 1e9, peak_dot > peak_fma ? dot_name : "FMA",
              static_cast<double>(step_weight_bytes) / 1e6);

  StepTimes times;
  engine.set_step_observer([&](const engine::StepPlan& plan, const engine::StepResult& r) {
    times.exec_us += static_cast<double>(r.duration_us);
    for (const auto& s : plan.sequences) times.kv_tokens_read += s.start_pos + static_cast<std::int64_t>(s.tokens.size());
  });
  // K and V of one token in every layer, in the cache's dtype.
  const std::int64_t kv_bytes_per_token =
      config->num_layers * 2 * config->num_kv_heads * config->head_dim * dtype_bytes(opt.device.kv_dtype);
  auto timed_steps = [&](int n) {
    times = StepTimes{};
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) engine.run_step();
    times.wall_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    times.steps = n;
  };
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  auto spread = [](const std::vector<double>& v) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "[%.2f .. %.2f]", *std::min_element(v.begin(), v.end()),
                  *std::max_element(v.begin(), v.end()));
    return std::string(buf);
  };

  std::string json_decode;  // "B": {"tokens_per_s": x, "ratio": y}, ... (--json)
  auto print_json = [&](const std::string& prefill_text) {
    if (json) {
      std::printf("{\"vocab_size\": %lld, \"decode\": {%s}, \"prefill_512\": %s}\n",
                  static_cast<long long>(config->vocab_size), json_decode.c_str(), prefill_text.c_str());
    }
  };
  std::printf("\n%-9s %9s %9s %17s %8s %11s %8s %7s %-16s %13s %s\n", "decode", "tokens/s", "step ms", "bw before/after",
              "KV MB", "limit ms", "binds", "ratio", "spread", "weights only", "engine overhead");
  for (int batch : batches) {
    std::vector<double> ratios, step_mss, limit_mss, bws, bws_before, bws_after, overheads, kv_mbs, weight_ratios;
    const char* binds = "";
    for (int rep = 0; rep < reps; ++rep) {
      for (int i = 0; i < batch; ++i) {
        engine::RequestSpec spec;
        for (int t = 0; t < 32; ++t) spec.prompt_tokens.push_back(3 + (i * 97 + t * 13 + rep * 7) % token_range);
        spec.max_tokens = steps + 8;
        spec.ignore_eos = true;
        if (!engine.submit(spec, nullptr).ok()) return 1;
      }
      engine.run_step();  // the prompts (one step: the budget covers them)
      engine.run_step();  // first decode step, warm
      // Read bandwidth probed right before and right after the timed steps; the higher one is
      // the roofline (a busy machine only makes a probe look lower).
      // The compute peak likewise (both kinds), for the batches it binds.
      const double peak_before = compute_peak();
      const double bw_before = kernels::measure_read_bandwidth_bytes_per_s(&pool, probe_bytes);
      timed_steps(steps);
      const double bw_after = kernels::measure_read_bandwidth_bytes_per_s(&pool, probe_bytes);
      const double peak_after = compute_peak();
      const double peak_rep = std::max(peak_before, peak_after);
      const double bw = std::max(bw_before, bw_after);
      const double step_ms = times.wall_us / 1e3 / static_cast<double>(times.steps);
      const double kv_bytes = static_cast<double>(times.kv_tokens_read * kv_bytes_per_token) / static_cast<double>(times.steps);
      const double weights_ms = static_cast<double>(step_weight_bytes) / bw * 1e3;
      const double memory_ms = (static_cast<double>(step_weight_bytes) + kv_bytes) / bw * 1e3;
      const double compute_ms = step_weight_flops_per_token * batch / peak_rep * 1e3;
      const double limit_ms = std::max(memory_ms, compute_ms);
      binds = memory_ms >= compute_ms ? "memory" : "compute";
      ratios.push_back(limit_ms / step_ms);
      weight_ratios.push_back(std::max(weights_ms, compute_ms) / step_ms);
      kv_mbs.push_back(kv_bytes / 1e6);
      step_mss.push_back(step_ms);
      limit_mss.push_back(limit_ms);
      bws.push_back(bw / 1e9);
      bws_before.push_back(bw_before / 1e9);
      bws_after.push_back(bw_after / 1e9);
      overheads.push_back((times.wall_us - times.exec_us) / times.wall_us * 100.0);
      while (engine.run_step()) {
      }
    }
    const double step_ms = median(step_mss);
    json_decode += std::string(json_decode.empty() ? "" : ", ") + "\"" + std::to_string(batch) + "\": {\"tokens_per_s\": " +
                   std::to_string(batch / step_ms * 1e3) + ", \"ratio\": " + std::to_string(median(ratios)) + "}";
    char bw_text[32];
    std::snprintf(bw_text, sizeof(bw_text), "%.1f / %.1f", median(bws_before), median(bws_after));
    std::printf("batch %-3d %9.1f %9.2f %17s %8.1f %11.2f %8s %7.2f %-16s %13.2f %6.2f%%\n", batch, batch / step_ms * 1e3,
                step_ms, bw_text, median(kv_mbs), median(limit_mss), binds, median(ratios), spread(ratios).c_str(),
                median(weight_ratios), median(overheads));
  }

  if (!prefill) {
    print_json("null");
    return 0;
  }
  // Prefill: one 512-token prompt in one step.
  const double n = 512;
  const double linear_flops = 2.0 * n * static_cast<double>(config->num_layers * config->layer_param_count());
  const double attn_flops = 2.0 * 2.0 * static_cast<double>(config->num_layers) * (n * (n + 1) / 2) * static_cast<double>(config->q_dim());
  const double lm_head_flops = 2.0 * static_cast<double>(config->embedding_param_count());  // last position only
  const double flops = linear_flops + attn_flops + lm_head_flops;
  // The compute peaks are probed again right before and right after every timed prefill (both
  // kinds, all threads); the highest of the four is that repetition's limit (a busy machine only
  // makes a probe look lower).
  std::vector<double> ratios, rates, overheads, fma_peaks, dot_peaks, limits;
  for (int rep = 0; rep < reps; ++rep) {
    engine::RequestSpec spec;
    for (int t = 0; t < 512; ++t) spec.prompt_tokens.push_back(3 + (t * 31 + rep * 11) % token_range);
    spec.max_tokens = 1;
    if (!engine.submit(spec, nullptr).ok()) return 1;
    const double fma_before = kernels::measure_peak_fma_flops_per_s(&pool);
    const double dot_before = dot_peak();
    timed_steps(1);
    const double fma_after = kernels::measure_peak_fma_flops_per_s(&pool);
    const double dot_after = dot_peak();
    while (engine.run_step()) {
    }
    const double fma_rep = std::max(fma_before, fma_after);
    const double dot_rep = std::max(dot_before, dot_after);
    const double limit = std::max(fma_rep, dot_rep);
    const double s = times.wall_us / 1e6;
    rates.push_back(n / s);
    ratios.push_back(flops / s / limit);
    fma_peaks.push_back(fma_rep / 1e9);
    dot_peaks.push_back(dot_rep / 1e9);
    limits.push_back(limit / 1e9);
    overheads.push_back((times.wall_us - times.exec_us) / times.wall_us * 100.0);
  }
  const double ratio = median(ratios);
  const double fma_med = median(fma_peaks), dot_med = median(dot_peaks);
  std::printf("\nprefill 512 tokens: %.1f tokens/s, %.1f GFLOP/s = %.2f %s of the compute limit %.1f GFLOP/s "
              "(peaks probed before/after each: FMA %.1f, %s %.1f GFLOP/s; engine overhead %.2f%%)\n",
              median(rates), flops * median(rates) / n / 1e9, ratio, spread(ratios).c_str(), median(limits), fma_med,
              dot_name, dot_med, median(overheads));
  print_json("{\"tokens_per_s\": " + std::to_string(median(rates)) + ", \"ratio\": " + std::to_string(ratio) + "}");
  return 0;
}
