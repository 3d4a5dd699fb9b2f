// Internal interface between the ISA-independent front end (kernels.cc, roofline.cc) and the
// per-ISA kernel tables (kernels_scalar.cc, kernels_avx2.cc, kernels_avx512.cc, ...).
//
// Each ISA translation unit is compiled with its own -m flags and exposes only one table of
// plain function pointers, so no inline function or template compiled with wide-vector flags can
// leak into baseline code through the linker (ODR). Those TUs therefore avoid std:: templates and
// KUN_CHECK; argument checks live in the front end.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "kernels/kernels.h"

namespace kun::kernels::detail {

struct IsaKernels {
  Isa isa;
  // Lanes per vector accumulator (defines the reduction order of every dot product).
  int lanes;
  // y[m][n] for m in [m0, m1), n in [n0, n1): y[m*ldy + n] = dot(x[m*ldx ...], W[n]) (+ bias[n]).
  // accumulate: y[...] += value instead of y[...] = value.
  void (*linear_block)(const float* x, std::int64_t ldx, std::int64_t m0, std::int64_t m1,
                       const WeightView& w, std::int64_t n0, std::int64_t n1, const float* bias,
                       float* y, std::int64_t ldy, bool accumulate);
  // kPanelPairs weights (bf16): rows [0, M) of x (stride w.cols) against panels [p0, p1) of w,
  // into y (stride w.rows).
  // xp: pack_rows's result when it returned true (shared by all threads), else null.
  // scratch: linear_panels_scratch_floats(M) floats, private to the calling thread.
  void (*linear_panels)(const float* x, const float* xp, std::int64_t M, const WeightView& w,
                        std::int64_t p0, std::int64_t p1, const float* bias, float* y,
                        bool accumulate, float* scratch);
  void (*rms_norm_row)(const float* x, std::int64_t d, const void* weight, DType weight_dtype,
                       float eps, float* out);
  void (*silu_mul)(const float* gate, const float* up, std::int64_t n, float* out);
  void (*add_inplace)(float* a, const float* b, std::int64_t n);
  // Attention of one query head over cached positions [0, n_ctx) of kv head `kv_head`.
  void (*attention_head)(const float* q, const PagedKvView& kv, std::int64_t kv_head,
                         std::int64_t n_ctx, float scale, float* out, float* scores);
  // Roofline probes. read_sum streams `bytes` (multiple of 64) from p and returns a value that
  // depends on every byte (so the loads are not optimized away).
  float (*read_sum)(const void* p, std::int64_t bytes);
  // Runs `iters` iterations of independent register-resident FMA chains; returns the number of
  // floating-point operations performed (2 per lane per FMA).
  double (*fma_chains)(std::int64_t iters, float seed, float* sink);
  // linear_panels takes its widened path (and needs pack_rows's xp) from this many rows on.
  std::int64_t widen_min_rows;
  // Activation tiles of `tile_rows` rows: packs tiles [t0, t1) of x ([M][K]) into xp
  // (pack_rows_floats(M, K) floats in all) for linear_panels' widened path.
  std::int64_t tile_rows;
  void (*pack_rows)(const float* x, std::int64_t M, std::int64_t K, float* xp, std::int64_t t0,
                    std::int64_t t1);
};

// Scratch floats linear_panels needs for M rows (any ISA): a widened k block of a panel plus
// M rows of partial sums.
inline std::int64_t linear_panels_scratch_floats(std::int64_t M) {
  return (128 + M) * kPanelCols;
}

// Floats pack_rows may write for M rows of K (M rounded up to a tile of at most 8 rows).
inline std::int64_t pack_rows_floats(std::int64_t M, std::int64_t K) { return (M + 8) * K; }

const IsaKernels& scalar_kernels();
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels();
// AVX-512-BF16 level: the avx512 table (linear keeps exact f32 activations and f32 FMA
// accumulation, so vdpbf16ps is not used there); bf16_dot_chains measures the vdpbf16ps peak.
double avx512bf16_dot_chains(std::int64_t iters, float seed, float* sink);

const IsaKernels& kernels_for(Isa isa);
bool isa_supported(Isa isa);

}  // namespace kun::kernels::detail
