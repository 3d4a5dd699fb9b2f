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
#include "kernels/internal.h"

namespace kun::kernels::detail {
namespace {

#include "kernels/simd_avx512.inc"

// The attention kernel's own tuning and KV loads on top of the shared vector operations.
struct AV : V {
  static constexpr int kKeys = 4;
  static constexpr int kVecsPerPass = 4;
  // reduce_add of the kKeys = 4 accumulators together, times scale: each sum goes through exactly
  // reduce_add's tree (16 -> 8: lane i + lane i + 8; 8 -> 4: + 4; 4 -> 2: + 2; 2 -> 1), the four
  // keys side by side in one register, so 8 shuffles and 5 adds replace four horizontal sums of
  // about 8 operations each. Same bits as reduce_add (float addition is commutative).
  static void reduce_keys(const F* a, float scale, float* out) {
    // 16 -> 8: [a0.lo256 | a1.lo256] + [a0.hi256 | a1.hi256], likewise a2, a3.
    const F b01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xee));
    const F b23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xee));
    // 8 -> 4: 128-bit quarters 0 and 2 of b01 / b23 (each key's s8[0:4]) + quarters 1 and 3
    // (s8[4:8]): [a0.s4 | a1.s4 | a2.s4 | a3.s4].
    const F c = _mm512_add_ps(_mm512_shuffle_f32x4(b01, b23, _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(b01, b23, _MM_SHUFFLE(3, 1, 3, 1)));
    // 4 -> 2 and 2 -> 1 inside every 128-bit lane.
    const F d = _mm512_add_ps(c, _mm512_shuffle_ps(c, c, _MM_SHUFFLE(1, 0, 3, 2)));
    const F e = _mm512_add_ps(d, _mm512_shuffle_ps(d, d, _MM_SHUFFLE(2, 3, 0, 1)));
    // Key i's sum is lane 4 i: scaled (one rounding, as sum * scale), gathered into 128 bits.
    const F scaled = _mm512_mul_ps(e, _mm512_set1_ps(scale));
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, scaled)));
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
  static const AttentionKernels k{Isa::kAvx512, &attention_rows_f32, &attention_rows_bf16, &to_bf16_rows};
  return k;
}

}  // namespace kun::kernels::detail
