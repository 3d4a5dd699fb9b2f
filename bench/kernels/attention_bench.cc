// attention_bench: decode attention over the paged KV cache, bf16 (the default) against f32, on
// a Llama-3-8B attention shape (32 query heads, 8 kv heads, head_dim 128), one token per call,
// over `layers` distinct caches so the KV streams from memory as in a real decode step. Reports
// the time per layer call for each KV dtype, their ratio, and the KV bytes read per second as a
// fraction of the read bandwidth measured right before and after in the same run (median of 3).
//
// usage: attention_bench [--context N] [--layers L] [--threads T] [--iters I]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "kernels/kernels.h"
#include "kernels/roofline.h"

namespace {

using namespace kun;

struct Cache {
  std::vector<std::byte> memory;
  std::vector<const void*> keys, values;
};

Cache make_cache(std::int64_t ctx, std::int64_t kv_heads, std::int64_t hd, std::int64_t bs, DType dtype,
                 std::uint32_t seed) {
  Cache c;
  const std::int64_t eb = dtype_bytes(dtype);
  const std::int64_t blocks = (ctx + bs - 1) / bs;
  const std::int64_t half = kv_heads * bs * hd * eb;
  c.memory.resize(static_cast<std::size_t>(blocks * 2 * half));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> row(static_cast<std::size_t>(hd));
  for (std::int64_t b = 0; b < blocks; ++b) {
    std::byte* k = c.memory.data() + b * 2 * half;
    c.keys.push_back(k);
    c.values.push_back(k + half);
    for (std::int64_t r = 0; r < 2 * kv_heads * bs; ++r) {
      for (auto& x : row) x = dist(rng);
      kernels::store_kv_row(row.data(), hd, dtype, k + r * hd * eb);
    }
  }
  return c;
}

double median3(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t context = 4096, layers = 8, iters = 5;
  int threads = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const long long v = std::atoll(argv[i + 1]);
    if (a == "--context") context = v;
    else if (a == "--layers") layers = v;
    else if (a == "--threads") threads = static_cast<int>(v);
    else if (a == "--iters") iters = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  constexpr std::int64_t kHeads = 32, kKvHeads = 8, kHd = 128, kBs = 16;
  kernels::ThreadPool pool(threads);
  std::vector<float> q(kHeads * kHd), out(kHeads * kHd);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(static_cast<float>(i));
  std::vector<float> scratch(static_cast<std::size_t>(kernels::paged_kv_cache_scratch_floats(&pool, context, kHeads, kKvHeads)));
  const std::int64_t pos = context - 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHd));

  const double bw_before = kernels::measure_read_bandwidth_bytes_per_s(&pool, std::int64_t{1} << 30);
  std::printf("attention_bench: isa %s, %d threads, context %lld, %lld layers, q heads %lld, kv heads %lld, head_dim %lld\n",
              std::string(kernels::isa_name(kernels::active_isa())).c_str(), threads, static_cast<long long>(context),
              static_cast<long long>(layers), static_cast<long long>(kHeads), static_cast<long long>(kKvHeads),
              static_cast<long long>(kHd));
  double us[2] = {0, 0};
  double kv_bytes[2] = {0, 0};
  const DType dtypes[2] = {DType::kF32, DType::kBF16};
  for (int d = 0; d < 2; ++d) {
    std::vector<Cache> caches;
    for (std::int64_t l = 0; l < layers; ++l) {
      caches.push_back(make_cache(context, kKvHeads, kHd, kBs, dtypes[d], static_cast<std::uint32_t>(l + 1)));
    }
    std::vector<double> reps;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      for (std::int64_t it = 0; it < iters; ++it) {
        for (const Cache& c : caches) {
          const kernels::PagedKvCache kv{c.keys.data(), c.values.data(), dtypes[d], kBs, context, kKvHeads, kHd};
          kernels::paged_attention(q.data(), 1, kHeads, &pos, kv, scale, out.data(), scratch.data(), &pool);
        }
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      reps.push_back(s * 1e6 / static_cast<double>(iters * layers));
    }
    us[d] = median3(reps);
    kv_bytes[d] = static_cast<double>(2 * context * kKvHeads * kHd * dtype_bytes(dtypes[d]));
  }
  const double bw_after = kernels::measure_read_bandwidth_bytes_per_s(&pool, std::int64_t{1} << 30);
  const double bw = std::max(bw_before, bw_after);
  std::printf("read bandwidth: %.1f GB/s before, %.1f GB/s after\n", bw_before / 1e9, bw_after / 1e9);
  for (int d = 0; d < 2; ++d) {
    const double rate = kv_bytes[d] / (us[d] * 1e-6);
    std::printf("kv %-4s: %8.1f us per layer call, KV %.2f MB per call, %.1f GB/s = %.2f of read bandwidth\n",
                std::string(dtype_name(dtypes[d])).c_str(), us[d], kv_bytes[d] / 1e6, rate / 1e9, rate / bw);
  }
  std::printf("bf16 / f32: KV bytes %.2fx, time %.2fx (speedup %.2fx)\n", kv_bytes[1] / kv_bytes[0], us[1] / us[0],
              us[0] / us[1]);
  return 0;
}
