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

#include "kernels/simd_avx512.inc"

#include "kernels/bf16_dot.inc"

#include "kernels/kernels_impl.inc"

}  // namespace

const IsaKernels& avx512_kernels() {
  static const IsaKernels k{Isa::kAvx512, V::kW,           &linear_block, &linear_panels,
                            &rms_norm_row, &silu_mul,      &add_inplace,  &attention_head,
                            &read_sum,     &fma_chains,     kWidenMinRows, V::kPm, &pack_rows, 1};
  return k;
}

}  // namespace kun::kernels::detail
