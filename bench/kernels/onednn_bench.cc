// onednn_bench [--threads T] [--reps R] [--steps S] [--layers L] [--batches M ...]
//
// linear() (this project's GEMM with the active GEMM activations: amx where the CPU has it)
// against oneDNN's bf16 matmul (Debian's libdnnl, whichever implementation it picks for this CPU:
// it prints its name) on the linear calls of one llama-350m decode step: per layer qkv 2048 x
// 1024, o 1024 x 1024, gate_up 5632 x 1024, down 1024 x 2816, then lm_head 32000 x 1024. For each
// batch M and repetition the two engines run one after the other in this process, each right
// after a read-bandwidth probe, so each figure is a ratio to a limit measured next to it and the
// two engines see the same host. Both read the same bf16 weight values, each in its own packed
// layout (oneDNN's chosen by format_tag::any, reordered once), from huge pages. oneDNN gets bf16
// activations (its fastest form); linear() gets f32 ones and rounds them to bf16 itself, as the
// engine does. Before timing, the outputs of the first call of each engine are compared, so the
// figures are for the same product (a disagreement exits 1: ctest runs a small case of this as
// onednn_agreement, a check of linear() against an independent GEMM). Each row gives the step
// time as a ratio to the read-bandwidth limit (xBW, what binds decode) and to the compute peak
// (xPeak: the highest of the FMA, bf16-dot and AMX probes, what binds prefill).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

#include "common/dtype.h"
#include "kernels/kernels.h"
#include "kernels/roofline.h"
#include "memory/huge_pages.h"

namespace {

using namespace kun::kernels;

struct Shape {
  std::int64_t n;
  std::int64_t k;
};

// One weight matrix in both engines' layouts, on huge pages.
struct Weight {
  Shape shape;
  std::byte* ours = nullptr;  // pack_panel_pairs layout for the active GEMM activations
  dnnl::memory theirs;        // oneDNN's blocked layout
};

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int run(int argc, char** argv) {
  int threads = 2;
  int reps = 3;
  int steps = 6;
  int layers = 24;
  std::vector<std::int64_t> batches;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (a == "--steps" && i + 1 < argc) steps = std::atoi(argv[++i]);
    else if (a == "--layers" && i + 1 < argc) layers = std::atoi(argv[++i]);
    else if (a == "--batches") {
      while (i + 1 < argc && argv[i + 1][0] != '-') batches.push_back(std::atoll(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--threads T] [--reps R] [--steps S] [--layers L] [--batches M ...]\n", argv[0]);
      return 2;
    }
  }
  if (batches.empty()) batches = {1, 8, 32, 512};
  if (threads < 1 || reps < 1 || steps < 1 || layers < 1) {
    std::fprintf(stderr, "--threads, --reps, --steps and --layers must be at least 1\n");
    return 2;
  }
  std::int64_t max_m = 0;
  for (const std::int64_t m : batches) {
    if (m < 1) {
      std::fprintf(stderr, "--batches: each batch at least 1\n");
      return 2;
    }
    max_m = std::max(max_m, m);
  }

  std::vector<Shape> shapes;
  for (int l = 0; l < layers; ++l) {
    shapes.push_back({2048, 1024});
    shapes.push_back({1024, 1024});
    shapes.push_back({5632, 1024});
    shapes.push_back({1024, 2816});
  }
  shapes.push_back({32000, 1024});

  ThreadPool pool(threads);
  omp_set_num_threads(threads);
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);
  const WeightLayout layout = gemm_weight_layout(active_gemm_activations());

  // Weights: the same bf16 values for both engines (a cheap generator, values in about +-0.06).
  std::vector<Weight> weights;
  std::int64_t weight_bytes = 0;
  std::uint32_t state = 12345;
  std::vector<std::uint16_t> plain;
  for (const Shape& s : shapes) {
    plain.resize(static_cast<std::size_t>(s.n * s.k));
    for (auto& v : plain) {
      state = state * 1664525u + 1013904223u;
      v = kun::f32_to_bf16((static_cast<float>(state >> 8) / 16777216.0f - 0.5f) * 0.125f);
    }
    Weight w;
    w.shape = s;
    w.ours = kun::memory::allocate_on_huge_pages(panel_pairs_bytes(s.n, s.k));
    if (w.ours == nullptr) {
      std::fprintf(stderr, "out of memory for the weights\n");
      return 1;
    }
    pack_panel_pairs(plain.data(), s.n, s.k, w.ours, layout);
    // oneDNN: weights are K x N; W[n][k] row-major is its "ba" tag.
    const dnnl::memory::desc src_plain({s.k, s.n}, dnnl::memory::data_type::bf16, dnnl::memory::format_tag::ba);
    const dnnl::memory::desc any({s.k, s.n}, dnnl::memory::data_type::bf16, dnnl::memory::format_tag::any);
    const dnnl::memory::desc x_md({max_m, s.k}, dnnl::memory::data_type::bf16, dnnl::memory::format_tag::ab);
    const dnnl::memory::desc y_md({max_m, s.n}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::ab);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(x_md, any, y_md), eng);
    std::byte* theirs = kun::memory::allocate_on_huge_pages(static_cast<std::int64_t>(pd.weights_desc().get_size()));
    if (theirs == nullptr) {
      std::fprintf(stderr, "out of memory for the weights\n");
      return 1;
    }
    w.theirs = dnnl::memory(pd.weights_desc(), eng, theirs);
    dnnl::memory src(src_plain, eng, plain.data());
    dnnl::reorder(src, w.theirs).execute(strm, src, w.theirs);
    strm.wait();
    weights.push_back(w);
    weight_bytes += s.n * s.k * 2;
  }
  std::int64_t max_n = 0;
  std::int64_t max_k = 0;
  for (const Shape& s : shapes) {
    max_n = std::max(max_n, s.n);
    max_k = std::max(max_k, s.k);
  }
  std::printf("onednn_bench: %d threads, isa %s, gemm activations %s; %zu linear calls (%d layers + lm_head), %.1f MB of bf16 weights per step\n",
              threads, std::string(isa_name(active_isa())).c_str(),
              std::string(gemm_activations_name(active_gemm_activations())).c_str(), shapes.size(), layers,
              static_cast<double>(weight_bytes) / 1e6);

  // Activations in [-1, 1): f32 for linear(), the same values rounded to bf16 for oneDNN (linear()
  // rounds to nearest even; truncation here would only change which bf16 oneDNN sees, so both are
  // given values that are already bf16).
  std::vector<float> x(static_cast<std::size_t>(max_m * max_k));
  std::vector<std::uint16_t> x_bf16(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    state = state * 1664525u + 1013904223u;
    x_bf16[i] = kun::f32_to_bf16(static_cast<float>(state >> 8) / 8388608.0f - 1.0f);
    const std::uint32_t u = static_cast<std::uint32_t>(x_bf16[i]) << 16;
    std::memcpy(&x[i], &u, 4);
  }
  std::vector<float> y_ours(static_cast<std::size_t>(max_m * max_n));
  std::vector<float> y_theirs(y_ours.size());

  const std::int64_t probe_bytes = std::int64_t{512} << 20;
  std::int64_t step_macs = 0;
  for (const Shape& s : shapes) step_macs += s.n * s.k;
  const double peak = std::max({measure_peak_fma_flops_per_s(&pool), measure_peak_bf16_dot_flops_per_s(&pool),
                                measure_peak_amx_flops_per_s(&pool)});
  std::printf("compute peak %.0f GFLOP/s (the highest of the FMA, bf16-dot and AMX probes)\n", peak / 1e9);
  std::printf("%6s  %-8s %10s %9s %9s %7s %7s\n", "batch", "engine", "ms/step", "GB/s", "probe", "xBW", "xPeak");
  for (const std::int64_t m : batches) {
    struct Call {
      dnnl::matmul prim;
      dnnl::memory x, w, y;
    };
    std::vector<Call> calls;
    for (const Weight& w : weights) {
      const dnnl::memory::desc x_md({m, w.shape.k}, dnnl::memory::data_type::bf16, dnnl::memory::format_tag::ab);
      const dnnl::memory::desc y_md({m, w.shape.n}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::ab);
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(x_md, w.theirs.get_desc(), y_md), eng);
      if (w.shape.n == shapes[0].n && calls.empty()) std::printf("batch %lld: oneDNN implementation %s\n", static_cast<long long>(m), pd.impl_info_str());
      calls.push_back({dnnl::matmul(pd), dnnl::memory(x_md, eng, x_bf16.data()), w.theirs,
                       dnnl::memory(y_md, eng, y_theirs.data())});
    }
    auto run_ours = [&] {
      for (const Weight& w : weights) {
        const WeightView view{w.ours, kun::DType::kBF16, w.shape.n, w.shape.k, layout};
        linear(x.data(), m, view, nullptr, y_ours.data(), &pool);
      }
    };
    auto run_theirs = [&] {
      for (Call& c : calls) c.prim.execute(strm, {{DNNL_ARG_SRC, c.x}, {DNNL_ARG_WEIGHTS, c.w}, {DNNL_ARG_DST, c.y}});
      strm.wait();
    };
    // The same product: the first call (qkv of layer 0) of each engine, compared.
    {
      const WeightView view{weights[0].ours, kun::DType::kBF16, shapes[0].n, shapes[0].k, layout};
      linear(x.data(), m, view, nullptr, y_ours.data(), &pool);
      calls[0].prim.execute(strm, {{DNNL_ARG_SRC, calls[0].x}, {DNNL_ARG_WEIGHTS, calls[0].w}, {DNNL_ARG_DST, calls[0].y}});
      strm.wait();
      double max_diff = 0.0;
      double max_abs = 0.0;
      for (std::int64_t i = 0; i < m * shapes[0].n; ++i) {
        max_diff = std::max(max_diff, static_cast<double>(std::fabs(y_ours[i] - y_theirs[i])));
        max_abs = std::max(max_abs, static_cast<double>(std::fabs(y_theirs[i])));
      }
      // f32 sums of the same bf16 products in different orders: far below 1e-3 of the largest.
      if (!(max_diff <= 1e-3 * max_abs) || max_abs == 0.0) {
        std::fprintf(stderr, "batch %lld: the engines disagree (max difference %g, largest output %g)\n",
                     static_cast<long long>(m), max_diff, max_abs);
        return 1;
      }
    }
    std::vector<double> t_ours, t_theirs, bw_ours, bw_theirs;
    for (int r = 0; r < reps; ++r) {
      for (int e = 0; e < 2; ++e) {
        // The other engine's threads spin a while after their last call (this pool 30-60 us,
        // OpenMP longer): let them go to sleep before the probe and the timed steps.
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        const double bw = measure_read_bandwidth_bytes_per_s(&pool, probe_bytes);
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        if (e == 0) run_ours(); else run_theirs();  // warm-up step
        std::vector<double> ts;
        for (int s = 0; s < steps; ++s) {
          const double t0 = now_s();
          if (e == 0) run_ours(); else run_theirs();
          ts.push_back(now_s() - t0);
        }
        (e == 0 ? t_ours : t_theirs).push_back(median(ts));
        (e == 0 ? bw_ours : bw_theirs).push_back(bw);
      }
    }
    auto row = [&](const char* name, const std::vector<double>& t, const std::vector<double>& bw) {
      // Per repetition: step time and its ratio to the probe right before it; medians of those.
      std::vector<double> ratio;
      for (std::size_t i = 0; i < t.size(); ++i) ratio.push_back(static_cast<double>(weight_bytes) / t[i] / bw[i]);
      const double tm = median(t);
      const double flops = 2.0 * static_cast<double>(step_macs) * static_cast<double>(m);
      std::printf("%6lld  %-8s %10.2f %9.1f %9.1f %7.3f %7.3f\n", static_cast<long long>(m), name, tm * 1e3,
                  static_cast<double>(weight_bytes) / tm / 1e9, median(bw) / 1e9, median(ratio), flops / tm / peak);
    };
    row("linear", t_ours, bw_ours);
    row("oneDNN", t_theirs, bw_theirs);
    std::vector<double> speedup;
    for (std::size_t i = 0; i < t_ours.size(); ++i) speedup.push_back(t_theirs[i] / t_ours[i]);
    std::printf("%6lld  linear / oneDNN speed: %.2fx (median of %d pairs; range %.2f-%.2fx)\n",
                static_cast<long long>(m), median(speedup), reps,
                *std::min_element(speedup.begin(), speedup.end()), *std::max_element(speedup.begin(), speedup.end()));
    std::fflush(stdout);
  }
  for (Weight& w : weights) {
    std::free(w.ours);
    std::free(w.theirs.get_data_handle());
  }
  return 0;
}

// Exit status 77 (ctest's skip) where oneDNN has no bf16 matmul for this CPU.
int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const dnnl::error& e) {
    std::fprintf(stderr, "onednn_bench: oneDNN cannot run this here: %s (status %d)\n", e.what(), static_cast<int>(e.status));
    return e.status == dnnl_unimplemented ? 77 : 1;
  }
}
