#include "model/forward.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "common/check.h"
#include "common/units.h"

namespace kun::model {
namespace {

constexpr std::int64_t kTensorAlignBytes = 64;

// Appends a tensor of `bytes` to a layout cursor, returning its offset.
std::int64_t place(std::int64_t* cursor, std::int64_t bytes) {
  const std::int64_t offset = round_up(*cursor, kTensorAlignBytes);
  *cursor = offset + bytes;
  return offset;
}

Status read_into(const WeightSource& source, const std::string& name, DType dtype,
                 std::span<std::byte> segment, std::int64_t offset, std::int64_t bytes) {
  KUN_CHECK_LE(offset + bytes, static_cast<std::int64_t>(segment.size())) << name;
  return source.read_tensor(name, dtype, segment.data() + offset, bytes);
}

// The layout a linear weight of this shape is kept in: bf16 matrices with an even K are
// reordered at load into the layout this process's GEMM reads (kernels::gemm_weight_layout:
// kPanelPairs, or kNarrowPanelPairs for AMX; same bytes), the rest stay row-major. A function of
// the shape, the dtype and the process's GEMM activations, which every process of a cluster
// shares (README), so every device (and a segment copied between them) agrees on it.
kernels::WeightLayout linear_layout(DType dtype, std::int64_t rows, std::int64_t cols) {
  // An even K only: the packed matrix then has the row-major byte count, so segment offsets do
  // not depend on the layout (an odd K would need kernels::panel_pairs_bytes).
  return kernels::panel_pairs_supported(dtype, rows, cols) && cols % 2 == 0
             ? kernels::gemm_weight_layout(kernels::active_gemm_activations())
             : kernels::WeightLayout::kRowMajor;
}

}  // namespace

bool mlp_gate_up_fused(const ModelConfig& c, DType weight_dtype) {
  const std::int64_t rows = 2 * c.intermediate_size;
  const kernels::WeightView gate_up{nullptr, weight_dtype, rows, c.hidden_size,
                                    linear_layout(weight_dtype, rows, c.hidden_size)};
  return kernels::linear_silu_mul_fuses(gate_up, kernels::active_gemm_activations());
}

namespace {

// Reorders a row-major matrix just read into the segment into linear_layout's layout, in place,
// kPanelCols rows at a time: with an even K, those rows' bytes hold exactly their panels (one of
// kPanelPairs, four of kNarrowPanelPairs), laid out as the panels of a matrix of those rows, so
// only these rows are copied aside (not the whole matrix: a tied embedding can be hundreds of MB).
void to_linear_layout(DType dtype, std::int64_t rows, std::int64_t cols, std::span<std::byte> segment,
                      std::int64_t offset) {
  const kernels::WeightLayout layout = linear_layout(dtype, rows, cols);
  if (!kernels::is_panel_layout(layout)) return;
  const std::int64_t row_bytes = cols * dtype_bytes(dtype);
  KUN_CHECK_LE(offset + rows * row_bytes, static_cast<std::int64_t>(segment.size()));
  std::vector<std::byte> panel_rows(static_cast<std::size_t>(kernels::kPanelCols * row_bytes));
  for (std::int64_t r0 = 0; r0 < rows; r0 += kernels::kPanelCols) {
    const std::int64_t width = std::min(kernels::kPanelCols, rows - r0);
    std::byte* at = segment.data() + offset + r0 * row_bytes;
    std::memcpy(panel_rows.data(), at, static_cast<std::size_t>(width * row_bytes));
    kernels::pack_panel_pairs(panel_rows.data(), width, cols, at, layout);
  }
}

}  // namespace

kernels::WeightLayout embedding_layout(const ModelConfig& c, DType dtype) {
  return c.tie_word_embeddings ? linear_layout(dtype, c.vocab_size, c.hidden_size) : kernels::WeightLayout::kRowMajor;
}

LayerSegmentLayout LayerSegmentLayout::compute(const ModelConfig& c, DType dtype) {
  const std::int64_t db = dtype_bytes(dtype);
  const std::int64_t qkv_rows = c.q_dim() + 2 * c.kv_dim();
  LayerSegmentLayout l;
  std::int64_t cursor = 0;
  l.input_norm = place(&cursor, c.hidden_size * db);
  l.qkv = place(&cursor, qkv_rows * c.hidden_size * db);
  if (c.attention_bias) l.qkv_bias = place(&cursor, qkv_rows * 4);
  l.o = place(&cursor, c.hidden_size * c.q_dim() * db);
  l.post_norm = place(&cursor, c.hidden_size * db);
  l.gate_up = place(&cursor, 2 * c.intermediate_size * c.hidden_size * db);
  l.down = place(&cursor, c.hidden_size * c.intermediate_size * db);
  l.total_bytes = round_up(cursor, kTensorAlignBytes);
  return l;
}

HeadSegmentLayout HeadSegmentLayout::compute(const ModelConfig& c, DType dtype) {
  const std::int64_t db = dtype_bytes(dtype);
  HeadSegmentLayout l;
  std::int64_t cursor = 0;
  l.final_norm = place(&cursor, c.hidden_size * db);
  if (!c.tie_word_embeddings) l.lm_head = place(&cursor, c.vocab_size * c.hidden_size * db);
  l.total_bytes = round_up(cursor, kTensorAlignBytes);
  return l;
}

std::int64_t embedding_segment_bytes(const ModelConfig& c, DType dtype) {
  return round_up(c.vocab_size * c.hidden_size * dtype_bytes(dtype), kTensorAlignBytes);
}

Status load_layer_segment(const WeightSource& source, std::int64_t layer, DType dtype,
                          std::span<std::byte> segment) {
  const ModelConfig& c = source.config();
  const LayerSegmentLayout l = LayerSegmentLayout::compute(c, dtype);
  if (static_cast<std::int64_t>(segment.size()) < l.total_bytes) {
    return invalid_argument("layer segment too small: " + std::to_string(segment.size()) + " < " +
                            std::to_string(l.total_bytes));
  }
  const std::int64_t db = dtype_bytes(dtype);
  const std::int64_t H = c.hidden_size;
  const std::int64_t q = c.q_dim();
  const std::int64_t kv = c.kv_dim();
  const std::int64_t F = c.intermediate_size;
  auto name = [&](const char* suffix) { return layer_tensor_name(layer, suffix); };
  KUN_RETURN_IF_ERROR(read_into(source, name("input_layernorm.weight"), dtype, segment, l.input_norm, H * db));
  KUN_RETURN_IF_ERROR(read_into(source, name("self_attn.q_proj.weight"), dtype, segment, l.qkv, q * H * db));
  KUN_RETURN_IF_ERROR(read_into(source, name("self_attn.k_proj.weight"), dtype, segment,
                                l.qkv + q * H * db, kv * H * db));
  KUN_RETURN_IF_ERROR(read_into(source, name("self_attn.v_proj.weight"), dtype, segment,
                                l.qkv + (q + kv) * H * db, kv * H * db));
  if (l.qkv_bias >= 0) {
    KUN_RETURN_IF_ERROR(read_into(source, name("self_attn.q_proj.bias"), DType::kF32, segment, l.qkv_bias, q * 4));
    KUN_RETURN_IF_ERROR(read_into(source, name("self_attn.k_proj.bias"), DType::kF32, segment,
                                  l.qkv_bias + q * 4, kv * 4));
    KUN_RETURN_IF_ERROR(read_into(source, name("self_attn.v_proj.bias"), DType::kF32, segment,
                                  l.qkv_bias + (q + kv) * 4, kv * 4));
  }
  KUN_RETURN_IF_ERROR(read_into(source, name("self_attn.o_proj.weight"), dtype, segment, l.o, H * q * db));
  KUN_RETURN_IF_ERROR(read_into(source, name("post_attention_layernorm.weight"), dtype, segment, l.post_norm, H * db));
  KUN_RETURN_IF_ERROR(read_into(source, name("mlp.gate_proj.weight"), dtype, segment, l.gate_up, F * H * db));
  KUN_RETURN_IF_ERROR(read_into(source, name("mlp.up_proj.weight"), dtype, segment,
                                l.gate_up + F * H * db, F * H * db));
  KUN_RETURN_IF_ERROR(read_into(source, name("mlp.down_proj.weight"), dtype, segment, l.down, H * F * db));
  to_linear_layout(dtype, q + 2 * kv, H, segment, l.qkv);
  to_linear_layout(dtype, H, q, segment, l.o);
  to_linear_layout(dtype, 2 * F, H, segment, l.gate_up);
  to_linear_layout(dtype, H, F, segment, l.down);
  return ok_status();
}

Status load_embedding_segment(const WeightSource& source, DType dtype, std::span<std::byte> segment) {
  const ModelConfig& c = source.config();
  KUN_RETURN_IF_ERROR(read_into(source, "model.embed_tokens.weight", dtype, segment, 0,
                                c.vocab_size * c.hidden_size * dtype_bytes(dtype)));
  // A tied embedding is also the LM head: kept once, in the head's GEMM layout (embed() reads a
  // row out of it).
  if (kernels::is_panel_layout(embedding_layout(c, dtype))) {
    to_linear_layout(dtype, c.vocab_size, c.hidden_size, segment, 0);
  }
  return ok_status();
}

Status load_head_segment(const WeightSource& source, DType dtype, std::span<std::byte> segment) {
  const ModelConfig& c = source.config();
  const HeadSegmentLayout l = HeadSegmentLayout::compute(c, dtype);
  const std::int64_t db = dtype_bytes(dtype);
  KUN_RETURN_IF_ERROR(read_into(source, "model.norm.weight", dtype, segment, l.final_norm, c.hidden_size * db));
  if (l.lm_head >= 0) {
    KUN_RETURN_IF_ERROR(read_into(source, "lm_head.weight", dtype, segment, l.lm_head,
                                  c.vocab_size * c.hidden_size * db));
    to_linear_layout(dtype, c.vocab_size, c.hidden_size, segment, l.lm_head);
  }
  return ok_status();
}

LayerWeights layer_weights_at(const std::byte* seg, const ModelConfig& c, DType dtype) {
  const LayerSegmentLayout l = LayerSegmentLayout::compute(c, dtype);
  LayerWeights w;
  w.dtype = dtype;
  w.input_norm = seg + l.input_norm;
  const auto view = [dtype](const std::byte* p, std::int64_t rows, std::int64_t cols) {
    return kernels::WeightView{p, dtype, rows, cols, linear_layout(dtype, rows, cols)};
  };
  w.qkv = view(seg + l.qkv, c.q_dim() + 2 * c.kv_dim(), c.hidden_size);
  w.qkv_bias = l.qkv_bias >= 0 ? reinterpret_cast<const float*>(seg + l.qkv_bias) : nullptr;
  w.o = view(seg + l.o, c.hidden_size, c.q_dim());
  w.post_norm = seg + l.post_norm;
  w.gate_up = view(seg + l.gate_up, 2 * c.intermediate_size, c.hidden_size);
  w.down = view(seg + l.down, c.hidden_size, c.intermediate_size);
  return w;
}

HeadWeights head_weights_at(const std::byte* embedding_segment, const std::byte* head_segment,
                            const ModelConfig& c, DType dtype) {
  const HeadSegmentLayout l = HeadSegmentLayout::compute(c, dtype);
  HeadWeights h;
  h.dtype = dtype;
  h.embedding = {embedding_segment, dtype, c.vocab_size, c.hidden_size, embedding_layout(c, dtype)};
  h.final_norm = head_segment + l.final_norm;
  // A tied head is the embedding table itself (one copy, in the GEMM layout when bf16).
  h.lm_head = l.lm_head >= 0 ? kernels::WeightView{head_segment + l.lm_head, dtype, c.vocab_size, c.hidden_size,
                                                   linear_layout(dtype, c.vocab_size, c.hidden_size)}
                             : h.embedding;
  return h;
}

namespace {

// The workspace's buffers, in order, each 64-byte aligned (kTensorAlignBytes).
struct WorkspaceLayout {
  std::int64_t normed = 0, qkv = 0, attn_out = 0, gate_up = 0, act = 0, attn_scratch = 0;
  std::int64_t positions = 0, rope_positions = 0, rope_cos_sin = 0, attn_batch = 0, gemm_scratch = 0;
  std::int64_t normed_rows = 0, scratch_floats = 0, gemm_scratch_floats = 0, gate_up_floats = 0;
  std::int64_t total_bytes = 0;

  static WorkspaceLayout compute(const ModelConfig& c, DType weight_dtype, const ForwardLimits& lim, int num_threads,
                                 kernels::AttentionArithmetic arithmetic) {
    KUN_CHECK(lim.max_tokens > 0 && lim.max_logit_rows >= 0 && lim.max_context_tokens > 0)
        << "forward limits: " << lim.max_tokens << " tokens, " << lim.max_logit_rows << " logit rows, "
        << lim.max_context_tokens << " context tokens";
    KUN_CHECK_GT(num_threads, 0);
    const std::int64_t T = lim.max_tokens;
    const std::int64_t f = static_cast<std::int64_t>(sizeof(float));
    WorkspaceLayout w;
    w.normed_rows = std::max(T, lim.max_logit_rows);
    // Attention's scratch grows linearly with the pool's threads (kernels/attention.cc); the
    // constructor checks this against the real pool.
    w.scratch_floats = num_threads * kernels::paged_kv_cache_scratch_floats(nullptr, lim.max_context_tokens, c.num_heads,
                                                                            c.num_kv_heads, arithmetic);
    std::int64_t cursor = 0;
    const std::int64_t layer_rows = lim.attention_only ? 0 : T;  // the layer buffers' rows
    if (lim.attention_only) w.normed_rows = 0;
    w.normed = place(&cursor, w.normed_rows * c.hidden_size * f);
    w.qkv = place(&cursor, layer_rows * (c.q_dim() + 2 * c.kv_dim()) * f);
    w.attn_out = place(&cursor, layer_rows * c.q_dim() * f);
    w.gate_up_floats = mlp_gate_up_fused(c, weight_dtype) ? 0 : layer_rows * 2 * c.intermediate_size;
    w.gate_up = place(&cursor, w.gate_up_floats * f);
    w.act = place(&cursor, layer_rows * c.intermediate_size * f);
    w.attn_scratch = place(&cursor, w.scratch_floats * f);
    w.positions = place(&cursor, T * static_cast<std::int64_t>(sizeof(std::int64_t)));
    w.rope_positions = place(&cursor, layer_rows * static_cast<std::int64_t>(sizeof(std::int64_t)));
    w.rope_cos_sin = place(&cursor, layer_rows * c.head_dim * f);
    // One entry per local sequence of a layer's batched attention (each has a token: at most T).
    w.attn_batch = place(&cursor, T * static_cast<std::int64_t>(sizeof(kernels::AttentionSequence)));
    // The GEMM's scratch (kernels::LinearScratch): every linear call has at most normed_rows rows
    // (layer steps: max_tokens; logits: passes of normed_rows) over one of these K.
    const std::int64_t max_k = std::max({c.hidden_size, c.q_dim(), c.intermediate_size});
    w.gemm_scratch_floats = kernels::linear_scratch_floats(w.normed_rows, max_k, num_threads);
    w.gemm_scratch = place(&cursor, w.gemm_scratch_floats * f);
    w.total_bytes = round_up(cursor, kTensorAlignBytes);
    return w;
  }
};

template <typename T>
std::span<T> view(std::span<std::byte> ws, std::int64_t offset, std::int64_t count) {
  return {reinterpret_cast<T*>(ws.data() + offset), static_cast<std::size_t>(count)};
}

}  // namespace

std::int64_t forward_workspace_bytes(const ModelConfig& config, DType weight_dtype, const ForwardLimits& limits,
                                     int num_threads, kernels::AttentionArithmetic attention_arithmetic) {
  return WorkspaceLayout::compute(config, weight_dtype, limits, num_threads, attention_arithmetic).total_bytes;
}

ForwardPass::ForwardPass(const ModelConfig& config, DType weight_dtype, std::int64_t kv_block_size, DType kv_dtype,
                         kernels::AttentionArithmetic attention_arithmetic, kernels::ThreadPool* pool,
                         const ForwardLimits& limits, std::span<std::byte> workspace)
    : config_(config), weight_dtype_(weight_dtype), kv_block_size_(kv_block_size), kv_dtype_(kv_dtype),
      attention_arithmetic_(attention_arithmetic), pool_(pool), limits_(limits),
      inv_freq_(config.rope_inv_freq()) {
  KUN_CHECK_GT(kv_block_size_, 0);
  KUN_CHECK(kv_dtype_ == DType::kBF16 || kv_dtype_ == DType::kF32)
      << "KV cache dtype " << dtype_name(kv_dtype_) << " (bf16 or f32)";
  KUN_CHECK_EQ(static_cast<std::int64_t>(inv_freq_.size()), config_.head_dim / 2);
  carve(workspace);
}

ForwardPass::ForwardPass(const ModelConfig& config, DType weight_dtype, std::int64_t kv_block_size, DType kv_dtype,
                         kernels::AttentionArithmetic attention_arithmetic, kernels::ThreadPool* pool,
                         const ForwardLimits& limits)
    : config_(config), weight_dtype_(weight_dtype), kv_block_size_(kv_block_size), kv_dtype_(kv_dtype),
      attention_arithmetic_(attention_arithmetic), pool_(pool), limits_(limits),
      inv_freq_(config.rope_inv_freq()) {
  KUN_CHECK_GT(kv_block_size_, 0);
  KUN_CHECK(kv_dtype_ == DType::kBF16 || kv_dtype_ == DType::kF32)
      << "KV cache dtype " << dtype_name(kv_dtype_) << " (bf16 or f32)";
  KUN_CHECK_EQ(static_cast<std::int64_t>(inv_freq_.size()), config_.head_dim / 2);
  const std::int64_t bytes = forward_workspace_bytes(config_, weight_dtype_, limits_,
                                                    pool_ != nullptr ? pool_->num_threads() : 1, attention_arithmetic_);
  // Over-allocated by one alignment unit so the carved buffers start 64-byte aligned.
  owned_workspace_ = std::make_unique<std::byte[]>(static_cast<std::size_t>(bytes + kTensorAlignBytes));
  void* start = owned_workspace_.get();
  std::size_t space = static_cast<std::size_t>(bytes + kTensorAlignBytes);
  KUN_CHECK(std::align(kTensorAlignBytes, static_cast<std::size_t>(bytes), start, space) != nullptr);
  carve({static_cast<std::byte*>(start), static_cast<std::size_t>(bytes)});
}

void ForwardPass::carve(std::span<std::byte> workspace) {
  const int threads = pool_ != nullptr ? pool_->num_threads() : 1;
  const WorkspaceLayout w = WorkspaceLayout::compute(config_, weight_dtype_, limits_, threads, attention_arithmetic_);
  KUN_CHECK_GE(static_cast<std::int64_t>(workspace.size()), w.total_bytes)
      << "forward workspace of " << workspace.size() << " bytes, the limits need " << w.total_bytes;
  KUN_CHECK_EQ(reinterpret_cast<std::uintptr_t>(workspace.data()) % kTensorAlignBytes, 0u) << "forward workspace alignment";
  KUN_CHECK_GE(w.scratch_floats, kernels::paged_kv_cache_scratch_floats(pool_, limits_.max_context_tokens, config_.num_heads,
                                                                         config_.num_kv_heads, attention_arithmetic_))
      << "attention scratch sized for " << threads << " threads is short (the kernel's scratch formula changed?)";
  workspace_bytes_ = w.total_bytes;
  const ModelConfig& c = config_;
  const std::int64_t T = limits_.max_tokens;
  const std::int64_t layer_rows = limits_.attention_only ? 0 : T;
  normed_ = view<float>(workspace, w.normed, w.normed_rows * c.hidden_size);
  qkv_ = view<float>(workspace, w.qkv, layer_rows * qkv_row());
  attn_out_ = view<float>(workspace, w.attn_out, layer_rows * c.q_dim());
  gate_up_ = view<float>(workspace, w.gate_up, w.gate_up_floats);
  act_ = view<float>(workspace, w.act, layer_rows * c.intermediate_size);
  attn_scratch_ = view<float>(workspace, w.attn_scratch, w.scratch_floats);
  attn_positions_ = view<std::int64_t>(workspace, w.positions, T);
  rope_positions_ = view<std::int64_t>(workspace, w.rope_positions, layer_rows);
  rope_cos_sin_ = view<float>(workspace, w.rope_cos_sin, layer_rows * c.head_dim);
  rope_rows_ = -1;
  // Trivially destructible entries, constructed once here and overwritten per layer.
  auto* entries = reinterpret_cast<kernels::AttentionSequence*>(workspace.data() + w.attn_batch);
  std::uninitialized_value_construct_n(entries, T);
  attn_batch_ = {entries, static_cast<std::size_t>(T)};
  gemm_scratch_.floats = view<float>(workspace, w.gemm_scratch, w.gemm_scratch_floats);
}

void ForwardPass::check_tokens(std::int64_t num_tokens, const char* what) const {
  KUN_CHECK_LE(num_tokens, limits_.max_tokens)
      << what << ": " << num_tokens << " tokens, the workspace holds " << limits_.max_tokens << " (ForwardLimits::max_tokens)";
}

void ForwardPass::embed(const HeadWeights& head, const std::int32_t* tokens, std::int64_t n, float* hidden) const {
  const std::int64_t H = config_.hidden_size;
  const kernels::WeightView& e = head.embedding;
  KUN_CHECK(e.rows == config_.vocab_size && e.cols == H) << "embedding " << e.rows << "x" << e.cols;
  const std::int64_t row_bytes = H * dtype_bytes(e.dtype);
  for (std::int64_t t = 0; t < n; ++t) {
    KUN_CHECK(tokens[t] >= 0 && tokens[t] < config_.vocab_size) << "token id " << tokens[t] << " out of vocab";
    if (kernels::is_panel_layout(e.layout)) {
      // A gather of one row out of the interleaved panels (bf16 widened to f32, exact).
      kernels::unpack_panel_pairs_row(e.data, e.rows, e.cols, tokens[t], hidden + t * H, e.layout);
    } else {
      convert_dtype(static_cast<const std::byte*>(e.data) + tokens[t] * row_bytes, e.dtype, hidden + t * H,
                    DType::kF32, H);
    }
  }
}

void ForwardPass::attention_input(const LayerWeights& w, std::span<const SequenceSlice> slices,
                                  const float* hidden, std::int64_t num_tokens, float* qkv) {
  const ModelConfig& c = config_;
  check_tokens(num_tokens, "attention input");
  KUN_CHECK(!limits_.attention_only) << "attention input" << " on a forward pass sized for attention only";
  kernels::rms_norm(hidden, num_tokens, c.hidden_size, w.input_norm, w.dtype, c.rms_norm_eps, normed_.data(), pool_);
  kernels::linear(normed_.data(), num_tokens, w.qkv, w.qkv_bias, qkv, pool_, &gemm_scratch_);
  // Every row's position (attn_positions_ is free until attend_local refills it), then RoPE on
  // q and k of all rows over the pool, with the angles of the step's first layer while the
  // positions are the same (a sin and a cos per row and pair in every layer before: llama-350m
  // decode, model_bench medians of 6 alternated runs, batch 8 1.016x and batch 32 1.05x the
  // tokens/s with the angles computed once).
  std::int64_t row = 0;
  for (const SequenceSlice& s : slices) {
    for (std::int64_t t = 0; t < s.num_tokens; ++t, ++row) attn_positions_[static_cast<std::size_t>(row)] = s.start_pos + t;
  }
  KUN_CHECK_EQ(row, num_tokens);
  const auto positions = attn_positions_.first(static_cast<std::size_t>(num_tokens));
  if (rope_rows_ != num_tokens || !std::equal(positions.begin(), positions.end(), rope_positions_.begin())) {
    kernels::rope_cos_sin(positions.data(), num_tokens, c.head_dim, inv_freq_.data(), rope_cos_sin_.data(), pool_);
    std::copy(positions.begin(), positions.end(), rope_positions_.begin());
    rope_rows_ = num_tokens;
  }
  kernels::rope_qk_cos_sin(qkv, num_tokens, qkv_row(), c.num_heads, c.num_kv_heads, c.head_dim, rope_cos_sin_.data(),
                           pool_);
}

namespace {
// Tokens from which a slice's KV append is split over the pool.
constexpr std::int64_t kParallelAppendTokens = 64;
}  // namespace

void ForwardPass::append_kv_rows(const kernels::AttentionSequence& a, const LayerKv& kv, std::int64_t t0,
                                 std::int64_t t1) const {
  const kernels::PagedKvCache& geo = a.kv;
  const std::int64_t bs = geo.block_size;
  const std::int64_t hd = geo.head_dim;
  const std::int64_t eb = dtype_bytes(geo.dtype);
  for (std::int64_t t = t0; t < t1; ++t) {
    const std::int64_t pos = a.start_pos + t;
    std::byte* block = kv.blocks[pos / bs];
    const std::int64_t off = pos % bs;
    const float* k = a.q + t * a.q_stride + config_.q_dim();
    const float* v = k + config_.kv_dim();
    for (std::int64_t h = 0; h < geo.num_kv_heads; ++h) {
      kernels::store_kv_row(k + h * hd, hd, geo.dtype, block + (h * bs + off) * hd * eb);
      kernels::store_kv_row(v + h * hd, hd, geo.dtype, block + geo.value_offset_bytes + (h * bs + off) * hd * eb);
    }
  }
}

kernels::AttentionSequence ForwardPass::append_kv(const SequenceSlice& slice, const float* qkv, const LayerKv& kv,
                                                  float* out) {
  const ModelConfig& c = config_;
  const std::int64_t bs = kv_block_size_;
  const std::int64_t kvh = c.num_kv_heads;
  const std::int64_t hd = c.head_dim;
  const std::int64_t eb = dtype_bytes(kv_dtype_);
  const std::int64_t value_offset_bytes = kvh * bs * hd * eb;
  check_tokens(slice.num_tokens, "attention");
  const std::int64_t context = slice.start_pos + slice.num_tokens;
  KUN_CHECK_LE(context, limits_.max_context_tokens)
      << "attention over " << context << " tokens, the workspace holds " << limits_.max_context_tokens
      << " (ForwardLimits::max_context_tokens)";
  KUN_CHECK_GE(kv.num_blocks * bs, context) << "KV blocks cover " << kv.num_blocks * bs << " tokens, need " << context;
  kernels::AttentionSequence a;
  a.q = qkv;
  a.q_stride = qkv_row();
  a.num_tokens = slice.num_tokens;
  a.start_pos = slice.start_pos;
  a.kv.blocks = kv.blocks;
  a.kv.value_offset_bytes = value_offset_bytes;
  a.kv.dtype = kv_dtype_;
  a.kv.block_size = bs;
  a.kv.context_len = context;
  a.kv.num_kv_heads = kvh;
  a.kv.head_dim = hd;
  a.out = out;
  a.out_stride = c.q_dim();
  // Each token's rows go to their own slots, so a prefill chunk's tokens are split over the pool
  // (on the calling thread alone, a 512-token llama-350m chunk's append was about 0.2 ms a layer
  // with the other thread idle). One pointer captured: std::function keeps it inline (no heap).
  if (pool_ != nullptr && pool_->num_threads() > 1 && slice.num_tokens >= kParallelAppendTokens) {
    struct Job {
      const ForwardPass* pass;
      const kernels::AttentionSequence* a;
      const LayerKv* kv;
    };
    const Job job{this, &a, &kv};
    const Job* j = &job;
    pool_->parallel_for(slice.num_tokens, [j](std::int64_t t0, std::int64_t t1) {
      j->pass->append_kv_rows(*j->a, *j->kv, t0, t1);
    });
  } else {
    append_kv_rows(a, kv, 0, slice.num_tokens);
  }
  return a;
}

void ForwardPass::attend_local(const SequenceSlice& slice, const float* qkv, const LayerKv& kv, float* out) {
  if (slice.num_tokens == 0) return;
  const kernels::AttentionSequence a = append_kv(slice, qkv, kv, out);
  kernels::paged_attention_batch(std::span(&a, 1), config_.num_heads, attention_scale(), attn_scratch_.data(), pool_,
                                 attention_arithmetic_);
}

void ForwardPass::attention_output_and_mlp(const LayerWeights& w, const float* attn_out, std::int64_t num_tokens,
                                           float* hidden) {
  const ModelConfig& c = config_;
  check_tokens(num_tokens, "attention output and MLP");
  KUN_CHECK(!limits_.attention_only) << "attention output and MLP" << " on a forward pass sized for attention only";
  const std::int64_t H = c.hidden_size;
  kernels::linear_add(attn_out, num_tokens, w.o, hidden, pool_, &gemm_scratch_);  // residual add fused
  kernels::rms_norm(hidden, num_tokens, H, w.post_norm, w.dtype, c.rms_norm_eps, normed_.data(), pool_);
  // silu(gate) * up, applied to each unit's products in the GEMM's thread scratch where the
  // weights are bf16 panels (on the AMX GEMM in its epilogue): there the workspace holds no
  // [tokens][2F] products (mlp_gate_up_fused).
  KUN_CHECK(!gate_up_.empty() || kernels::linear_silu_mul_fuses(w.gate_up, kernels::active_gemm_activations()))
      << "gate/up weight (" << dtype_name(w.gate_up.dtype) << ", " << kernels::weight_layout_name(w.gate_up.layout)
      << ") does not take the fused GEMM this forward pass was sized for (weights of "
      << dtype_name(weight_dtype_) << ")";
  kernels::linear_silu_mul(normed_.data(), num_tokens, w.gate_up, gate_up_.empty() ? nullptr : gate_up_.data(),
                           act_.data(), pool_, &gemm_scratch_);
  kernels::linear_add(act_.data(), num_tokens, w.down, hidden, pool_, &gemm_scratch_);  // residual add fused
}

void ForwardPass::run_layers(std::int64_t layer_begin, std::int64_t layer_end, std::span<const SequenceSlice> slices,
                             float* hidden, const std::function<LayerWeights(std::int64_t)>& weights,
                             const AttentionFn& attention, const LocalKvFn& local_kv) {
  KUN_CHECK(0 <= layer_begin && layer_begin <= layer_end && layer_end <= config_.num_layers)
      << "layer range [" << layer_begin << ", " << layer_end << ")";
  std::int64_t num_tokens = 0;
  std::int64_t max_context = 0;
  for (const SequenceSlice& s : slices) {
    num_tokens += s.num_tokens;
    max_context = std::max(max_context, s.start_pos + s.num_tokens);
  }
  if (num_tokens == 0) return;
  check_tokens(num_tokens, "layers");
  KUN_CHECK(!limits_.attention_only) << "layers" << " on a forward pass sized for attention only";
  KUN_CHECK_LE(max_context, limits_.max_context_tokens) << "a slice reaches " << max_context << " tokens of context";
  const std::int64_t q_dim = config_.q_dim();
  for (std::int64_t l = layer_begin; l < layer_end; ++l) {
    const LayerWeights w = weights(l);
    attention_input(w, slices, hidden, num_tokens, qkv_.data());
    // The sequences whose KV is here: their k/v appended now, attended together in one call
    // after the loop; each of the others goes through `attention` (remote attention). Slices
    // without tokens have nothing to attend.
    std::size_t local = 0;
    std::int64_t row = 0;
    for (std::size_t s = 0; s < slices.size(); ++s) {
      const SequenceSlice& slice = slices[s];
      const float* qkv = qkv_.data() + row * qkv_row();
      float* out = attn_out_.data() + row * q_dim;
      row += slice.num_tokens;
      if (slice.num_tokens == 0) continue;
      LayerKv kv;
      if (local_kv && local_kv(l, static_cast<std::int64_t>(s), &kv)) {
        attn_batch_[local++] = append_kv(slice, qkv, kv, out);
      } else {
        attention(l, static_cast<std::int64_t>(s), slice, qkv, out);
      }
    }
    if (local > 0) {
      kernels::paged_attention_batch(attn_batch_.first(local), config_.num_heads, attention_scale(), attn_scratch_.data(),
                                     pool_, attention_arithmetic_);
    }
    attention_output_and_mlp(w, attn_out_.data(), num_tokens, hidden);
  }
}

void ForwardPass::logits(const HeadWeights& head, const float* hidden, std::span<const std::int64_t> rows,
                         float* logits_out) {
  const std::int64_t H = config_.hidden_size;
  const auto n = static_cast<std::int64_t>(rows.size());
  if (n == 0) return;
  KUN_CHECK(!limits_.attention_only) << "logits on a forward pass sized for attention only";
  // In passes of as many rows as the normed buffer holds.
  const std::int64_t pass_rows = static_cast<std::int64_t>(normed_.size()) / H;
  const std::int64_t V = config_.vocab_size;
  for (std::int64_t first = 0; first < n; first += pass_rows) {
    const std::int64_t m = std::min(pass_rows, n - first);
    for (std::int64_t r = 0; r < m; ++r) {
      kernels::rms_norm(hidden + rows[static_cast<std::size_t>(first + r)] * H, 1, H, head.final_norm, head.dtype,
                        config_.rms_norm_eps, normed_.data() + r * H);
    }
    kernels::linear(normed_.data(), m, head.lm_head, nullptr, logits_out + first * V, pool_, &gemm_scratch_);
  }
}

}  // namespace kun::model
