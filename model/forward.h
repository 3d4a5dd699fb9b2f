// The Llama-family forward pass over a layer range, with paged KV and attention as a separate
// call (DESIGN.md 3.4/3.5): the linear layers of layer l run where l's weights are; attention runs
// where the sequence's KV for layer l is, which may be another device (remote attention).
//
// Weights live wherever the caller put them (a device arena segment); this module only knows
// their layout inside a segment (LayerSegmentLayout / EmbeddingLayout / HeadLayout) and reads
// them through pointers. It owns no memory but its scratch workspace.
//
// Threading: one ForwardPass per device executor thread; it uses the caller's ThreadPool.
#pragma once

#include <cstdint>
#include <functional>
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
// (kernels::WeightLayout::kPanelPairs: same bytes, same offsets), the rest row-major;
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

// Embedding segment: [V][H]. Head segment: final norm [H] and, unless tied, lm_head [V][H].
struct HeadSegmentLayout {
  std::int64_t final_norm = 0;
  std::int64_t lm_head = -1;  // -1 when tied to the embedding
  std::int64_t total_bytes = 0;
  static HeadSegmentLayout compute(const ModelConfig& config, DType dtype);
};
std::int64_t embedding_segment_bytes(const ModelConfig& config, DType dtype);

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
  const void* embedding = nullptr;  // [V][H]
  const void* final_norm = nullptr;
  kernels::WeightView lm_head;       // points into the embedding when tied
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

class ForwardPass {
 public:
  // kv_dtype: element type of the KV cache attend_local appends to and reads (kBF16: K/V rounded
  // to nearest even when appended; kF32: kept exact, for numerics tests).
  ForwardPass(const ModelConfig& config, std::int64_t kv_block_size, DType kv_dtype, kernels::ThreadPool* pool);

  const ModelConfig& config() const { return config_; }
  std::int64_t kv_block_size() const { return kv_block_size_; }
  DType kv_dtype() const { return kv_dtype_; }
  std::int64_t hidden_size() const { return config_.hidden_size; }
  std::int64_t qkv_row() const { return config_.q_dim() + 2 * config_.kv_dim(); }

  // hidden[t] = embedding[tokens[t]] for n tokens.
  void embed(const HeadWeights& head, const std::int32_t* tokens, std::int64_t n, float* hidden) const;

  // Runs layers [layer_begin, layer_end) over the step's tokens (sequences back to back in
  // `hidden`, [sum num_tokens][H], updated in place). `weights(l)` gives layer l's weights;
  // `attention` computes attention (see AttentionFn).
  void run_layers(std::int64_t layer_begin, std::int64_t layer_end,
                  std::span<const SequenceSlice> slices, float* hidden,
                  const std::function<LayerWeights(std::int64_t)>& weights,
                  const AttentionFn& attention);

  // Local attention over a LayerKv: appends k/v of the slice's tokens and attends.
  void attend_local(const SequenceSlice& slice, const float* qkv, const LayerKv& kv, float* out);

  // logits[r] = lm_head(final_norm(hidden[rows[r]])), [rows.size()][V].
  void logits(const HeadWeights& head, const float* hidden, std::span<const std::int64_t> rows,
              float* logits_out);

  // The three pieces of one layer, public for remote attention and tests.
  void attention_input(const LayerWeights& w, std::span<const SequenceSlice> slices,
                       const float* hidden, std::int64_t num_tokens, float* qkv);
  void attention_output_and_mlp(const LayerWeights& w, const float* attn_out, std::int64_t num_tokens,
                                float* hidden);

 private:
  void ensure_workspace(std::int64_t num_tokens, std::int64_t max_context);

  ModelConfig config_;
  std::int64_t kv_block_size_;
  DType kv_dtype_;
  kernels::ThreadPool* pool_;
  std::vector<float> inv_freq_;
  // Workspace, grown on demand and reused across steps.
  std::vector<float> normed_, qkv_, attn_out_, tmp_hidden_, gate_up_, act_, attn_scratch_;
  std::vector<float> q_gather_;
  std::vector<std::int64_t> attn_positions_;
  std::vector<const void*> key_ptrs_, value_ptrs_;
};

}  // namespace kun::model
