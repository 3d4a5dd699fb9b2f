// kernels_bench [--threads T] [--reps R] [--bw-mib MiB] [--variant rows|panels|bf16act|amx]
//
// Reports linear() for a llama-350m MLP shape (gate/up: N=2816 K=1024, down: N=1024 K=2816) in
// bf16 at M = 1, 8, 32, 512 on the active ISA (KUN_ISA narrows it), next to the rooflines measured
// in the same run: streaming read bandwidth (all threads, buffer >> LLC) and peak FMA throughput.
// Decode shapes (M <= 32) cycle through enough copies of the weight to exceed the last-level
// cache, so every call streams its weights from DRAM as in a real decode step ("cold"); "hot"
// reuses one copy (cache resident). Weights sit on huge pages at 2 MiB boundaries as in a loaded
// model (every tensor of a device's parameter pages starts on a 64-byte line): an AMX tile load of
// rows that straddle cache lines runs 3-4x slower, so a malloc'ed vector (16-byte aligned) would
// measure a layout the engine never has.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "kernels/kernels.h"
#include "kernels/roofline.h"
#include "memory/huge_pages.h"

namespace {

using kun::DType;
using namespace kun::kernels;

// A zero-filled bf16 buffer of n elements on 2 MiB huge pages, as a device arena's weights are
// (memory/huge_pages.h; KUN_HUGE_PAGES=0: 4 KiB pages), so the weights stream as they do in the
// engine and as the read probe's buffer does.
struct FreeDeleter {
  void operator()(std::uint16_t* p) const { std::free(p); }
};
using AlignedBf16 = std::unique_ptr<std::uint16_t[], FreeDeleter>;
AlignedBf16 aligned_bf16(std::int64_t n) {
  auto* p = reinterpret_cast<std::uint16_t*>(kun::memory::allocate_on_huge_pages(n * 2));
  if (p == nullptr) std::abort();
  return AlignedBf16(p);
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2;
  int reps = 0;  // 0: automatic
  std::int64_t bw_mib = 1024;
  int only_variant = -1;  // --variant rows|panels|bf16act|amx: that one only
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (a == "--bw-mib" && i + 1 < argc) bw_mib = std::atoll(argv[++i]);
    else if (a == "--variant" && i + 1 < argc) {
      const std::string v = argv[++i];
      only_variant = v == "rows" ? 0 : v == "panels" ? 1 : v == "bf16act" ? 2 : v == "amx" ? 3 : -2;
      if (only_variant == -2) {
        std::fprintf(stderr, "--variant: rows | panels | bf16act | amx\n");
        return 2;
      }
    }
    else {
      std::fprintf(stderr, "usage: %s [--threads T] [--reps R] [--bw-mib MiB] [--variant rows|panels|bf16act|amx]\n", argv[0]);
      return 2;
    }
  }
  ThreadPool pool(threads);
  std::printf("isa %s (detected %s), threads %d\n", std::string(isa_name(active_isa())).c_str(),
              std::string(isa_name(detected_isa())).c_str(), threads);
  // Table 1: all threads, wall clock. The rooflines are measured before and after the table and
  // the higher value is used (a shared machine only ever makes them look lower).
  const Isa isa = active_isa();
  const std::int64_t bw_bytes = bw_mib << 20;
  double bw = measure_read_bandwidth_bytes_per_s(&pool, bw_bytes);
  double fma = measure_peak_fma_flops_per_s(&pool);
  const double bf16 = measure_peak_bf16_dot_flops_per_s(&pool);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  auto run_table = [&](ThreadPool* table_pool, bool cpu_clock, double roof_bw, double roof_fma) {
  struct Shape {
    const char* name;
    std::int64_t n, k;
  };
  const Shape shapes[] = {{"gate/up 2816x1024", 2816, 1024}, {"down 1024x2816", 1024, 2816}};
  std::printf("%-18s %-7s %4s %5s %9s %9s %8s %6s %6s %8s %6s %6s\n", "shape", "layout", "M", "mode",
              "best_us", "median_us", "GB/s", "xBW", "xBWmed", "GFLOP/s", "xFMA", "xFMAmed");
  for (const Shape& s : shapes) {
    const std::int64_t wbytes = s.n * s.k * 2;
    // Enough copies to exceed any LLC (>= 512 MiB of weights).
    const std::int64_t copies = (std::int64_t{512} << 20) / wbytes + 1;
    const std::int64_t elems = copies * s.n * s.k;
    AlignedBf16 w = aligned_bf16(elems);
    for (std::int64_t i = 0; i < s.n * s.k; ++i) w[static_cast<std::size_t>(i)] = kun::f32_to_bf16(dist(rng));
    for (std::int64_t c = 1; c < copies; ++c) {
      std::memcpy(w.get() + c * s.n * s.k, w.get(), static_cast<std::size_t>(wbytes));
    }
    // The same weights in the GEMM layouts that model loading uses for bf16: kPanelPairs, and
    // kNarrowPanelPairs for the AMX GEMM.
    AlignedBf16 wp = aligned_bf16(elems);
    const bool amx = gemm_activations_supported(GemmActivations::kAmx);
    AlignedBf16 wn = aligned_bf16(amx ? elems : 0);
    pack_panel_pairs(w.get(), s.n, s.k, wp.get());
    if (amx) pack_panel_pairs(w.get(), s.n, s.k, wn.get(), WeightLayout::kNarrowPanelPairs);
    for (std::int64_t c = 1; c < copies; ++c) {
      std::memcpy(wp.get() + c * s.n * s.k, wp.get(), static_cast<std::size_t>(wbytes));
      if (amx) std::memcpy(wn.get() + c * s.n * s.k, wn.get(), static_cast<std::size_t>(wbytes));
    }
    const std::int64_t max_m = 512;
    std::vector<float> x(static_cast<std::size_t>(max_m * s.k));
    for (auto& v : x) v = dist(rng);
    std::vector<float> y(static_cast<std::size_t>(max_m * s.n));
    // rows: row-major f32-activation kernel; panels: the GEMM layout with f32 activations (FMA);
    // bf16act: the GEMM layout with bf16 activations (vdpbf16ps on AVX-512-BF16, same bits as
    // its FMA emulation elsewhere); amx: the GEMM layout on AMX tiles (where the CPU has them).
    for (int variant = 0; variant < 4; ++variant) {
    if (variant == 3 && !gemm_activations_supported(GemmActivations::kAmx)) continue;
    if (only_variant >= 0 && variant != only_variant) continue;
    const GemmActivations act = variant == 2 ? GemmActivations::kBf16
                                : variant == 3 ? GemmActivations::kAmx
                                               : GemmActivations::kF32;
    const WeightLayout layout = variant == 0 ? WeightLayout::kRowMajor : gemm_weight_layout(act);
    const char* variant_name = variant == 0 ? "rows" : variant == 1 ? "panels" : variant == 2 ? "bf16act" : "amx";
    const std::uint16_t* wdata = variant == 0 ? w.get() : variant == 3 ? wn.get() : wp.get();
    for (std::int64_t M : {1, 8, 32, 512}) {
      for (bool cold : {true, false}) {
        if (M == 512 && cold) continue;  // compute bound: weights are reused from cache anyway
        const std::int64_t n_copies = cold ? copies : 1;
        const double flop_per_call = 2.0 * static_cast<double>(M * s.n * s.k);
        int calls = reps;
        if (calls <= 0) calls = M == 512 ? 30 : static_cast<int>(3 * copies);
        // warm-up
        for (int i = 0; i < 3; ++i) {
          WeightView wv{wdata, DType::kBF16, s.n, s.k, layout};
          linear(isa, x.data(), M, wv, nullptr, y.data(), table_pool, act);
        }
        // Every call timed on its own; the machine may be shared, so report the best call (the
        // rooflines are best-of-5 too) and the median.
        std::vector<double> times;
        for (int i = 0; i < calls; ++i) {
          WeightView wv{wdata + (i % n_copies) * s.n * s.k, DType::kBF16, s.n, s.k, layout};
          const double t0 = cpu_clock ? thread_cpu_seconds() : now_s();
          linear(isa, x.data(), M, wv, nullptr, y.data(), table_pool, act);
          times.push_back((cpu_clock ? thread_cpu_seconds() : now_s()) - t0);
        }
        if (times.empty()) continue;
        std::sort(times.begin(), times.end());
        const double best = times[0];
        const double median = times[times.size() / 2];
        const double bytes = static_cast<double>(wbytes + M * s.k * 4 + M * s.n * 4);
        std::printf("%-18s %-7s %4lld %5s %9.1f %9.1f %8.2f %6.3f %6.3f %8.1f %6.3f %6.3f\n", s.name,
                    variant_name, static_cast<long long>(M), cold ? "cold" : "hot", best * 1e6, median * 1e6,
                    bytes / best / 1e9, bytes / best / roof_bw, bytes / median / roof_bw,
                    flop_per_call / best / 1e9, flop_per_call / best / roof_fma,
                    flop_per_call / median / roof_fma);
      }
    }
    }
  }
  };
  std::printf("\n%d threads, wall clock (ratios to the rooflines measured before the table)\n", threads);
  run_table(&pool, false, bw, fma);
  const double bw2 = measure_read_bandwidth_bytes_per_s(&pool, bw_bytes);
  const double fma2 = measure_peak_fma_flops_per_s(&pool);
  std::printf("roofline (%d threads, wall clock): read bandwidth %.2f / %.2f GB/s (before / after, "
              "%lld MiB buffer), peak FMA %.1f / %.1f GFLOP/s",
              threads, bw / 1e9, bw2 / 1e9, static_cast<long long>(bw_mib), fma / 1e9, fma2 / 1e9);
  if (bf16 > 0) std::printf(", peak bf16-dot %.1f GFLOP/s", bf16 / 1e9);
  std::printf("\n");
  if (bw2 > bw || fma2 > fma) {
    std::printf("(the rooflines rose after the table: ratios above are relative to the lower "
                "values; rerun on a quiet machine)\n");
  }

  // Table 2: one thread, its own CPU time for both the kernel and the rooflines, so time-slicing
  // by other processes does not enter the ratios (cache and memory sharing still does).
  const double bw1 = measure_read_bandwidth_bytes_per_s(isa, nullptr, bw_bytes, ProbeClock::kThreadCpu);
  const double fma1 = measure_peak_fma_flops_per_s(isa, nullptr, ProbeClock::kThreadCpu);
  std::printf("\n1 thread, thread CPU time: read bandwidth %.2f GB/s, peak FMA %.1f GFLOP/s\n",
              bw1 / 1e9, fma1 / 1e9);
  run_table(nullptr, true, bw1, fma1);

  std::printf("\nxBW: achieved bytes/s over measured read bandwidth (decode target >= 0.8 at M=1)\n"
              "xFMA: achieved flop/s over measured FMA peak (prefill target >= 0.5 at M=512)\n"
              "best / med: best and median call\n");
  return 0;
}
