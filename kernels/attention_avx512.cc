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
