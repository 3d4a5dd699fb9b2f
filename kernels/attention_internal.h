// Internal interface between the paged-attention front end (attention.cc) and its per-ISA bodies
// (attention_scalar.cc, attention_avx2.cc, attention_avx512.cc, all built from attention_impl.inc).
// Same rules as internal.h: each ISA unit has its own -m flags and exposes one table of plain
// function pointers; no std:: templates and no KUN_CHECK inside them.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace kun::kernels::detail {

struct AttentionKernels {
  Isa isa;
  // Attention of one query head over cached positions [0, n_ctx) of kv head `kv_head`; K/V
  // elements are f32 (head_f32) or bf16 (head_bf16), read through kv.key_blocks/value_blocks.
  // For the same widened K/V values both compute the same operation sequence, so a bf16 cache
  // gives bit for bit what an f32 cache holding the bf16-rounded values gives.
  void (*head_f32)(const float* q, const PagedKvCache& kv, std::int64_t kv_head, std::int64_t n_ctx,
                   float scale, float* out, float* scores);
  void (*head_bf16)(const float* q, const PagedKvCache& kv, std::int64_t kv_head, std::int64_t n_ctx,
                    float scale, float* out, float* scores);
  // out[i] = bf16(x[i]), round to nearest even (NaN stays NaN).
  void (*to_bf16)(const float* x, std::int64_t n, std::uint16_t* out);
};

const AttentionKernels& scalar_attention_kernels();
const AttentionKernels& avx2_attention_kernels();
const AttentionKernels& avx512_attention_kernels();

}  // namespace kun::kernels::detail
