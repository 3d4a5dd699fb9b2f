// CPU kernels of the Llama-family forward pass (DESIGN.md section 4, kernels/).
//
// Contract every kernel keeps:
//  * Deterministic and batch-invariant: the value computed for one row (token) does not depend on
//    how many other rows share the call, on how the rows are tiled, or on the thread count. Each
//    output element is reduced in one fixed order over K; work is split across threads over
//    output columns or rows, never over the reduction dimension.
//  * Instruction set chosen once per process at run time (AVX-512-BF16, AVX-512, AVX2; scalar
//    fallback for tests); KUN_ISA=avx2|avx512|avx512bf16|scalar forces one (never above what
//    the CPU has). All calls in one process use the same one, so results are reproducible.
//  * No heap allocation on the hot path: scratch memory comes from the caller.
//  * Activations are f32; weights are f32, f16 or bf16 and are widened to f32 in registers;
//    linear on kPanelPairs (bf16) weights may round them to bf16 (GemmActivations).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string_view>

#include "common/dtype.h"

namespace kun::kernels {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
std::string_view isa_name(Isa isa);
// The best ISA this CPU supports.
Isa detected_isa();
// The ISA all kernels in this process use (detected_isa() unless KUN_ISA narrows it).
Isa active_isa();
// True when this CPU can run `isa` (isa <= detected_isa()).
bool isa_supported(Isa isa);

// The activations of linear on panel-layout (bf16) weights, one choice per process
// (KUN_GEMM_ACTIVATIONS=f32|bf16|amx; default amx where gemm_activations_supported says this
// process can run it, else bf16 on AMD CPUs with AVX-512-BF16, where vdpbf16ps has twice the
// FMA's flops, else f32):
//  * kF32: exact f32 activations, one f32 FMA chain per output; the reference tests' precision.
//  * kBf16: activations rounded to bf16 and vdpbf16ps's arithmetic (the AVX-512-BF16 ISA runs
//    vdpbf16ps, the others reproduce it bit for bit); what bf16 engines do, about 4e-3 relative
//    logit error against an f32 reference on the tiny bf16 model (the f32 mode: 2e-6).
//  * kAmx: activations rounded to bf16 and Intel AMX's TDPBF16PS (16 x 16 outputs x 32 products
//    per instruction), only where the CPU has AMX-BF16, the OS grants the tile state and the
//    active ISA is avx512bf16. The hardware sums each 32-product k block its own way (not
//    vdpbf16ps's order), so no other ISA reproduces these bits; the result is still
//    deterministic and batch-invariant on this hardware (kernels/README.md). Precision: as kBf16.
enum class GemmActivations { kF32 = 0, kBf16 = 1, kAmx = 2 };
GemmActivations active_gemm_activations();
std::string_view gemm_activations_name(GemmActivations a);
// True when this process can run `a` (kAmx: see above; the others: always).
bool gemm_activations_supported(GemmActivations a);

// A fixed set of worker threads. parallel_for splits [0, n) into `num_threads()` contiguous
// ranges by a fixed rule (so a given n always maps to the same ranges) and runs fn(begin, end)
// on each, the caller's thread taking the first range. Not re-entrant; one caller at a time.
class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  int num_threads() const;
  void parallel_for(std::int64_t n, const std::function<void(std::int64_t, std::int64_t)>& fn);
  // Runs fn over [0, n) with the split balanced at run time: thread t starts on the same range
  // as parallel_for gives it, taking it from the front in chunks of `grain` indices, and a
  // thread whose range runs out takes chunks from the back of the others' ranges. A thread that
  // runs slower (a busier core, slower memory, a late wake-up) hands the rest of its range to the
  // others instead of holding up the call; a thread stalled inside a chunk still does. Every
  // index is run exactly once, but which thread runs it, and how [0, n) is cut into fn calls
  // (at most `grain` indices each; one thread: a single fn(0, n)), varies from call to call:
  // fn must not depend on either. n < 2^31.
  void parallel_for_balanced(std::int64_t n, std::int64_t grain,
                             const std::function<void(std::int64_t, std::int64_t)>& fn);
  // Inside fn of a parallel_for / parallel_for_balanced call: which of the pool's threads runs
  // it (0: the caller's thread, 1 .. num_threads() - 1: the workers), so fn can pick that
  // thread's slice of caller-provided scratch. -1 outside fn.
  static int current_thread_index();

 private:
  void run(std::int64_t n, std::int64_t grain,
           const std::function<void(std::int64_t, std::int64_t)>& fn);
  struct Impl;
  Impl* impl_;
};

// How a weight matrix's elements are laid out in memory.
//  * kRowMajor: HuggingFace layout, W[n][k] at element n * cols + k.
//  * kPanelPairs (bf16 only): K padded to Kp = cols rounded up to even (a zero W[n][cols] when
//    cols is odd, so an even K keeps the row-major byte count); output features in panels of
//    kPanelCols (the last one narrower when rows is not a multiple); panel p covers n in
//    [kPanelCols p, + width) and starts at element kPanelCols p * Kp; inside it the layout is
//    [Kp / 2][width][2]: the pair (W[n][k], W[n][k + 1]) for even k at element
//    ((k / 2) * width + n - kPanelCols p) * 2. One k pair of a panel is one contiguous run of
//    16-column vectors: vdpbf16ps's operand (and the FMA GEMM's), read straight from the weights.
//  * kNarrowPanelPairs (bf16 only): kPanelPairs with panels of kNarrowPanelCols (16) columns,
//    GemmActivations::kAmx's layout: 16 k pairs of a panel are one contiguous 1 KiB AMX B tile,
//    and the 4 panels of 64 output columns are 4 separate streams (one, interleaved, in
//    kPanelPairs: AMX at batch 1 read 0.74 of the bandwidth probe from it). Rows [64 p, 64 p + 64)
//    still occupy the bytes of those rows, as in kPanelPairs.
enum class WeightLayout { kRowMajor = 0, kPanelPairs = 1, kNarrowPanelPairs = 2 };
constexpr std::int64_t kPanelCols = 64;
constexpr std::int64_t kNarrowPanelCols = 16;
// "kRowMajor", "kPanelPairs" or "kNarrowPanelPairs" (for messages).
const char* weight_layout_name(WeightLayout layout);
// True for the panel layouts (kPanelPairs, kNarrowPanelPairs).
constexpr bool is_panel_layout(WeightLayout layout) { return layout != WeightLayout::kRowMajor; }
// Columns per panel of a panel layout (checked).
std::int64_t panel_cols(WeightLayout layout);
// The panel layout linear's GEMM reads for these activations: kNarrowPanelPairs for kAmx,
// kPanelPairs for the others. linear checks a bf16 panel weight against it.
WeightLayout gemm_weight_layout(GemmActivations a);

// A weight matrix: `rows` output features by `cols` input features in `layout`.
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  std::int64_t rows = 0;  // N (out features)
  std::int64_t cols = 0;  // K (in features)
  WeightLayout layout = WeightLayout::kRowMajor;
};

// True when a rows x cols matrix of `dtype` can be stored as kPanelPairs (bf16).
bool panel_pairs_supported(DType dtype, std::int64_t rows, std::int64_t cols);
// Bytes of a kPanelPairs (or kNarrowPanelPairs) matrix: the row-major byte count for an even
// cols, one more bf16 per row for an odd one.
std::int64_t panel_pairs_bytes(std::int64_t rows, std::int64_t cols);
// Reorders a row-major bf16 matrix (src) into a panel layout (dst, panel_pairs_bytes; must not
// overlap src). Checks panel_pairs_supported.
void pack_panel_pairs(const void* src, std::int64_t rows, std::int64_t cols, void* dst,
                      WeightLayout layout = WeightLayout::kPanelPairs);
// The inverse of pack_panel_pairs: W[n][*] of a panel-layout matrix widened to f32 (cols floats).
void unpack_panel_pairs_row(const void* packed, std::int64_t rows, std::int64_t cols,
                            std::int64_t n, float* out,
                            WeightLayout layout = WeightLayout::kPanelPairs);

// Scratch memory of linear / linear_add, given by the caller (a device carves it from its
// workspace so it counts in the device's capacity). Only kPanelPairs (bf16) weights use it: the
// activations packed once for all threads, then one slice per pool thread for the panel partial
// sums. A call of M rows over K inputs with a pool of P threads (1 without a pool) needs
// linear_scratch_floats(M, K, P) floats (checked); any span sized with a max_rows >= M and
// max_k >= K holds it. Where the bytes live does not change the result: bit for bit the same as
// without scratch.
struct LinearScratch {
  std::span<float> floats;
};
std::int64_t linear_scratch_floats(std::int64_t max_rows, std::int64_t max_k, int num_threads);
// Without a LinearScratch, linear falls back to per-thread buffers on the heap (thread_local,
// grown to the largest call each thread has run): tools, benchmarks and tests. The number of
// kPanelPairs calls that used that fallback since the process started (tests check a device's
// forward pass never does).
std::int64_t linear_thread_local_scratch_uses();

// y[m][n] = sum_k x[m][k] * W[n][k] + (bias ? bias[n] : 0), for m < M.
// x: [M][K] f32 row-major with row stride K; y: [M][N] f32 row-major with row stride N.
// bias may be null (f32, length N). pool may be null (runs on the calling thread).
// Reduction order per output: kRowMajor weights: f32 activations, lanes over k plus a fixed tree
// (README). kPanelPairs weights: one f32 chain per output over the k pairs (an odd K padded with
// a zero), per pair acc = fma(x[k+1], W[n][k+1], acc) then fma(x[k], W[n][k], acc), then + bias.
// With bf16 activations (GemmActivations::kBf16) x is first rounded to bf16 (nearest even,
// subnormals to zero) and each step is vdpbf16ps's (round to nearest even, subnormal inputs read
// as zero, results below the smallest normal flushed to zero). Either way the same bits for every
// M, tiling, thread count and every ISA. GemmActivations::kAmx: x rounded to bf16 as above, then
// per output C = 0 and C = TDPBF16PS(C, x block, W block) over k blocks of 16 pairs in order,
// + bias: the same bits for every M, tiling and thread count on AMX hardware (no other ISA).
// scratch: see LinearScratch (null: the thread_local fallback).
void linear(const float* x, std::int64_t M, const WeightView& w, const float* bias, float* y,
            ThreadPool* pool, const LinearScratch* scratch = nullptr);
// y[m][n] += linear's value (the dot product, plus bias, rounded to f32 first, then added):
// the same bits as linear into a temporary followed by add_inplace, without the extra pass.
void linear_add(const float* x, std::int64_t M, const WeightView& w, float* y, ThreadPool* pool,
                const LinearScratch* scratch = nullptr);

// out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * weight, rows of length D; out may alias x.
void rms_norm(const float* x, std::int64_t M, std::int64_t D, const void* weight, DType weight_dtype,
              float eps, float* out);

// Rotary embedding, HF "rotate_half" convention (pairs (i, i + head_dim/2)), applied in place to
// `num_heads` heads of `head_dim` for each of M tokens; x row stride = num_heads * head_dim.
// inv_freq has head_dim/2 entries (already including any rope scaling); positions has M entries.
void rope(float* x, std::int64_t M, std::int64_t num_heads, std::int64_t head_dim,
          const std::int64_t* positions, const float* inv_freq);

// out[i] = silu(gate[i]) * up[i] for n elements; out may alias gate.
void silu_mul(const float* gate, const float* up, std::int64_t n, float* out);

// Adds b into a (n elements).
void add_inplace(float* a, const float* b, std::int64_t n);

// Row-parallel forms of the element-wise steps of a layer (prefill and batched decode): rows are
// split over `pool` (null or small calls: the calling thread); each row's operations are those of
// the serial kernels above, so the bits are the same for any split and thread count.
// rms_norm of M rows (as above).
void rms_norm(const float* x, std::int64_t M, std::int64_t D, const void* weight, DType weight_dtype,
              float eps, float* out, ThreadPool* pool);
// out[m][i] = silu(gate_up[m][i]) * gate_up[m][F + i]: M rows of [gate (F) | up (F)] into [M][F].
void silu_mul_rows(const float* gate_up, std::int64_t M, std::int64_t F, float* out, ThreadPool* pool);
// The MLP's first half: out[m][i] = silu(g) * u with g and u what linear(x, gate_up) gives for
// columns i and F + i (gate_up: [2F][K], gate rows first): the same bits as linear into
// gate_up_out ([M][2F]) followed by silu_mul_rows. Where linear_silu_mul_fuses (bf16 weights in a
// panel layout: the AMX GEMM with F a multiple of 16, every other table with F a multiple of 64)
// silu_mul is applied to each unit's gate and up products while they are in the thread's scratch
// (the AMX GEMM: in its epilogue), and the [M][2F] products are never written (gate_up_out is not
// touched and may be null); elsewhere (row-major weights) it runs the two steps.
void linear_silu_mul(const float* x, std::int64_t M, const WeightView& gate_up, float* gate_up_out, float* out,
                     ThreadPool* pool, const LinearScratch* scratch = nullptr);
bool linear_silu_mul_fuses(const WeightView& gate_up, GemmActivations act);
// rope (as above) on the q and k parts of M rows of x (row stride row_stride floats): num_heads
// heads at column 0 and num_kv_heads heads right after them; each angle's cos and sin are computed
// once for both parts. The same bits as rope on the q part and then on the k part.
void rope_qk(float* x, std::int64_t M, std::int64_t row_stride, std::int64_t num_heads, std::int64_t num_kv_heads,
             std::int64_t head_dim, const std::int64_t* positions, const float* inv_freq, ThreadPool* pool);
// The angles of rope for M rows, for rope_qk_cos_sin: row m of cos_sin (head_dim floats at
// m * head_dim) holds cos(positions[m] * inv_freq[i]) at i and the sin at head_dim / 2 + i, for
// i < head_dim / 2: the values rope computes. A forward pass computes them once per step and
// rotates every layer's q and k with them.
void rope_cos_sin(const std::int64_t* positions, std::int64_t M, std::int64_t head_dim, const float* inv_freq,
                  float* cos_sin, ThreadPool* pool);
// rope_qk with the angles' cos and sin from rope_cos_sin: the same bits as rope_qk.
void rope_qk_cos_sin(float* x, std::int64_t M, std::int64_t row_stride, std::int64_t num_heads,
                     std::int64_t num_kv_heads, std::int64_t head_dim, const float* cos_sin, ThreadPool* pool);

// Causal attention of one sequence for one layer over a paged KV cache.
//  * q: [num_tokens][num_heads][head_dim]; token t has absolute position positions[t], and attends
//    to cached positions [0, positions[t]] (its own K/V must already be in the cache).
//  * The cache holds `context_len` tokens in blocks of `block_size` tokens; block b of this
//    sequence/layer is at key_blocks[b] / value_blocks[b]; inside a block the layout is
//    [num_kv_heads][block_size][head_dim] f32.
//  * GQA: query head h reads kv head h / (num_heads / num_kv_heads).
//  * out: [num_tokens][num_heads][head_dim].
// The result for a token depends only on its q and the cached K/V at positions [0, pos]: not on
// block_size, block placement, or the other tokens in the call.
struct PagedKvView {
  const float* const* key_blocks = nullptr;
  const float* const* value_blocks = nullptr;
  std::int64_t block_size = 0;
  std::int64_t context_len = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
};
// pool may be null; with a pool the work is split over (token, head) pairs and each thread uses
// its own slice of scratch: scratch must then hold pool->num_threads() * context_len floats.
void paged_attention(const float* q, std::int64_t num_tokens, std::int64_t num_heads,
                     const std::int64_t* positions, const PagedKvView& kv, float scale, float* out,
                     float* scratch, ThreadPool* pool);

// Floats of scratch paged_attention needs for this pool (null: one thread) and context length.
std::int64_t paged_attention_scratch_floats(const ThreadPool* pool, std::int64_t context_len);

// The paged KV cache as the engine stores it: the layout of PagedKvView with elements of
// `dtype`, kBF16 (the default KV cache type, half the bytes per token) or kF32. bf16 elements are
// widened to f32 in registers (exact) and go through the same operation sequence as f32 ones, so
// attention over a bf16 cache gives, bit for bit, what an f32 cache holding the same bf16-rounded
// values gives; results are deterministic and batch-invariant as for PagedKvView. Vectorized for
// AVX-512 and AVX2 with a scalar fallback (kernels/attention*.cc), chosen by active_isa().
struct PagedKvCache {
  const void* const* key_blocks = nullptr;
  const void* const* value_blocks = nullptr;
  DType dtype = DType::kBF16;
  std::int64_t block_size = 0;
  std::int64_t context_len = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
  // Or, with both lists null, one list of blocks that hold both: block b's keys at blocks[b] and
  // its values at blocks[b] + value_offset_bytes (the engine's KV blocks).
  const std::byte* const* blocks = nullptr;
  std::int64_t value_offset_bytes = 0;
};
// Same contract as the PagedKvView overload. Up to 4 query rows (16 with AMX arithmetic, one tile) are
// computed together, each K/V row loaded once for them: the query heads of a GQA group and, when
// the call holds several tokens (a prefill), consecutive tokens (rows / group of them); with a
// pool the work is split over (token tile, kv head, head chunk) units, dealt to the threads in
// turn. scratch:
// paged_kv_cache_scratch_floats(pool, context_len, num_heads, num_kv_heads) floats.
//
//
// `arithmetic` (of a bf16 cache; an f32 cache always runs kF32):
//  * AttentionArithmetic::kF32: f32 q against the widened keys, f32 probabilities times the
//    widened values, the same sequence on every ISA (above);
//  * AttentionArithmetic::kAmx: q.k and the weighted V sum on AMX tiles (kernels/attention_amx.cc):
//    q and the probabilities rounded to bf16, f32 sums, the softmax as kF32; the precision of the
//    AMX GEMM. Still deterministic and batch-invariant (a score depends only on its q row and key,
//    an output only on its row's probabilities and the values). An odd head_dim or one above 128
//    keeps kF32 scores, one that is not a multiple of 16 kF32 values. Needs
//    gemm_activations_supported(kAmx) (checked).
// A model uses attention_arithmetic_for(its weight dtype), so its attention has its GEMM's precision.
enum class AttentionArithmetic { kF32 = 0, kAmx = 1 };
// kAmx when active_gemm_activations() is kAmx and the weights are bf16 (their linear layers then
// run on AMX; other weight dtypes run f32 activations), else kF32.
AttentionArithmetic attention_arithmetic_for(DType weight_dtype);
void paged_attention(const float* q, std::int64_t num_tokens, std::int64_t num_heads,
                     const std::int64_t* positions, const PagedKvCache& kv, float scale, float* out,
                     float* scratch, ThreadPool* pool, AttentionArithmetic arithmetic = AttentionArithmetic::kF32);
// (kAmx calls take 16 query rows, the others 4: the scratch holds a score row per query row.)
std::int64_t paged_kv_cache_scratch_floats(const ThreadPool* pool, std::int64_t context_len,
                                           std::int64_t num_heads, std::int64_t num_kv_heads,
                                           AttentionArithmetic arithmetic = AttentionArithmetic::kF32);
// Explicit ISA and arithmetic (kAmx needs gemm_activations_supported(kAmx); checked).
void paged_attention(Isa isa, const float* q, std::int64_t num_tokens, std::int64_t num_heads,
                     const std::int64_t* positions, const PagedKvCache& kv, float scale, float* out,
                     float* scratch, ThreadPool* pool, AttentionArithmetic arithmetic = AttentionArithmetic::kF32);
// Several sequences' attention in one call (a batched decode step: one call per layer instead of
// one per sequence). Sequence i: num_tokens query rows at q + t * q_stride ([num_heads][head_dim]
// each), token t at position start_pos + t over its own cache kv (context_len >=
// start_pos + num_tokens), written to out + t * out_stride. Every (token, head) gets, bit for bit,
// what paged_attention over that sequence alone gives (the same rows computed together, the same
// kernels), whatever the other sequences and the pool: the small sequences are dealt to the
// threads whole (balanced), a sequence worth splitting runs over the pool as paged_attention does.
// scratch: paged_kv_cache_scratch_floats(pool, the longest context_len, num_heads, num_kv_heads).
struct AttentionSequence {
  const float* q = nullptr;
  std::int64_t q_stride = 0;
  std::int64_t num_tokens = 0;
  std::int64_t start_pos = 0;
  PagedKvCache kv;
  float* out = nullptr;
  std::int64_t out_stride = 0;
};
void paged_attention_batch(std::span<const AttentionSequence> seqs, std::int64_t num_heads, float scale,
                           float* scratch, ThreadPool* pool, AttentionArithmetic arithmetic = AttentionArithmetic::kF32);
void paged_attention_batch(Isa isa, std::span<const AttentionSequence> seqs, std::int64_t num_heads, float scale,
                           float* scratch, ThreadPool* pool, AttentionArithmetic arithmetic = AttentionArithmetic::kF32);

// The KV append: stores n f32 values into a cache row of `dtype` (kF32: copied; kBF16: rounded
// to nearest even, NaN kept NaN; the same bits as common/dtype.h f32_to_bf16).
void store_kv_row(const float* x, std::int64_t n, DType dtype, void* out);

// Index of the largest value (first one on ties).
std::int64_t argmax(const float* x, std::int64_t n);

// Explicit-ISA variants for tests and benchmarks (the functions above call these with
// active_isa()). `isa` must be supported by the CPU (checked). Results are bit-reproducible for a
// given ISA; different ISAs differ in rounding only (lane width and FMA vs separate mul/add).
// `act`: the kPanelPairs activations (ignored for row-major weights).
void linear(Isa isa, const float* x, std::int64_t M, const WeightView& w, const float* bias,
            float* y, ThreadPool* pool, GemmActivations act = active_gemm_activations(),
            const LinearScratch* scratch = nullptr);
void linear_add(Isa isa, const float* x, std::int64_t M, const WeightView& w, float* y,
                ThreadPool* pool, GemmActivations act = active_gemm_activations(),
                const LinearScratch* scratch = nullptr);
void linear_silu_mul(Isa isa, const float* x, std::int64_t M, const WeightView& gate_up, float* gate_up_out,
                     float* out, ThreadPool* pool, GemmActivations act, const LinearScratch* scratch = nullptr);
void rms_norm(Isa isa, const float* x, std::int64_t M, std::int64_t D, const void* weight,
              DType weight_dtype, float eps, float* out);
void silu_mul(Isa isa, const float* gate, const float* up, std::int64_t n, float* out);
void add_inplace(Isa isa, float* a, const float* b, std::int64_t n);
void paged_attention(Isa isa, const float* q, std::int64_t num_tokens, std::int64_t num_heads,
                     const std::int64_t* positions, const PagedKvView& kv, float scale, float* out,
                     float* scratch, ThreadPool* pool);

}  // namespace kun::kernels
