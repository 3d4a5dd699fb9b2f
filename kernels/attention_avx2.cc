// Paged attention (f32 / bf16 KV) for AVX2 + FMA. Compiled with the same flags as
// kernels_avx2.cc; only reached through avx2_attention_kernels() after the runtime check.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <cstring>

#include "kernels/attention_internal.h"
#include "kernels/internal.h"

namespace kun::kernels::detail {
namespace {

#include "kernels/simd_avx2.inc"

// The attention kernel's own tuning and KV loads on top of the shared vector operations.
struct AV : V {
  static constexpr int kKeys = 2;
  static constexpr int kVecsPerPass = 2;
  // reduce_add of kKeys accumulators (one call per key here), times scale.
  static void reduce_keys(const F* a, float scale, float* out) {
    for (int i = 0; i < kKeys; ++i) out[i] = reduce_add(a[i]) * scale;
  }
  static F widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static F load_kv(const float* p) { return load(p); }
  static F load_kv_n(const float* p, int n) { return load_n(p, n); }
  static F load_kv(const std::uint16_t* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load_kv_n(const std::uint16_t* p, int n) {
    alignas(16) std::uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, static_cast<std::size_t>(n) * 2);
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
};

#include "kernels/attention_impl.inc"

}  // namespace

const AttentionKernels& avx2_attention_kernels() {
  static const AttentionKernels k{Isa::kAvx2, kMaxRows, &attention_rows_f32, &attention_rows_bf16, &to_bf16_rows};
  return k;
}

}  // namespace kun::kernels::detail
