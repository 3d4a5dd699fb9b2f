// AVX-512 (F + BW + VL) kernels. Compiled with -mavx512f -mavx512bw -mavx512vl -mf16c -mfma;
// only reached through avx512_kernels() after the runtime check in dispatch.cc.
// GCC 12 reports its own _mm512_undefined_* placeholders as uninitialized (false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <cstring>

#include "kernels/internal.h"

namespace kun::kernels::detail {
namespace {

struct V {
  using F = __m512;
  static constexpr int kW = 16;
  static constexpr int kMr = 6;  // 6 x 4 tile: 24 accumulators + 4 weights + 1 activation
  static constexpr int kNr = 4;
  // kPanelPairs GEMM: widened tiles 6 rows x 4 vectors (64 columns, one panel); direct tiles at
  // most 4 rows (16 accumulators + 8 broadcast activations + 2 weights).
  static constexpr int kPm = 6;
  static constexpr int kPmDirect = 4;
  static constexpr int kPv = 4;

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
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  // Fixed tree: 16 -> 8 (lo + hi halves) -> 4 -> 2 -> 1.
  static float reduce_add(F v) {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 s8 = _mm256_add_ps(lo, hi);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
  }
  // exp(x): round-to-nearest range reduction by ln2 (Cody-Waite), degree-7 Taylor polynomial,
  // scale by 2^n. Relative error about 1e-7 on [-87, 88].
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
  static F widen16(__m256i h, DType dt) {
    if (dt == DType::kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // 16 columns of bf16 pairs (W[n][k], W[n][k+1]): one 64-byte load; the low half of each
  // 32-bit pair is k (shift it up), the high half k + 1 (mask off the low half).
  static void split_pairs(__m512i raw, F* even, F* odd) {
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(-65536)));
  }
  static void load_pairs(const std::uint16_t* p, F* even, F* odd) {
    split_pairs(_mm512_loadu_si512(p), even, odd);
  }
  static void load_pairs_n(const std::uint16_t* p, int n, F* even, F* odd) {
    split_pairs(_mm512_maskz_loadu_epi32(mask(n), p), even, odd);
  }
  template <DType DT>
  static F load_w(const char* base, std::int64_t idx) {
    if constexpr (DT == DType::kF32) {
      return _mm512_loadu_ps(reinterpret_cast<const float*>(base) + idx);
    } else {
      const auto* p = reinterpret_cast<const std::uint16_t*>(base) + idx;
      return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), DT);
    }
  }
  template <DType DT>
  static F load_w_n(const char* base, std::int64_t idx, int n) {
    if constexpr (DT == DType::kF32) {
      return load_n(reinterpret_cast<const float*>(base) + idx, n);
    } else {
      const auto* p = reinterpret_cast<const std::uint16_t*>(base) + idx;
      return widen16(_mm256_maskz_loadu_epi16(mask(n), p), DT);
    }
  }
};

#include "kernels/kernels_impl.inc"

}  // namespace

const IsaKernels& avx512_kernels() {
  static const IsaKernels k{Isa::kAvx512, V::kW,           &linear_block, &linear_panels,
                            &rms_norm_row, &silu_mul,      &add_inplace,  &attention_head,
                            &read_sum,     &fma_chains,     kWidenMinRows, V::kPm, &pack_rows};
  return k;
}

}  // namespace kun::kernels::detail
