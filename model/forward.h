// The Llama-family forward pass over a layer range, with paged KV and attention as a separate
// call (DESIGN.md 3.4/3.5): the linear layers of layer l run where l's weights are; attention runs
// where the sequence's KV for layer l is, which may be another device (remote attention).
//
// Weights live wherever the caller put them (a device arena segment); this module only knows
// their layout inside a segment (LayerSegmentLayout / EmbeddingLayout / HeadLayout) and reads
// them through pointers. Its activations and scratch, the GEMM's included (kernels::LinearScratch),
// live in a workspace sized once for ForwardLimits (forward_workspace_bytes) and handed to it: a
// device carves it from its arena, so it counts in the device's capacity
// (runtime/virtual_device.h); nothing on the forward path allocates. A call beyond the limits is a broken invariant (the caller checks its input first).
//
// Threading: one ForwardPass per device executor thread; it uses the caller's ThreadPool.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "kernels/kernels.h"
#include "model/config.h"
#include "model/weight_source.h"

namespace kun::model {

// Byte offsets of one decoder layer's tensors inside its parameter segment. q, k and v rows are
// stored back to back (one fused QKV matrix), and so are gate and up. Shapes are [rows][cols] of
// the HF matrices; bf16 matrices with an even cols are stored reordered into the GEMM layout
// (kernels::gemm_weight_layout: kPanelPairs, or kNarrowPanelPairs for the AMX GEMM; same bytes,
// same offsets), the rest row-major;
// layer_weights_at / head_weights_at say which in each WeightView.
struct LayerSegmentLayout {
  std::int64_t input_norm = 0;  // [H] weight dtype
  std::int64_t qkv = 0;         // [q_dim + 2 kv_dim][H]
  std::int64_t qkv_bias = -1;   // [q_dim + 2 kv_dim] f32, -1 without attention bias
  std::int64_t o = 0;           // [H][q_dim]
  std::int64_t post_norm = 0;   // [H]
  std::int64_t gate_up = 0;     // [2F][H]
  std::int64_t down = 0;        // [H][F]
  std::int64_t total_bytes = 0;
  static LayerSegmentLayout compute(const ModelConfig& config, DType dtype);
};

// Embedding segment: [V][H], row-major, or, when tied to the LM head (tie_word_embeddings), in the
// head's layout (a panel layout for bf16 with an even H: same bytes; embedding_layout), so the one
// copy serves both the token lookup (a row gathered out of the panels) and the logits GEMM.
// Head segment: final norm [H] and, unless tied, lm_head [V][H].
struct HeadSegmentLayout {
  std::int64_t final_norm = 0;
  std::int64_t lm_head = -1;  // -1 when tied to the embedding
  std::int64_t total_bytes = 0;
  static HeadSegmentLayout compute(const ModelConfig& config, DType dtype);
};
std::int64_t embedding_segment_bytes(const ModelConfig& config, DType dtype);
kernels::WeightLayout embedding_layout(const ModelConfig& config, DType dtype);

// Fills a segment from a weight source (converting to `dtype`).
Status load_layer_segment(const WeightSource& source, std::int64_t layer, DType dtype,
                          std::span<std::byte> segment);
Status load_embedding_segment(const WeightSource& source, DType dtype, std::span<std::byte> segment);
Status load_head_segment(const WeightSource& source, DType dtype, std::span<std::byte> segment);

struct LayerWeights {
  const void* input_norm = nullptr;
  kernels::WeightView qkv;
  const float* qkv_bias = nullptr;
  kernels::WeightView o;
  const void* post_norm = nullptr;
  kernels::WeightView gate_up;
  kernels::WeightView down;
  DType dtype = DType::kF32;
};
LayerWeights layer_weights_at(const std::byte* segment, const ModelConfig& config, DType dtype);

struct HeadWeights {
  kernels::WeightView embedding;     // [V][H] in embedding_layout
  const void* final_norm = nullptr;
  kernels::WeightView lm_head;       // the embedding's view when tied
  DType dtype = DType::kF32;
};
HeadWeights head_weights_at(const std::byte* embedding_segment, const std::byte* head_segment,
                            const ModelConfig& config, DType dtype);

// One sequence's share of a step: tokens [start_pos, start_pos + num_tokens).
struct SequenceSlice {
  std::int64_t start_pos = 0;
  std::int64_t num_tokens = 0;
};

// A sequence's KV blocks for one layer: layer blocks as laid out by kv/ (K then V, each
// [kv_heads][block_size][head_dim] elements of the ForwardPass's kv_dtype), covering at least
// start_pos + num_tokens tokens.
struct LayerKv {
  std::byte* const* blocks = nullptr;
  std::int64_t num_blocks = 0;
};

// Computes attention of sequence `seq` of the step at layer `layer`: appends the k/v rows of
// `qkv` (num_tokens rows of [q | k | v], RoPE applied) to the sequence's cache and writes
// [num_tokens][q_dim] into `out`. The default runs locally on a LayerKv; the runtime plugs in a
// version that ships q/k/v to the device holding the KV (remote attention).
using AttentionFn = std::function<void(std::int64_t layer, std::int64_t seq, const SequenceSlice& slice,
                                       const float* qkv, float* out)>;
// Where sequence `seq`'s KV of layer `layer` is: true, with *kv set, when it is in this device's
// blocks (run_layers then attends all such sequences of a layer in one kernel call), false when
// another device holds it (AttentionFn is called for it).
using LocalKvFn = std::function<bool(std::int64_t layer, std::int64_t seq, LayerKv* kv)>;

// The largest calls a ForwardPass's workspace is sized for.
struct ForwardLimits {
  std::int64_t max_tokens = 0;          // tokens of one run_layers / attention_input / attend_local call
  std::int64_t max_logit_rows = 0;      // rows of lm_head done in one pass (logits() takes more, in passes)
  std::int64_t max_context_tokens = 0;  // longest context attend_local attends over
  // Only attend_local is called (remote attention served for another device): no layer buffers.
  bool attention_only = false;
};

// Whether the MLP's gate/up product runs with silu_mul in its epilogue
// (kernels::linear_silu_mul_fuses) for layer weights of `weight_dtype` loaded by this process
// (linear_layout, the process's GEMM activations): the workspace then holds no [tokens][2F]
// product buffer (for llama-350m at 512 tokens, 11.5 MB of device memory; Llama-3-8B at 2048,
// 235 MB).
bool mlp_gate_up_fused(const ModelConfig& config, DType weight_dtype);

// Bytes of the workspace a ForwardPass needs for `limits` with a pool of `num_threads` threads
// (every buffer 64-byte aligned inside it), for layer weights of `weight_dtype`
// (mlp_gate_up_fused). attention_arithmetic: the pass's (it sets the attention scratch).
std::int64_t forward_workspace_bytes(const ModelConfig& config, DType weight_dtype, const ForwardLimits& limits,
                                     int num_threads, kernels::AttentionArithmetic attention_arithmetic);

class ForwardPass {
 public:
  // kv_dtype: element type of the KV cache attend_local appends to and reads (kBF16: K/V rounded
  // to nearest even when appended; kF32: kept exact, for numerics tests). attention_arithmetic:
  // how attention computes (kernels::attention_arithmetic_for(the weights' dtype) gives the model
  // its GEMM's precision: AMX tiles where the GEMM runs on AMX). weight_dtype: the dtype of the
  // layer weights it will be handed (layer_weights_at's; the MLP's buffers depend on it).
  // `workspace` (at least forward_workspace_bytes(config, weight_dtype, limits, pool threads,
  // attention_arithmetic), 64-byte aligned) is the caller's and must outlive the pass; every
  // buffer of the forward path is carved from it here.
  ForwardPass(const ModelConfig& config, DType weight_dtype, std::int64_t kv_block_size, DType kv_dtype,
              kernels::AttentionArithmetic attention_arithmetic,
              kernels::ThreadPool* pool, const ForwardLimits& limits, std::span<std::byte> workspace);
  // The same with the workspace on the heap, allocated once here (tools and tests with no device).
  ForwardPass(const ModelConfig& config, DType weight_dtype, std::int64_t kv_block_size, DType kv_dtype,
              kernels::AttentionArithmetic attention_arithmetic,
              kernels::ThreadPool* pool, const ForwardLimits& limits);
  ForwardPass(const ForwardPass&) = delete;
  ForwardPass& operator=(const ForwardPass&) = delete;

  const ForwardLimits& limits() const { return limits_; }
  std::int64_t workspace_bytes() const { return workspace_bytes_; }

  const ModelConfig& config() const { return config_; }
  std::int64_t kv_block_size() const { return kv_block_size_; }
  DType kv_dtype() const { return kv_dtype_; }
  std::int64_t hidden_size() const { return config_.hidden_size; }
  std::int64_t qkv_row() const { return config_.q_dim() + 2 * config_.kv_dim(); }

  // hidden[t] = embedding[tokens[t]] for n tokens.
  void embed(const HeadWeights& head, const std::int32_t* tokens, std::int64_t n, float* hidden) const;

  // Runs layers [layer_begin, layer_end) over the step's tokens (sequences back to back in
  // `hidden`, [sum num_tokens][H], updated in place). `weights(l)` gives layer l's weights.
  // Attention of each sequence with tokens: with `local_kv`, the sequences whose KV it finds here
  // are attended together, one kernels::paged_attention_batch call per layer that deals them to
  // the pool's threads, the others through `attention`; without it, all through `attention` (see
  // AttentionFn). Either way the same values.
  void run_layers(std::int64_t layer_begin, std::int64_t layer_end,
                  std::span<const SequenceSlice> slices, float* hidden,
                  const std::function<LayerWeights(std::int64_t)>& weights,
                  const AttentionFn& attention, const LocalKvFn& local_kv = nullptr);

  // Local attention over a LayerKv: appends k/v of the slice's tokens and attends (the bits a
  // sequence gets here are the ones run_layers' batched attention gives it).
  void attend_local(const SequenceSlice& slice, const float* qkv, const LayerKv& kv, float* out);

  // logits[r] = lm_head(final_norm(hidden[rows[r]])), [rows.size()][V], in passes of at most
  // max(max_tokens, max_logit_rows) rows (the kernels are batch-invariant: same values).
  void logits(const HeadWeights& head, const float* hidden, std::span<const std::int64_t> rows,
              float* logits_out);

  // The three pieces of one layer, public for remote attention and tests.
  void attention_input(const LayerWeights& w, std::span<const SequenceSlice> slices,
                       const float* hidden, std::int64_t num_tokens, float* qkv);
  void attention_output_and_mlp(const LayerWeights& w, const float* attn_out, std::int64_t num_tokens,
                                float* hidden);

 private:
  void carve(std::span<std::byte> workspace);
  void check_tokens(std::int64_t num_tokens, const char* what) const;
  // Checks a slice with tokens against the limits and its blocks, appends its k/v (rounded to
  // the cache's dtype) and returns its entry for kernels::paged_attention_batch: q read in place
  // from the [q | k | v] rows, K then V in each block.
  kernels::AttentionSequence append_kv(const SequenceSlice& slice, const float* qkv, const LayerKv& kv, float* out);
  // The k/v of tokens [t0, t1) of an append_kv entry (its [q | k | v] rows, its cache geometry)
  // into their slots of the blocks of kv.
  void append_kv_rows(const kernels::AttentionSequence& a, const LayerKv& kv, std::int64_t t0, std::int64_t t1) const;
  float attention_scale() const { return 1.0f / std::sqrt(static_cast<float>(config_.head_dim)); }

  ModelConfig config_;
  DType weight_dtype_;
  std::int64_t kv_block_size_;
  DType kv_dtype_;
  kernels::AttentionArithmetic attention_arithmetic_;
  kernels::ThreadPool* pool_;
  ForwardLimits limits_;
  std::int64_t workspace_bytes_ = 0;
  std::vector<float> inv_freq_;
  std::unique_ptr<std::byte[]> owned_workspace_;  // the heap constructor's only
  // Views into the workspace, fixed at construction.
  // gate_up_ is empty where mlp_gate_up_fused (the GEMM's epilogue applies silu_mul).
  std::span<float> normed_, qkv_, attn_out_, gate_up_, act_, attn_scratch_;
  std::span<std::int64_t> attn_positions_;
  // RoPE's cos and sin (kernels::rope_cos_sin) for the positions in rope_positions_'s first
  // rope_rows_ entries: computed by the first layer of a step, reused by the others while the
  // rows' positions stay the same (-1: none yet).
  std::span<std::int64_t> rope_positions_;
  std::span<float> rope_cos_sin_;
  std::int64_t rope_rows_ = -1;
  // run_layers' local sequences of a layer (each has a token: at most max_tokens), rebuilt per layer.
  std::span<kernels::AttentionSequence> attn_batch_;
  kernels::LinearScratch gemm_scratch_;  // handed to every linear call
};

}  // namespace kun::model
