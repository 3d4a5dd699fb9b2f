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
  // Panel-layout weights (bf16; kPanelPairs, or kNarrowPanelPairs in the AMX table): rows
  // [0, M) against output columns [kPanelCols p0, kPanelCols p1) of w (panels [p0, p1), or
  // their 4 narrow panels each), into y (stride w.rows). xp: pack_rows' result for these M rows (shared by all
  // threads). scratch: linear_panels_scratch_floats(M) floats, private to the calling thread.
  // bf16_act: activations packed by pack_rows(..., true) (bf16 arithmetic); else f32.
  void (*linear_panels)(const float* xp, std::int64_t M, const WeightView& w, std::int64_t p0,
                        std::int64_t p1, const float* bias, float* y, bool accumulate,
                        float* scratch, bool bf16_act);
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
  // linear_panels' activations: M rows of x ([M][K] f32), rounded to bf16 when bf16_act, packed
  // in this table's layout. The rows are cut into tiles of pack_tile_rows(M) = (M >= widen_min_rows ?
  // tile_rows : direct_tile_rows) rows; pack_rows packs tiles [t0, t1) into xp
  // (pack_rows_floats(M, K) floats in all), so threads can split the packing.
  std::int64_t widen_min_rows;
  std::int64_t tile_rows;
  void (*pack_rows)(const float* x, std::int64_t M, std::int64_t K, float* xp, std::int64_t t0,
                    std::int64_t t1, bool bf16_act);
  std::int64_t direct_tile_rows;
  // The AMX table only (null elsewhere): linear_panels of a [2F][K] gate/up weight (F a multiple
  // of 16) whose epilogue writes silu_mul(gate column c, up column F + c) into out ([M][F], c in
  // units [p0, p1) of kPanelCols gate columns), by the given silu_mul (an IsaKernels::silu_mul).
  void (*linear_panels_silu_mul)(const float* xp, std::int64_t M, const WeightView& w, std::int64_t p0,
                                 std::int64_t p1,
                                 void (*silu_mul)(const float* gate, const float* up, std::int64_t n, float* out),
                                 float* out, float* scratch) = nullptr;
};

// Scratch floats linear_panels needs for M rows (any ISA): a widened k block of a panel plus
// M rows of partial sums.
inline std::int64_t linear_panels_scratch_floats(std::int64_t M) {
  return (128 + M) * kPanelCols;
}
// A thread's scratch of a kPanelPairs call: linear_panels' own, then the gate and the up products
// of one unit of a fused linear_silu_mul (M x kPanelCols floats each, kernels.cc).
inline std::int64_t panel_call_scratch_floats(std::int64_t M) {
  return linear_panels_scratch_floats(M) + 2 * M * kPanelCols;
}

// Floats pack_rows may write for M rows of K: M rounded up to a tile of at most 8 rows, K up to
// even (f32 and vdpbf16ps tables), or bf16 rows of K rounded up to 32, plus 32, in tiles of 16
// rows (AMX).
// bf16 elements per packed row of the AMX table: K rounded up to whole k blocks of 32, plus 32
// (kernels_amx.cc, pack_rows_amx). Even, so a row starts on a whole float of pack_rows' buffer.
constexpr std::int64_t amx_packed_row_elems(std::int64_t K) { return (K + 31) / 32 * 32 + 32; }

inline std::int64_t pack_rows_floats(std::int64_t M, std::int64_t K) {
  const std::int64_t f32_tiles = (M + 8) * (K + 1);
  const std::int64_t amx_tiles = (M + 15) / 16 * 16 * amx_packed_row_elems(K) / 2;
  return f32_tiles > amx_tiles ? f32_tiles : amx_tiles;
}

const IsaKernels& scalar_kernels();
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels();
// AVX-512-BF16 level: the avx512 table with linear_panels / pack_rows on vdpbf16ps for bf16
// activations (same bits as the FMA emulation of every other table; f32 activations take the
// avx512 table's, chosen by the front end); bf16_dot_chains measures the vdpbf16ps peak.
const IsaKernels& avx512bf16_kernels();
double avx512bf16_dot_chains(std::int64_t iters, float seed, float* sink);

// AMX level (kernels_amx.cc): linear_panels (kNarrowPanelPairs weights) / pack_rows of
// GemmActivations::kAmx (bf16 rows padded to tiles of 16, TDPBF16PS), substituted into the
// AVX-512-BF16 table by the front end.
struct AmxGemm {
  decltype(IsaKernels::linear_panels) linear_panels;
  decltype(IsaKernels::pack_rows) pack_rows;
  decltype(IsaKernels::linear_panels_silu_mul) linear_panels_silu_mul;
};
AmxGemm amx_gemm();
// Rows per packing tile of the AMX table.
constexpr std::int64_t kAmxTileRows = 16;
// Runs `iters` iterations of 4 independent TDPBF16PS on register-resident tiles; returns flops.
double amx_dot_chains(std::int64_t iters, float seed, float* sink);
// Asks Linux for the AMX tile data state (arch_prctl ARCH_REQ_XCOMP_PERM); true when granted.
bool amx_request_permission();
// True when the CPU has AMX-TILE and AMX-BF16 and the OS granted the tile state (asked once).
bool amx_available();
// The AVX-512-BF16 table with the AMX GEMM (amx_available() must hold).
const IsaKernels& amx_kernels();

const IsaKernels& kernels_for(Isa isa);
bool isa_supported(Isa isa);

}  // namespace kun::kernels::detail
