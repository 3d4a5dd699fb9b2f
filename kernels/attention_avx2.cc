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

namespace kun::kernels::detail {
namespace {

struct AV {
  using F = __m256;
  static constexpr int kW = 8;
  static constexpr int kKeys = 2;
  static constexpr int kVecsPerPass = 2;
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load_n(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_n(float* p, F v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  // Fixed tree: 8 -> 4 (lo + hi halves) -> 2 -> 1 (as kernels_avx2.cc).
  static float reduce_add(F v) {
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
  }
  // The exp of kernels_avx2.cc; 2^n built in the exponent field (n in [-126, 127]).
  static F exp(F x) {
    x = _mm256_max_ps(x, set1(-87.3f));
    x = _mm256_min_ps(x, set1(88.3f));
    const F n = _mm256_round_ps(_mm256_mul_ps(x, set1(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm256_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    F p = set1(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, set1(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, set1(0.5f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
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
  static const AttentionKernels k{Isa::kAvx2, &attention_heads_f32, &attention_heads_bf16, &to_bf16_rows};
  return k;
}

}  // namespace kun::kernels::detail
