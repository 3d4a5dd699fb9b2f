// Internal interface between the paged-attention front end (attention.cc) and its per-ISA bodies
// (attention_scalar.cc, attention_avx2.cc, attention_avx512.cc, all built from attention_impl.inc).
// Same rules as internal.h: each ISA unit has its own -m flags and exposes one table of plain
// function pointers; no std:: templates and no KUN_CHECK inside them.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace kun::kernels::detail {

// Query rows computed together per kv head (the register blocking of attention_impl.inc): the
// heads of a GQA group and, when a call holds several tokens of the sequence (a prefill), as many
// consecutive tokens as fit.
inline constexpr int kMaxRows = 4;
// The most query rows of one call of any table (AttentionKernels::max_rows: the AMX table's);
// paged_kv_cache_scratch_floats gives a thread's scratch a score row per query row of its table.
inline constexpr int kMaxTableRows = 16;

struct AttentionKernels {
  Isa isa;
  // Query rows per call (kMaxRows; the AMX table 16: its tiles hold 16 q rows).
  int max_rows;
  // Attention of `rows` (1..max_rows) query rows (token, head) sharing kv head `kv_head`: row r
  // reads q[r] (head_dim floats), attends cached positions [0, n_ctx[r]) and writes out[r];
  // scores has rows x score_stride floats (score_stride >= every n_ctx). K/V elements are f32
  // (rows_f32) or bf16 (rows_bf16); each K/V row is loaded once for all the rows that attend it.
  // For the same widened K/V values both compute the same operation sequence per row, whatever
  // the other rows, so a bf16 cache gives bit for bit what an f32 cache holding the
  // bf16-rounded values gives.
  void (*rows_f32)(const float* const* q, float* const* out, const std::int64_t* n_ctx, int rows,
                   const PagedKvCache& kv, std::int64_t kv_head, float scale, float* scores,
                   std::int64_t score_stride);
  void (*rows_bf16)(const float* const* q, float* const* out, const std::int64_t* n_ctx, int rows,
                    const PagedKvCache& kv, std::int64_t kv_head, float scale, float* scores,
                    std::int64_t score_stride);
  // out[i] = bf16(x[i]), round to nearest even (NaN stays NaN).
  void (*to_bf16)(const float* x, std::int64_t n, std::uint16_t* out);
};

const AttentionKernels& scalar_attention_kernels();
const AttentionKernels& avx2_attention_kernels();
const AttentionKernels& avx512_attention_kernels();
// The AVX-512 table with a bf16 cache's scores and weighted V on AMX tiles (AttentionArithmetic::kAmx).
const AttentionKernels& amx_attention_kernels();

}  // namespace kun::kernels::detail
