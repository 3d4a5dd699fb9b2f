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

#include "kernels/simd_avx2.inc"

#include "kernels/bf16_dot.inc"

#include "kernels/kernels_impl.inc"

}  // namespace

const IsaKernels& avx2_kernels() {
  static const IsaKernels k{Isa::kAvx2,    V::kW,           &linear_block, &linear_panels,
                            &rms_norm_row, &silu_mul,        &add_inplace,  &attention_head,
                            &read_sum,     &fma_chains,     kWidenMinRows, V::kPm, &pack_rows, 1};
  return k;
}

}  // namespace kun::kernels::detail
