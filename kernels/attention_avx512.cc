// Paged attention (f32 / bf16 KV) for AVX-512 (F + BW + VL). Compiled with the same flags as
// kernels_avx512.cc; only reached through avx512_attention_kernels() after the runtime check.
// GCC 12 reports its own _mm512_undefined_* placeholders as uninitialized (false positive).
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
  using F = __m512;
  static constexpr int kW = 16;
  static constexpr int kKeys = 4;
  static constexpr int kVecsPerPass = 4;
  static __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_n(float* p, F v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  // Fixed tree: 16 -> 8 (lo + hi halves) -> 4 -> 2 -> 1 (as kernels_avx512.cc).
  static float reduce_add(F v) {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 s8 = _mm256_add_ps(lo, hi);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
  }
  // The exp of kernels_avx512.cc: Cody-Waite reduction by ln2, degree-7 Taylor, scale by 2^n.
  static F exp(F x) {
    x = _mm512_max_ps(x, set1(-87.3f));
    x = _mm512_min_ps(x, set1(88.3f));
    const F n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    F p = set1(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, set1(0.5f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f));
    return _mm512_scalef_ps(p, n);
  }
  static F widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static F load_kv(const float* p) { return load(p); }
  static F load_kv_n(const float* p, int n) { return load_n(p, n); }
  static F load_kv(const std::uint16_t* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load_kv_n(const std::uint16_t* p, int n) { return widen(_mm256_maskz_loadu_epi16(mask(n), p)); }
};

#include "kernels/attention_impl.inc"

}  // namespace

const AttentionKernels& avx512_attention_kernels() {
  static const AttentionKernels k{Isa::kAvx512, &attention_heads_f32, &attention_heads_bf16, &to_bf16_rows};
  return k;
}

}  // namespace kun::kernels::detail
