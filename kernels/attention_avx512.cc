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

#include "kernels/attention_avx512_traits.inc"

#include "kernels/attention_impl.inc"

}  // namespace

const AttentionKernels& avx512_attention_kernels() {
  static const AttentionKernels k{Isa::kAvx512, kMaxRows, &attention_rows_f32, &attention_rows_bf16, &to_bf16_rows};
  return k;
}

}  // namespace kun::kernels::detail
