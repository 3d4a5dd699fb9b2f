// prefill_breakdown [--preset P] [--threads T] [--tokens N] [--reps R]
//
// Splits one N-token prefill (default 512, one sequence from position 0) of the forward pass (no
// engine) into where its time goes, each part against the compute peak (issue 14: prefill at 0.9
// of the peak needs to know what holds it below). R repetitions (median reported), each:
//  * the FMA peak probed on the pool right before (best of 5, every thread: model_bench's probe);
//  * full prefill: embed + every layer (norms, qkv, RoPE, KV append, attention, o + residual,
//    norm, gate_up + silu_mul, down + residual) + the last position's logits, as the engine runs it;
//  * linear only: the same linear / linear_add / linear_silu_mul calls back to back (M = N, then
//    the LM head for one row), each kind also timed on its own;
//  * attention only: attend_local of every layer over the chunk (KV append + causal attention);
//  * elementwise only: the rms_norms and RoPE calls of every layer (row-parallel, as the forward
//    pass calls them; silu_mul is timed with gate_up, in whose epilogue the AMX GEMM applies it);
//  * rest: full minus the three (the thread hand-offs, q gather, embedding, logits' norm).
// "x peak" is (the part's flops / peak) / the part's wall time, so the parts' shares of the full
// prefill's time tell which part the peak ratio of the whole loses most to. "cpu busy" is the
// process CPU time over wall time x threads (a single-threaded part or an idle wait shows as less
// than 1; the pool's spin-waits count as busy). "x peak cpu" is the part's flops over its process
// CPU time, against one thread's FMA peak by its thread CPU time (probed before each
// repetition): what the threads did with the CPU time they got, which time-slicing by other
// processes on a shared host does not change (their spin-waits count against it).
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/units.h"
#include "kernels/kernels.h"
#include "kernels/roofline.h"
#include "model/config.h"
#include "model/forward.h"
#include "model/weight_source.h"
#include "synthetic_model.h"

using namespace kun;

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double process_cpu_s() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "llama-350m";
  int threads = 2, reps = 5;
  std::int64_t tokens = 512;
  std::string attention_flag;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--preset" && i + 1 < argc) preset = argv[++i];
    else if (a == "--threads" && i + 1 < argc) threads = std::max(1, std::atoi(argv[++i]));
    else if (a == "--tokens" && i + 1 < argc) tokens = std::max<std::int64_t>(1, std::atoll(argv[++i]));
    else if (a == "--reps" && i + 1 < argc) reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--attention" && i + 1 < argc) attention_flag = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--preset P] [--threads T] [--tokens N] [--reps R] [--attention f32|amx]\n", argv[0]);
      return 2;
    }
  }
  auto config = model::preset_config(preset);
  if (!config.ok()) return 1;
  const model::ModelConfig& c = *config;
  const DType dt = c.dtype;
  const bench::SyntheticModel model_weights(c, /*memfd=*/false);
  const std::vector<model::LayerWeights>& lw = model_weights.layers();
  const model::HeadWeights& hw = model_weights.head();

  kernels::ThreadPool pool(threads);
  const std::int64_t N = tokens;
  const model::ForwardLimits limits{N, 1, N};
  constexpr std::int64_t kBlock = 16;
  kernels::AttentionArithmetic arithmetic;
  if (!bench::parse_attention_arithmetic(attention_flag, c.dtype, &arithmetic)) {
    std::fprintf(stderr, "--attention %s: f32, or amx where the CPU has AMX-BF16\n", attention_flag.c_str());
    return 2;
  }
  model::ForwardPass fwd(c, c.dtype, kBlock, DType::kBF16, arithmetic, &pool, limits);
  bench::SequenceKvCache kv(c, N, kBlock, fwd.kv_dtype());
  auto weights = [&](std::int64_t l) { return lw[static_cast<std::size_t>(l)]; };
  auto attention = [&](std::int64_t l, std::int64_t, const model::SequenceSlice& s, const float* qkv, float* out) {
    fwd.attend_local(s, qkv, kv.layer(l), out);
  };
  const std::int64_t H = c.hidden_size;
  const std::int64_t F = c.intermediate_size;
  const std::int64_t qkv_cols = c.q_dim() + 2 * c.kv_dim();
  const bench::Floats hidden(N * H);
  const bench::Floats logits(c.vocab_size);
  std::vector<std::int32_t> prompt(static_cast<std::size_t>(N));
  for (std::int64_t t = 0; t < N; ++t) prompt[t] = static_cast<std::int32_t>(3 + (t * 31) % (c.vocab_size - 3));
  const model::SequenceSlice slice{0, N};
  const std::int64_t last_row = N - 1;
  auto full_prefill = [&] {
    fwd.embed(hw, prompt.data(), N, hidden.data());
    fwd.run_layers(0, c.num_layers, std::span(&slice, 1), hidden.data(), weights, attention);
    fwd.logits(hw, hidden.data(), std::span(&last_row, 1), logits.data());
  };

  // Inputs of the isolated parts (values as in a real step: small random-ish activations).
  const bench::Floats x(N * std::max(2 * F, qkv_cols));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>(static_cast<int>(i * 2654435761u % 200) - 100) / 100.0f;
  const bench::Floats y(N * std::max({2 * F, qkv_cols, c.vocab_size}));
  const bench::Floats attn_out(N * c.q_dim());
  const bench::Floats act(N * F);
  const bench::Floats normed(N * H);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(N));
  for (std::int64_t t = 0; t < N; ++t) positions[t] = t;
  const std::vector<float> inv_freq = c.rope_inv_freq();

  enum { kQkv, kO, kGateUp, kDown, kHead, kKinds };
  // gate_up runs as the engine runs it: linear_silu_mul (silu_mul in the GEMM's epilogue where it
  // fuses, a pass after it elsewhere), so silu_mul is timed with it.
  const char* names[kKinds] = {"qkv", "o (+ residual)", "gate_up (+ silu_mul)", "down (+ residual)", "lm_head (1 row)"};
  double kind_flops[kKinds] = {};
  for (const model::LayerWeights& w : lw) {
    kind_flops[kQkv] += 2.0 * static_cast<double>(N * w.qkv.rows * w.qkv.cols);
    kind_flops[kO] += 2.0 * static_cast<double>(N * w.o.rows * w.o.cols);
    kind_flops[kGateUp] += 2.0 * static_cast<double>(N * w.gate_up.rows * w.gate_up.cols);
    kind_flops[kDown] += 2.0 * static_cast<double>(N * w.down.rows * w.down.cols);
  }
  kind_flops[kHead] = 2.0 * static_cast<double>(hw.lm_head.rows * hw.lm_head.cols);
  double linear_flops = 0;
  for (double f : kind_flops) linear_flops += f;
  const double attn_flops = 2.0 * 2.0 * static_cast<double>(c.num_layers) * (static_cast<double>(N) * static_cast<double>(N + 1) / 2) *
                            static_cast<double>(c.q_dim());
  const double full_flops = linear_flops + attn_flops;

  std::printf("%s (%s), %d threads, isa %s, gemm activations %s, attention %s, prefill of %lld tokens, "
              "median of %d repetitions\n",
              preset.c_str(), std::string(dtype_name(dt)).c_str(), threads,
              std::string(kernels::isa_name(kernels::active_isa())).c_str(),
              std::string(kernels::gemm_activations_name(kernels::active_gemm_activations())).c_str(),
              arithmetic == kernels::AttentionArithmetic::kAmx ? "amx" : "f32", static_cast<long long>(N), reps);

  struct Part {
    std::vector<double> s, cpu, cpu_s;
  };
  enum { kFull, kLinear, kAttn, kElem, kParts };
  Part parts[kParts];
  std::vector<double> kind_s[kKinds], peaks, thread_peaks;
  auto timed = [&](Part* p, auto&& fn) {
    const double c0 = process_cpu_s();
    const double t0 = now_s();
    fn();
    const double s = now_s() - t0;
    p->s.push_back(s);
    p->cpu.push_back((process_cpu_s() - c0) / (s * threads));
    p->cpu_s.push_back(process_cpu_s() - c0);
  };
  full_prefill();  // warm: first touch of the workspace and the KV blocks
  for (int rep = 0; rep < reps; ++rep) {
    peaks.push_back(kernels::measure_peak_fma_flops_per_s(&pool));
    thread_peaks.push_back(
        kernels::measure_peak_fma_flops_per_s(kernels::active_isa(), nullptr, kernels::ProbeClock::kThreadCpu));
    timed(&parts[kFull], full_prefill);
    auto linear_call = [&](int kind, const kernels::WeightView& w, std::int64_t m, bool add, double* each) {
      const double t0 = each != nullptr ? now_s() : 0.0;
      if (kind == kGateUp) {
        kernels::linear_silu_mul(x.data(), m, w, y.data(), act.data(), &pool);
      } else if (add) {
        kernels::linear_add(x.data(), m, w, y.data(), &pool);
      } else {
        kernels::linear(x.data(), m, w, nullptr, y.data(), &pool);
      }
      if (each != nullptr) each[kind] += now_s() - t0;
    };
    timed(&parts[kLinear], [&] {
      for (const model::LayerWeights& w : lw) {
        linear_call(kQkv, w.qkv, N, false, nullptr);
        linear_call(kO, w.o, N, true, nullptr);
        linear_call(kGateUp, w.gate_up, N, false, nullptr);
        linear_call(kDown, w.down, N, true, nullptr);
      }
      linear_call(kHead, hw.lm_head, 1, false, nullptr);
    });
    double each[kKinds] = {};
    for (const model::LayerWeights& w : lw) {
      linear_call(kQkv, w.qkv, N, false, each);
      linear_call(kO, w.o, N, true, each);
      linear_call(kGateUp, w.gate_up, N, false, each);
      linear_call(kDown, w.down, N, true, each);
    }
    linear_call(kHead, hw.lm_head, 1, false, each);
    for (int k = 0; k < kKinds; ++k) kind_s[k].push_back(each[k]);
    timed(&parts[kAttn], [&] {
      for (std::int64_t l = 0; l < c.num_layers; ++l) attention(l, 0, slice, x.data(), attn_out.data());
    });
    timed(&parts[kElem], [&] {
      for (const model::LayerWeights& w : lw) {
        kernels::rms_norm(hidden.data(), N, H, w.input_norm, w.dtype, c.rms_norm_eps, normed.data(), &pool);
        kernels::rope_qk(y.data(), N, qkv_cols, c.num_heads, c.num_kv_heads, c.head_dim, positions.data(), inv_freq.data(),
                         &pool);
        kernels::rms_norm(hidden.data(), N, H, w.post_norm, w.dtype, c.rms_norm_eps, normed.data(), &pool);
      }
    });
  }
  const double peak = median(peaks);
  std::printf("peak FMA (probed before each repetition, %d threads): median %.1f GFLOP/s, min %.1f, max %.1f\n", threads,
              peak / 1e9, *std::min_element(peaks.begin(), peaks.end()) / 1e9,
              *std::max_element(peaks.begin(), peaks.end()) / 1e9);
  const double thread_peak = median(thread_peaks);
  std::printf("one thread's FMA peak by its thread CPU time: median %.1f GFLOP/s\n", thread_peak / 1e9);
  const double full_s = median(parts[kFull].s);
  std::printf("%-28s %10s %8s %10s %9s %11s\n", "part (median of reps)", "ms", "x peak", "of full", "cpu busy",
              "x peak cpu");
  auto row = [&](const char* name, double s, double flops, double busy, double cpu_s) {
    char ratio[16] = "";
    if (flops > 0) std::snprintf(ratio, sizeof(ratio), "%.2f", flops / peak / s);
    char busy_text[16] = "";
    if (busy > 0) std::snprintf(busy_text, sizeof(busy_text), "%.2f", busy);
    char cpu_ratio[16] = "";
    if (flops > 0 && cpu_s > 0) std::snprintf(cpu_ratio, sizeof(cpu_ratio), "%.2f", flops / thread_peak / cpu_s);
    std::printf("%-28s %10.2f %8s %9.1f%% %9s %11s\n", name, s * 1e3, ratio, s / full_s * 100.0, busy_text, cpu_ratio);
  };
  row("full prefill", full_s, full_flops, median(parts[kFull].cpu), median(parts[kFull].cpu_s));
  row("linear calls only", median(parts[kLinear].s), linear_flops, median(parts[kLinear].cpu), median(parts[kLinear].cpu_s));
  for (int k = 0; k < kKinds; ++k) {
    row((std::string("  ") + names[k]).c_str(), median(kind_s[k]), kind_flops[k], 0, 0);
  }
  row("attention only (+ KV append)", median(parts[kAttn].s), attn_flops, median(parts[kAttn].cpu), median(parts[kAttn].cpu_s));
  row("norms, rope", median(parts[kElem].s), 0, median(parts[kElem].cpu), 0);
  std::vector<double> rest;
  for (int r = 0; r < reps; ++r) {
    rest.push_back(parts[kFull].s[r] - parts[kLinear].s[r] - parts[kAttn].s[r] - parts[kElem].s[r]);
  }
  row("rest (full - the above)", median(rest), 0, 0, 0);
  return 0;
}
