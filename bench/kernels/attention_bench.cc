// attention_bench: decode attention over the paged KV cache, bf16 (the default) against f32, on
// a Llama-3-8B attention shape (32 query heads, 8 kv heads, head_dim 128), one token per call,
// over `layers` distinct caches so the KV streams from memory as in a real decode step. Reports
// the time per layer call for each KV dtype, their ratio, and the KV bytes read per second as a
// fraction of the read bandwidth measured right before and after in the same run (median of 3).
// Where the CPU has AMX, the bf16 cache again with AMX-tile arithmetic (what a bf16 model's
// attention runs there).
//
// --prefill N instead times the attention of an N-token prefill chunk (llama-350m's shape: 16
// query heads, 8 kv heads, head_dim 64, bf16 cache) on one thread by its thread CPU time, two
// ways in the same run: the whole chunk in one call (tiles of tokens share a pass over the keys)
// and one call per token (each token's own pass, as a decode step does; the same bits); each as
// a fraction of the one-thread FMA peak (thread CPU time) probed before and after (flops: 4 x
// heads x head_dim per attended position), and their ratio. Median of 5. --amx 1: with the AMX
// arithmetic (what a bf16 model's prefill runs where the CPU has AMX) instead of f32.
//
// usage: attention_bench [--context N] [--layers L] [--threads T] [--iters I] [--prefill N] [--amx 0|1]
#include <algorithm>
#include <chrono>
#include <cmath>
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

using namespace kun;

// The blocks of one layer's cache.
struct Cache {
  std::vector<const void*> keys, values;
};

// `layers` caches of ctx tokens, their blocks back to back in one allocation on 2 MiB huge pages
// from a huge-page boundary, as a device arena's KV pages are (memory/huge_pages.h;
// KUN_HUGE_PAGES=0: OS pages), filled from `seed`.
struct Caches {
  std::unique_ptr<std::byte, decltype(&std::free)> memory{nullptr, &std::free};
  std::vector<Cache> layers;
};

Caches make_caches(std::int64_t layers, std::int64_t ctx, std::int64_t kv_heads, std::int64_t hd, std::int64_t bs,
                   DType dtype, std::uint32_t seed) {
  Caches c;
  const std::int64_t eb = dtype_bytes(dtype);
  const std::int64_t blocks = (ctx + bs - 1) / bs;
  const std::int64_t half = kv_heads * bs * hd * eb;
  const std::int64_t bytes = layers * blocks * 2 * half;
  c.memory.reset(memory::allocate_on_huge_pages(bytes));
  if (c.memory == nullptr) {
    std::fprintf(stderr, "attention_bench: cannot allocate %lld bytes\n", static_cast<long long>(bytes));
    std::exit(1);
  }
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> row(static_cast<std::size_t>(hd));
  for (std::int64_t l = 0; l < layers; ++l) {
    Cache& layer = c.layers.emplace_back();
    for (std::int64_t b = 0; b < blocks; ++b) {
      std::byte* k = c.memory.get() + (l * blocks + b) * 2 * half;
      layer.keys.push_back(k);
      layer.values.push_back(k + half);
      for (std::int64_t r = 0; r < 2 * kv_heads * bs; ++r) {
        for (auto& x : row) x = dist(rng);
        kernels::store_kv_row(row.data(), hd, dtype, k + r * hd * eb);
      }
    }
  }
  return c;
}

double median3(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int prefill_bench(std::int64_t tokens, kernels::AttentionArithmetic arithmetic) {
  constexpr std::int64_t kHeads = 16, kKvHeads = 8, kHd = 64, kBs = 16;
  const Caches caches = make_caches(1, tokens, kKvHeads, kHd, kBs, DType::kBF16, 7);
  const Cache& c = caches.layers[0];
  const kernels::PagedKvCache kv{c.keys.data(), c.values.data(), DType::kBF16, kBs, tokens, kKvHeads, kHd};
  std::vector<float> q(static_cast<std::size_t>(tokens * kHeads * kHd));
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.37f * static_cast<float>(i));
  std::vector<float> out(q.size()), out_each(q.size());
  std::vector<std::int64_t> pos(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) pos[static_cast<std::size_t>(t)] = t;
  std::vector<float> scratch(
      static_cast<std::size_t>(kernels::paged_kv_cache_scratch_floats(nullptr, tokens, kHeads, kKvHeads, arithmetic)));
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHd));
  const double flops = 4.0 * kHeads * kHd * static_cast<double>(tokens) * static_cast<double>(tokens + 1) / 2.0;
  const double peak_before = kernels::measure_peak_fma_flops_per_s(kernels::active_isa(), nullptr,
                                                                   kernels::ProbeClock::kThreadCpu);
  std::vector<double> chunk_s, each_s;
  const std::int64_t row = kHeads * kHd;
  for (int rep = 0; rep < 5; ++rep) {
    double t0 = kernels::thread_cpu_seconds();
    kernels::paged_attention(q.data(), tokens, kHeads, pos.data(), kv, scale, out.data(), scratch.data(), nullptr,
                             arithmetic);
    chunk_s.push_back(kernels::thread_cpu_seconds() - t0);
    t0 = kernels::thread_cpu_seconds();
    for (std::int64_t t = 0; t < tokens; ++t) {
      kernels::paged_attention(q.data() + t * row, 1, kHeads, &pos[static_cast<std::size_t>(t)], kv, scale,
                               out_each.data() + t * row, scratch.data(), nullptr, arithmetic);
    }
    each_s.push_back(kernels::thread_cpu_seconds() - t0);
  }
  const double peak_after = kernels::measure_peak_fma_flops_per_s(kernels::active_isa(), nullptr,
                                                                  kernels::ProbeClock::kThreadCpu);
  const double peak = std::max(peak_before, peak_after);
  if (std::memcmp(out.data(), out_each.data(), out.size() * sizeof(float)) != 0) {
    std::fprintf(stderr, "the chunk and the per-token calls differ (batch invariance broken)\n");
    return 1;
  }
  const double chunk = median3(chunk_s), each = median3(each_s);
  std::printf("prefill attention, %lld tokens (16 q heads, 8 kv heads, head_dim 64, bf16 KV), isa %s, arithmetic %s, "
              "1 thread, thread CPU time, FMA peak %.1f / %.1f GFLOP/s (before / after)\n",
              static_cast<long long>(tokens), std::string(kernels::isa_name(kernels::active_isa())).c_str(),
              arithmetic == kernels::AttentionArithmetic::kAmx ? "amx" : "f32", peak_before / 1e9, peak_after / 1e9);
  std::printf("one call (token tiles) : %8.0f us, %.3f of FMA peak\n", chunk * 1e6, flops / chunk / peak);
  std::printf("a call per token       : %8.0f us, %.3f of FMA peak\n", each * 1e6, flops / each / peak);
  std::printf("per-token / one call: %.2fx (same bits)\n", each / chunk);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t context = 4096, layers = 8, iters = 5, prefill = 0, amx = 0;
  int threads = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const long long v = std::atoll(argv[i + 1]);
    if (a == "--context") context = v;
    else if (a == "--layers") layers = v;
    else if (a == "--threads") threads = static_cast<int>(v);
    else if (a == "--iters") iters = v;
    else if (a == "--prefill") prefill = v;
    else if (a == "--amx") amx = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (prefill > 0) {
    if (amx != 0 && !kernels::gemm_activations_supported(kernels::GemmActivations::kAmx)) {
      std::fprintf(stderr, "--amx 1: no AMX-BF16 here\n");
      return 2;
    }
    return prefill_bench(prefill, amx != 0 ? kernels::AttentionArithmetic::kAmx : kernels::AttentionArithmetic::kF32);
  }
  constexpr std::int64_t kHeads = 32, kKvHeads = 8, kHd = 128, kBs = 16;
  kernels::ThreadPool pool(threads);
  std::vector<float> q(kHeads * kHd), out(kHeads * kHd);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(static_cast<float>(i));
  const std::int64_t pos = context - 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHd));

  const double bw_before = kernels::measure_read_bandwidth_bytes_per_s(&pool, std::int64_t{1} << 30);
  std::printf("attention_bench: isa %s, %d threads, context %lld, %lld layers, q heads %lld, kv heads %lld, head_dim %lld\n",
              std::string(kernels::isa_name(kernels::active_isa())).c_str(), threads, static_cast<long long>(context),
              static_cast<long long>(layers), static_cast<long long>(kHeads), static_cast<long long>(kKvHeads),
              static_cast<long long>(kHd));
  // f32 KV and bf16 KV on the f32 arithmetic, and bf16 KV on AMX tiles where this CPU has them
  // (the arithmetic a bf16 model's attention runs here: kernels::attention_arithmetic_for).
  struct Variant {
    DType dtype;
    kernels::AttentionArithmetic arithmetic;
    const char* name;
  };
  std::vector<Variant> variants = {{DType::kF32, kernels::AttentionArithmetic::kF32, "kv f32"},
                                   {DType::kBF16, kernels::AttentionArithmetic::kF32, "kv bf16"}};
  if (kernels::gemm_activations_supported(kernels::GemmActivations::kAmx)) {
    variants.push_back({DType::kBF16, kernels::AttentionArithmetic::kAmx, "kv bf16, amx"});
  }
  std::vector<double> us(variants.size()), kv_bytes(variants.size());
  for (std::size_t d = 0; d < variants.size(); ++d) {
    const Variant& v = variants[d];
    std::vector<float> vscratch(
        static_cast<std::size_t>(kernels::paged_kv_cache_scratch_floats(&pool, context, kHeads, kKvHeads, v.arithmetic)));
    const Caches caches = make_caches(layers, context, kKvHeads, kHd, kBs, v.dtype, 1);
    std::vector<double> reps;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      for (std::int64_t it = 0; it < iters; ++it) {
        for (const Cache& c : caches.layers) {
          const kernels::PagedKvCache kv{c.keys.data(), c.values.data(), v.dtype, kBs, context, kKvHeads, kHd};
          kernels::paged_attention(q.data(), 1, kHeads, &pos, kv, scale, out.data(), vscratch.data(), &pool,
                                   v.arithmetic);
        }
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      reps.push_back(s * 1e6 / static_cast<double>(iters * layers));
    }
    us[d] = median3(reps);
    kv_bytes[d] = static_cast<double>(2 * context * kKvHeads * kHd * dtype_bytes(v.dtype));
  }
  const double bw_after = kernels::measure_read_bandwidth_bytes_per_s(&pool, std::int64_t{1} << 30);
  const double bw = std::max(bw_before, bw_after);
  std::printf("read bandwidth: %.1f GB/s before, %.1f GB/s after\n", bw_before / 1e9, bw_after / 1e9);
  for (std::size_t d = 0; d < variants.size(); ++d) {
    const double rate = kv_bytes[d] / (us[d] * 1e-6);
    std::printf("%-12s: %8.1f us per layer call, KV %.2f MB per call, %.1f GB/s = %.2f of read bandwidth\n",
                variants[d].name, us[d], kv_bytes[d] / 1e6, rate / 1e9, rate / bw);
  }
  std::printf("bf16 / f32: KV bytes %.2fx, time %.2fx (speedup %.2fx)\n", kv_bytes[1] / kv_bytes[0], us[1] / us[0],
              us[0] / us[1]);
  return 0;
}
