// Portable kernels: the same algorithms with an emulated 8-lane vector of plain floats
// (separate multiply and add, since baseline x86-64 has no FMA). Used when the CPU has no AVX2,
// or when KUN_ISA=scalar.
#include <cmath>
#include <cstdint>
#include <cstring>

#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (baseline SSE)

#include "kernels/internal.h"

namespace kun::kernels::detail {
namespace {

#include "kernels/simd_scalar.inc"

#include "kernels/bf16_dot.inc"

#include "kernels/kernels_impl.inc"

}  // namespace

const IsaKernels& scalar_kernels() {
  static const IsaKernels k{Isa::kScalar,  V::kW,           &linear_block, &linear_panels,
                            &rms_norm_row, &silu_mul,        &add_inplace,  &attention_head,
                            &read_sum,     &fma_chains,     kWidenMinRows, V::kPm, &pack_rows, 1};
  return k;
}

}  // namespace kun::kernels::detail
