// Internal interface between the paged-attention front end (attention.cc) and its per-ISA bodies
// (attention_scalar.cc, attention_avx2.cc, attention_avx512.cc, all built from attention_impl.inc).
// Same rules as internal.h: each ISA unit has its own -m flags and exposes one table of plain
// function pointers; no std:: templates and no KUN_CHECK inside them.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace kun::kernels::detail {

// Query heads computed together per kv head (the register blocking of attention_impl.inc).
inline constexpr int kMaxGroupHeads = 4;

struct AttentionKernels {
  Isa isa;
  // Attention of `num_heads` (1..kMaxGroupHeads) consecutive query heads sharing kv head
  // `kv_head` (a GQA group, or part of one) over cached positions [0, n_ctx): q and out hold the
  // heads head_dim floats apart, scores has num_heads * n_ctx floats. K/V elements are f32
  // (heads_f32) or bf16 (heads_bf16); each K/V row is loaded once for all the heads. For the same
  // widened K/V values both compute the same operation sequence per head, whatever num_heads, so
  // a bf16 cache gives bit for bit what an f32 cache holding the bf16-rounded values gives.
  void (*heads_f32)(const float* q, int num_heads, const PagedKvCache& kv, std::int64_t kv_head,
                    std::int64_t n_ctx, float scale, float* out, float* scores);
  void (*heads_bf16)(const float* q, int num_heads, const PagedKvCache& kv, std::int64_t kv_head,
                     std::int64_t n_ctx, float scale, float* out, float* scores);
  // out[i] = bf16(x[i]), round to nearest even (NaN stays NaN).
  void (*to_bf16)(const float* x, std::int64_t n, std::uint16_t* out);
};

const AttentionKernels& scalar_attention_kernels();
const AttentionKernels& avx2_attention_kernels();
const AttentionKernels& avx512_attention_kernels();

}  // namespace kun::kernels::detail
