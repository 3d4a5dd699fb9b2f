// AVX-512-BF16 probe: the peak throughput of vdpbf16ps (bf16 pair dot products accumulated in
// f32), for the roofline report. Compiled with -mavx512f -mavx512bf16.
// GCC 12 reports its own _mm512_undefined_* placeholders as uninitialized (false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

#include "kernels/internal.h"

namespace kun::kernels::detail {

double avx512bf16_dot_chains(std::int64_t iters, float seed, float* sink) {
  constexpr int kChains = 12;
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(seed + 0.001f * static_cast<float>(c));
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(-1e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f));
  for (std::int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  }
  __m512 s = acc[0];
  for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
  *sink = _mm512_reduce_add_ps(s);
  // 32 bf16 products and 32 additions per instruction.
  return static_cast<double>(iters) * kChains * 64.0;
}

}  // namespace kun::kernels::detail
