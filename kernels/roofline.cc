#include "kernels/roofline.h"

#include <sys/mman.h>
#include <time.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "common/check.h"
#include "kernels/internal.h"

namespace kun::kernels {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int threads_of(const ThreadPool* pool) { return pool != nullptr ? pool->num_threads() : 1; }

// Runs fn(thread_index) once on every thread of the pool; returns the wall time.
double run_on_all(ThreadPool* pool, const std::function<void(int)>& fn) {
  const auto t0 = Clock::now();
  if (pool == nullptr) {
    fn(0);
  } else {
    pool->parallel_for(pool->num_threads(), [&fn](std::int64_t b, std::int64_t e) {
      for (std::int64_t t = b; t < e; ++t) fn(static_cast<int>(t));
    });
  }
  return seconds_since(t0);
}

// Rate from a probe that does `work(thread)` units per thread: best of `reps`.
double best_rate(ThreadPool* pool, int reps, ProbeClock clock,
                 const std::function<double(int)>& work) {
  const int n = threads_of(pool);
  double best = 0.0;
  double* done = new double[static_cast<std::size_t>(n)]();
  double* cpu = new double[static_cast<std::size_t>(n)]();
  for (int r = 0; r < reps; ++r) {
    const double secs = run_on_all(pool, [&](int t) {
      const double c0 = thread_cpu_seconds();
      done[t] = work(t);
      cpu[t] = thread_cpu_seconds() - c0;
    });
    double rate = 0.0;
    if (clock == ProbeClock::kWall) {
      double total = 0.0;
      for (int t = 0; t < n; ++t) total += done[t];
      rate = secs > 0.0 ? total / secs : 0.0;
    } else {
      for (int t = 0; t < n; ++t) rate += cpu[t] > 0.0 ? done[t] / cpu[t] : 0.0;
    }
    if (rate > best) best = rate;
  }
  delete[] done;
  delete[] cpu;
  return best;
}

// Peak of a register-resident chain kernel (IsaKernels::fma_chains' signature: iterations, a
// per-thread seed, a sink; returns flops) on every thread: best of 5.
double chain_peak(ThreadPool* pool, ProbeClock clock, double (*chains)(std::int64_t, float, float*),
                  std::int64_t iters) {
  float sink[64] = {};
  const double rate = best_rate(pool, 5, clock, [&](int t) {
    return chains(iters, 1.0f + 0.1f * static_cast<float>(t), &sink[t % 64]);
  });
  volatile float keep = sink[0];
  (void)keep;
  return rate;
}

}  // namespace

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

double measure_read_bandwidth_bytes_per_s(Isa isa, ThreadPool* pool, std::int64_t bytes,
                                          ProbeClock clock) {
  const detail::IsaKernels& k = detail::kernels_for(isa);
  const int n = threads_of(pool);
  // Huge pages where the kernel gives them (2 MiB slices, MADV_HUGEPAGE before the first touch):
  // the engine's weights sit on huge pages (memory/device_arena), and streaming through 4 KiB
  // pages reads 4-14 % slower, so a probe on OS pages would understate the limit.
  constexpr std::int64_t kHuge = std::int64_t{2} << 20;
  const std::int64_t align = bytes / n >= kHuge ? kHuge : 4096;
  const std::int64_t slice = (bytes / n) / align * align;
  KUN_CHECK_GT(slice, 0) << "buffer of " << bytes << " bytes too small";
  const std::int64_t total = slice * n;
  auto* buf = static_cast<char*>(std::aligned_alloc(static_cast<std::size_t>(align), static_cast<std::size_t>(total)));
  KUN_CHECK(buf != nullptr) << "alloc " << total;
  (void)::madvise(buf, static_cast<std::size_t>(total), MADV_HUGEPAGE);  // a hint: OS pages if refused
  // First touch by the thread that later reads the slice.
  run_on_all(pool, [&](int t) { std::memset(buf + t * slice, 1, static_cast<std::size_t>(slice)); });
  float sink[64] = {};
  const double rate = best_rate(pool, 5, clock, [&](int t) {
    sink[t % 64] += k.read_sum(buf + t * slice, slice);
    return static_cast<double>(slice);
  });
  std::free(buf);
  volatile float keep = sink[0];
  (void)keep;
  return rate;
}

double measure_read_bandwidth_bytes_per_s(ThreadPool* pool, std::int64_t bytes) {
  return measure_read_bandwidth_bytes_per_s(active_isa(), pool, bytes);
}

double measure_peak_fma_flops_per_s(Isa isa, ThreadPool* pool, ProbeClock clock) {
  return chain_peak(pool, clock, detail::kernels_for(isa).fma_chains, isa == Isa::kScalar ? 2000000 : 10000000);
}

double measure_peak_fma_flops_per_s(ThreadPool* pool) {
  return measure_peak_fma_flops_per_s(active_isa(), pool);
}

double measure_peak_bf16_dot_flops_per_s(ThreadPool* pool) {
  return measure_peak_bf16_dot_flops_per_s(pool, ProbeClock::kWall);
}

double measure_peak_bf16_dot_flops_per_s(ThreadPool* pool, ProbeClock clock) {
  if (!isa_supported(Isa::kAvx512Bf16)) return 0.0;
  // 5 M iterations (3.8 G flop per thread): vdpbf16ps issues at a fraction of the FMA rate on
  // some CPUs, and model_bench probes both peaks around every timed figure.
  return chain_peak(pool, clock, detail::avx512bf16_dot_chains, 5000000);
}

double measure_peak_amx_flops_per_s(ThreadPool* pool, ProbeClock clock) {
  if (!gemm_activations_supported(GemmActivations::kAmx)) return 0.0;
  // 1 M iterations of 4 tiles: 65 G flop per thread, about 25 ms at this CPU's rate.
  return chain_peak(pool, clock, detail::amx_dot_chains, 1000000);
}

}  // namespace kun::kernels
