// AVX2 + FMA (+ F16C) kernels. Compiled with -mavx2 -mfma -mf16c; only reached through
// avx2_kernels() after the runtime check in dispatch.cc.
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
  using F = __m256;
  static constexpr int kW = 8;
  static constexpr int kMr = 4;  // 4 x 3 tile: 12 accumulators + 3 weights + 1 activation
  static constexpr int kNr = 3;
  // kPanelPairs GEMM: widened tiles 4 rows x 2 vectors (16 columns); direct tiles at most 3
  // rows (6 accumulators + 6 broadcast activations + 2 weights of the 16 registers).
  static constexpr int kPm = 4;
  static constexpr int kPmDirect = 3;
  static constexpr int kPv = 2;

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
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  // Fixed tree: 8 -> 4 (lo + hi halves) -> 2 -> 1.
  static float reduce_add(F v) {
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
  }
  // Same algorithm as the AVX-512 exp; 2^n is built in the exponent field (n in [-126, 127]).
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
  static F widen16(__m128i h, DType dt) {
    if (dt == DType::kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // 8 columns of bf16 pairs (W[n][k], W[n][k+1]) in one 32-byte load: low halves are k, high
  // halves k + 1.
  static void split_pairs(__m256i raw, F* even, F* odd) {
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(-65536)));
  }
  static void load_pairs(const std::uint16_t* p, F* even, F* odd) {
    split_pairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), even, odd);
  }
  static void load_pairs_n(const std::uint16_t* p, int n, F* even, F* odd) {
    split_pairs(_mm256_maskload_epi32(reinterpret_cast<const int*>(p), mask(n)), even, odd);
  }
  template <DType DT>
  static F load_w(const char* base, std::int64_t idx) {
    if constexpr (DT == DType::kF32) {
      return _mm256_loadu_ps(reinterpret_cast<const float*>(base) + idx);
    } else {
      const auto* p = reinterpret_cast<const std::uint16_t*>(base) + idx;
      return widen16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), DT);
    }
  }
  template <DType DT>
  static F load_w_n(const char* base, std::int64_t idx, int n) {
    if constexpr (DT == DType::kF32) {
      return load_n(reinterpret_cast<const float*>(base) + idx, n);
    } else {
      alignas(16) std::uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(buf, reinterpret_cast<const std::uint16_t*>(base) + idx,
                  static_cast<std::size_t>(n) * 2);
      return widen16(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)), DT);
    }
  }
};

#include "kernels/kernels_impl.inc"

}  // namespace

const IsaKernels& avx2_kernels() {
  static const IsaKernels k{Isa::kAvx2,    V::kW,           &linear_block, &linear_panels,
                            &rms_norm_row, &silu_mul,        &add_inplace,  &attention_head,
                            &read_sum,     &fma_chains,     kWidenMinRows, V::kPm, &pack_rows};
  return k;
}

}  // namespace kun::kernels::detail
