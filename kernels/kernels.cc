// Front end of the kernels: argument checks, threading, and dispatch to the per-ISA tables.
#include "kernels/kernels.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "common/check.h"
#include "kernels/internal.h"

namespace kun::kernels {
namespace {

using detail::IsaKernels;
using detail::kernels_for;

// Below this many multiply-adds a linear call runs on the calling thread (same result either way).
constexpr std::int64_t kMinParallelMacs = 1 << 16;
// Weight rows per unit of the thread split (a multiple of every ISA's microkernel width).
constexpr std::int64_t kRowsPerUnit = 12;
// Activations below this many elements are rounded and packed on the calling thread.
constexpr std::int64_t kMinParallelPack = 1 << 15;
// Activations up to this size are claimed one unit at a time by the balanced split.
constexpr std::int64_t kSmallActivationBytes = 256 * 1024;
// Panels per claim of a decode call at M <= 2: the multi-panel tiles' width (4 at M = 1).
constexpr std::int64_t kDecodePanelsPerClaim = 4;

// The AMX GEMM's packed activations of one row block stay within this many bytes: 3/4 of the L2
// (2 MiB where the OS does not say), the rest left to the weight panels passing through.
std::int64_t amx_row_block_budget_bytes() {
  static const std::int64_t budget = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return (l2 > 0 ? static_cast<std::int64_t>(l2) : std::int64_t{2} << 20) * 3 / 4;
  }();
  return budget;
}

// Rows per row block of the AMX GEMM. Every panel pair's 2 x 2 passes read all the block's packed
// rows, so rows past the L2 come from L3 once per panel pair; in blocks that fit, the block's
// rows stay in L2 and only the weights are read again, once per block (from L3 or memory). Down
// projection of a 512-token llama-350m prefill (K = 2816, 2.9 MB of packed rows): 2 blocks of
// 256 rows, 1.4x in a stand-alone loop (kernels/README.md, "Row blocks and the next panels"). Blocks are whole passes
// of 2 row tiles, so a row's tiles and its products do not change.
std::int64_t amx_rows_per_block(std::int64_t M, std::int64_t K) {
  const std::int64_t pass_rows = 2 * detail::kAmxTileRows;
  if (M <= pass_rows) return M;
  const std::int64_t budget = amx_row_block_budget_bytes();
  const std::int64_t bytes = M * detail::amx_packed_row_elems(K) * 2;
  const std::int64_t blocks = (bytes + budget - 1) / budget;
  const std::int64_t rows = (M + blocks - 1) / blocks;
  return (rows + pass_rows - 1) / pass_rows * pass_rows;
}

struct LinearJob {
  const IsaKernels* k;
  const float* x;
  std::int64_t M;
  const WeightView* w;
  const float* bias;
  float* y;
  bool accumulate;
  const float* xp;  // kPanelPairs: the packed activations (IsaKernels::pack_rows)
  bool bf16_act;
  // kPanelPairs with caller scratch: thread t's panel scratch at panels + t * panel_stride
  // (ThreadPool::current_thread_index); null: the thread_local fallback.
  float* panels;
  std::int64_t panel_stride;
  int threads;
  // linear_silu_mul fused: silu_mul of the gate and up products into y ([M][N / 2]), in the AMX
  // GEMM's epilogue (amx) or per unit by silu_mul_unit.
  decltype(detail::IsaKernels::silu_mul) silu_mul;
  bool amx;
};

struct PackJob {
  const IsaKernels* k;
  const float* x;
  std::int64_t M;
  std::int64_t K;
  float* xp;
  bool bf16_act;
};

// Caller scratch pieces start on a cache line (16 floats).
constexpr std::int64_t kScratchAlignFloats = 16;
std::int64_t align_floats(std::int64_t n) {
  return (n + kScratchAlignFloats - 1) / kScratchAlignFloats * kScratchAlignFloats;
}

std::atomic<std::int64_t> g_thread_local_scratch_uses{0};

// The thread_local fallback (no LinearScratch). Per-thread scratch of the kPanelPairs GEMM: grows to the largest call seen, then is reused
// (no allocation per call once warm).
float* panel_scratch(std::int64_t M) {
  thread_local std::vector<float> buf;
  const auto need = static_cast<std::size_t>(detail::panel_call_scratch_floats(M));
  if (buf.size() < need) buf.resize(need);
  return buf.data();
}

// The calling thread's buffer for packed activations (read by every thread of the call).
float* packed_rows_buffer(std::int64_t M, std::int64_t K) {
  thread_local std::vector<float> buf;
  const auto need = static_cast<std::size_t>(detail::pack_rows_floats(M, K));
  if (buf.size() < need) buf.resize(need);
  return buf.data();
}

// This thread's panel scratch for a call of M rows: its slice of the caller's scratch, or the
// thread_local fallback.
float* thread_panel_scratch(const LinearJob& j) {
  if (j.panels == nullptr) return panel_scratch(j.M);
  const int t = ThreadPool::current_thread_index();
  KUN_CHECK(t >= 0 && t < j.threads) << "linear: thread index " << t << " outside the pool's " << j.threads;
  return j.panels + t * j.panel_stride;
}

struct AttentionJob {
  const IsaKernels* k;
  const float* q;
  std::int64_t num_tokens;
  std::int64_t num_heads;
  const std::int64_t* positions;
  const PagedKvView* kv;
  float scale;
  float* out;
  float* scratch;
  int parts;
};

void attention_pairs(const AttentionJob& j, std::int64_t begin, std::int64_t end, float* scratch) {
  const std::int64_t hd = j.kv->head_dim;
  const std::int64_t group = j.num_heads / j.kv->num_kv_heads;
  for (std::int64_t p = begin; p < end; ++p) {
    const std::int64_t t = p / j.num_heads;
    const std::int64_t h = p % j.num_heads;
    const std::int64_t off = (t * j.num_heads + h) * hd;
    j.k->attention_head(j.q + off, *j.kv, h / group, j.positions[t] + 1, j.scale, j.out + off,
                        scratch);
  }
}

}  // namespace

const char* weight_layout_name(WeightLayout layout) {
  switch (layout) {
    case WeightLayout::kRowMajor: return "kRowMajor";
    case WeightLayout::kPanelPairs: return "kPanelPairs";
    case WeightLayout::kNarrowPanelPairs: return "kNarrowPanelPairs";
  }
  return "unknown";
}

namespace {

// The fused linear_silu_mul on kPanelPairs weights (every table but AMX's, which fuses in its
// epilogue): unit p is gate panel p (rows [64p, 64p + 64) of gate_up) and up panel p (rows
// F + 64p ..; F a multiple of 64, so it starts a panel), each run by linear_panels as a 64-row
// weight of its own into the thread's scratch, then out[m][64p + c] = silu_mul(gate, up). A
// column's product does not depend on the other columns of its call, and silu_mul is elementwise
// (the same function silu_mul_rows calls), so the bits are those of linear then silu_mul_rows;
// the [M][2F] products never leave the thread's scratch.
void silu_mul_unit(const IsaKernels& k, const float* xp, std::int64_t M, const WeightView& w, std::int64_t p,
                   bool bf16_act, decltype(detail::IsaKernels::silu_mul) silu_mul, float* out, float* scratch) {
  const std::int64_t F = w.rows / 2;
  const std::int64_t kp = w.cols + (w.cols & 1);
  const auto* base = static_cast<const std::uint16_t*>(w.data);
  float* products[2] = {scratch + detail::linear_panels_scratch_floats(M),
                        scratch + detail::linear_panels_scratch_floats(M) + M * kPanelCols};
  for (int half = 0; half < 2; ++half) {
    WeightView panel = w;
    panel.data = base + (half * F + p * kPanelCols) * kp;
    panel.rows = kPanelCols;
    k.linear_panels(xp, M, panel, 0, 1, nullptr, products[half], false, scratch, bf16_act);
  }
  for (std::int64_t m = 0; m < M; ++m) {
    silu_mul(products[0] + m * kPanelCols, products[1] + m * kPanelCols, kPanelCols, out + m * F + p * kPanelCols);
  }
}

// Units [b, e) of a panel call (j.M rows of j.xp into j.y) on the calling thread's panel scratch.
void panel_units(const LinearJob& j, std::int64_t b, std::int64_t e, float* ps) {
  if (j.silu_mul != nullptr && j.amx) {
    j.k->linear_panels_silu_mul(j.xp, j.M, *j.w, b, e, j.silu_mul, j.y, ps);
  } else if (j.silu_mul != nullptr) {
    for (std::int64_t p = b; p < e; ++p) silu_mul_unit(*j.k, j.xp, j.M, *j.w, p, j.bf16_act, j.silu_mul, j.y, ps);
  } else {
    j.k->linear_panels(j.xp, j.M, *j.w, b, e, j.bias, j.y, j.accumulate, ps, j.bf16_act);
  }
}

// silu_mul_fused (linear_silu_mul where linear_silu_mul_fuses): y is [M][N / 2], silu_mul of the gate
// (rows [0, N / 2) of w) and up (the rest) products, by kernels_for(isa).silu_mul.
void linear_impl(Isa isa, const float* x, std::int64_t M, const WeightView& w, const float* bias,
                 float* y, bool accumulate, ThreadPool* pool, GemmActivations act,
                 const LinearScratch* scratch, bool silu_mul_fused = false) {
  KUN_CHECK(w.data != nullptr && w.rows > 0 && w.cols > 0) << "empty weight";
  KUN_CHECK_GE(M, 0);
  if (M == 0) return;
  KUN_CHECK(x != nullptr && y != nullptr) << "null x or y";
  const bool panels = is_panel_layout(w.layout);
  if (panels) {
    KUN_CHECK(panel_pairs_supported(w.dtype, w.rows, w.cols))
        << "panel layouts need bf16: " << dtype_name(w.dtype) << " " << w.rows << "x" << w.cols;
    KUN_CHECK(w.layout == gemm_weight_layout(act))
        << "GEMM activations " << gemm_activations_name(act) << " read " << weight_layout_name(gemm_weight_layout(act))
        << " weights, this " << w.rows << "x" << w.cols << " one is in " << weight_layout_name(w.layout);
  }
  const bool bf16_act = act != GemmActivations::kF32;
  const bool amx = panels && act == GemmActivations::kAmx;
  KUN_CHECK(!amx || (isa == Isa::kAvx512Bf16 && detail::amx_available()))
      << "GEMM activations amx need AMX-BF16 and the avx512bf16 ISA, not " << isa_name(isa);
  // vdpbf16ps needs bf16 activations: with f32 ones AVX-512-BF16 runs the AVX-512 FMA GEMM.
  const IsaKernels& k = amx ? detail::amx_kernels()
                        : panels && !bf16_act && isa == Isa::kAvx512Bf16 ? kernels_for(Isa::kAvx512)
                                                                         : kernels_for(isa);
  const std::int64_t N = w.rows;
  const std::int64_t K = w.cols;
  KUN_CHECK(!silu_mul_fused || (linear_silu_mul_fuses(w, act) && bias == nullptr && !accumulate))
      << "the fused silu_mul needs a gate/up weight in a panel layout with 64k rows per half (16k on AMX), not "
      << N << "x" << K << " in " << weight_layout_name(w.layout);
  const float* xp = nullptr;
  const bool serial = pool == nullptr || pool->num_threads() == 1 || M * N * K < kMinParallelMacs;
  const int threads = pool != nullptr ? pool->num_threads() : 1;
  float* panel_base = nullptr;
  std::int64_t panel_stride = 0;
  if (panels) {
    // The activations rounded to bf16 and packed once for every thread (bf16_dot.inc).
    float* buf = nullptr;
    if (scratch != nullptr) {
      const auto have = static_cast<std::int64_t>(scratch->floats.size());
      KUN_CHECK_LE(linear_scratch_floats(M, K, threads), have)
          << "linear scratch of " << have << " floats is short for " << M << " rows of " << K
          << " inputs on " << threads << " threads";
      buf = scratch->floats.data();
      panel_base = buf + align_floats(detail::pack_rows_floats(M, K));
      panel_stride = align_floats(detail::panel_call_scratch_floats(M));
    } else {
      buf = packed_rows_buffer(M, K);
      g_thread_local_scratch_uses.fetch_add(1, std::memory_order_relaxed);
    }
    const std::int64_t tile_rows = M >= k.widen_min_rows ? k.tile_rows : k.direct_tile_rows;
    const std::int64_t tiles = (M + tile_rows - 1) / tile_rows;
    if (serial || M * K < kMinParallelPack) {
      k.pack_rows(x, M, K, buf, 0, tiles, bf16_act);
    } else {
      // Split over the threads (a serial pack would idle the others); one pointer captured,
      // so std::function stays inline.
      const PackJob pack{&k, x, M, K, buf, bf16_act};
      const PackJob* pj = &pack;
      pool->parallel_for(tiles, [pj](std::int64_t b, std::int64_t e) {
        pj->k->pack_rows(pj->x, pj->M, pj->K, pj->xp, b, e, pj->bf16_act);
      });
    }
    xp = buf;
  }
  // Row blocks of the AMX GEMM (one block elsewhere): the packed rows of a block start at row
  // r0's offset in xp (AMX rows are whole, even, numbers of bf16), its outputs at row r0 of y.
  const std::int64_t block_rows = amx ? amx_rows_per_block(M, K) : M;
  const std::int64_t packed_row_floats = amx ? detail::amx_packed_row_elems(K) / 2 : 0;
  // Output columns: N, or the F = N / 2 gate columns of a fused silu_mul.
  const std::int64_t out_cols = silu_mul_fused ? N / 2 : N;
  const std::int64_t out_units = (out_cols + kPanelCols - 1) / kPanelCols;
  const auto silu_mul = silu_mul_fused ? kernels_for(isa).silu_mul : nullptr;
  LinearJob job{&k, x, M, &w, bias, y,
                accumulate, xp, bf16_act, panel_base, panel_stride, threads, silu_mul, amx};
  const LinearJob* jp = &job;  // captured by pointer: std::function keeps it inline (no heap)
  const std::int64_t x_bytes = M * K * static_cast<std::int64_t>(sizeof(float));
  if (panels) {
    // Serial: the caller's scratch (outside the pool, so not thread_panel_scratch).
    float* serial_scratch = !serial ? nullptr : panel_base != nullptr ? panel_base : panel_scratch(M);
    // Units are panels (64 output columns), one per claim: a panel passes over all M rows of the
    // packed activations whatever the chunk, so larger claims buy no reuse, and a claim of several
    // panels left the other thread waiting up to that chunk's time at the end of each call. The
    // exception is decode at M <= 2: kDecodePanelsPerClaim panels per claim, so one claim runs as
    // one tile streaming that many panels side by side (kernels/panels_direct.inc).
    const std::int64_t grain = x_bytes <= kSmallActivationBytes && M <= 2 ? kDecodePanelsPerClaim : 1;
    auto body = [jp](std::int64_t b, std::int64_t e) { panel_units(*jp, b, e, thread_panel_scratch(*jp)); };
    for (std::int64_t r0 = 0; r0 < M; r0 += block_rows) {
      job.M = std::min(block_rows, M - r0);
      job.xp = xp + r0 * packed_row_floats;
      job.y = y + r0 * out_cols;
      if (serial) {
        panel_units(job, 0, out_units, serial_scratch);
      } else {
        pool->parallel_for_balanced(out_units, grain, body);
      }
    }
    return;
  }
  if (serial) {
    k.linear_block(x, K, 0, M, w, 0, N, bias, y, N, accumulate);
    return;
  }
  const std::int64_t units = (N + kRowsPerUnit - 1) / kRowsPerUnit;
  // Balanced split: with a fixed split, a thread that runs slower (a shared core, slower memory,
  // a late wake-up) holds up the whole call while the other spins (measured: about 10 % of a
  // batch-1 decode step on a shared 2-core VM); which thread computes a unit does not change its
  // value. While the activations fit in L2 next to a weight panel,
  // one unit per claim; above that, larger chunks keep each activation block reused across many
  // weight panels (linear_block's loop order) before the next block is loaded.
  const std::int64_t grain =
      x_bytes <= kSmallActivationBytes
          ? 1
          : std::max<std::int64_t>(1, units / (8 * pool->num_threads()));
  auto body = [jp](std::int64_t b, std::int64_t e) {
    const std::int64_t n0 = b * kRowsPerUnit;
    const std::int64_t n1 = e * kRowsPerUnit < jp->w->rows ? e * kRowsPerUnit : jp->w->rows;
    jp->k->linear_block(jp->x, jp->w->cols, 0, jp->M, *jp->w, n0, n1, jp->bias, jp->y,
                        jp->w->rows, jp->accumulate);
  };
  pool->parallel_for_balanced(units, grain, body);
}

}  // namespace

bool panel_pairs_supported(DType dtype, std::int64_t rows, std::int64_t cols) {
  return dtype == DType::kBF16 && rows > 0 && cols > 0;
}

std::int64_t panel_pairs_bytes(std::int64_t rows, std::int64_t cols) {
  return rows * (cols + (cols & 1)) * 2;
}

std::int64_t panel_cols(WeightLayout layout) {
  KUN_CHECK(is_panel_layout(layout)) << "not a panel layout: " << static_cast<int>(layout);
  return layout == WeightLayout::kPanelPairs ? kPanelCols : kNarrowPanelCols;
}

WeightLayout gemm_weight_layout(GemmActivations a) {
  return a == GemmActivations::kAmx ? WeightLayout::kNarrowPanelPairs : WeightLayout::kPanelPairs;
}

void pack_panel_pairs(const void* src, std::int64_t rows, std::int64_t cols, void* dst, WeightLayout layout) {
  KUN_CHECK(panel_pairs_supported(DType::kBF16, rows, cols)) << rows << "x" << cols;
  const std::int64_t pc = panel_cols(layout);
  const auto* s = static_cast<const std::uint16_t*>(src);
  auto* d = static_cast<std::uint16_t*>(dst);
  const std::int64_t kp = cols + (cols & 1);
  KUN_CHECK(d + rows * kp <= s || s + rows * cols <= d) << "pack_panel_pairs: src and dst overlap";
  for (std::int64_t n0 = 0; n0 < rows; n0 += pc) {
    const std::int64_t width = std::min(pc, rows - n0);
    std::uint16_t* panel = d + n0 * kp;
    for (std::int64_t c = 0; c < width; ++c) {
      const std::uint16_t* row = s + (n0 + c) * cols;
      for (std::int64_t k = 0; k < kp; k += 2) {
        std::uint16_t* pair = panel + ((k / 2) * width + c) * 2;
        pair[0] = row[k];
        pair[1] = k + 1 < cols ? row[k + 1] : std::uint16_t{0};
      }
    }
  }
}

void unpack_panel_pairs_row(const void* packed, std::int64_t rows, std::int64_t cols,
                            std::int64_t n, float* out, WeightLayout layout) {
  KUN_CHECK(panel_pairs_supported(DType::kBF16, rows, cols) && n >= 0 && n < rows)
      << rows << "x" << cols << " row " << n;
  const std::int64_t pc = panel_cols(layout);
  const auto* p = static_cast<const std::uint16_t*>(packed);
  const std::int64_t kp = cols + (cols & 1);
  const std::int64_t n0 = n / pc * pc;
  const std::int64_t width = std::min(pc, rows - n0);
  const std::uint16_t* panel = p + n0 * kp;
  for (std::int64_t k = 0; k < cols; ++k) {
    out[k] = bf16_to_f32(panel[((k / 2) * width + (n - n0)) * 2 + (k % 2)]);
  }
}

std::int64_t linear_scratch_floats(std::int64_t max_rows, std::int64_t max_k, int num_threads) {
  KUN_CHECK(max_rows >= 0 && max_k >= 0 && num_threads >= 1)
      << max_rows << " rows, " << max_k << " inputs, " << num_threads << " threads";
  if (max_rows == 0 || max_k == 0) return 0;
  return align_floats(detail::pack_rows_floats(max_rows, max_k)) +
         num_threads * align_floats(detail::panel_call_scratch_floats(max_rows));
}

std::int64_t linear_thread_local_scratch_uses() {
  return g_thread_local_scratch_uses.load(std::memory_order_relaxed);
}

void linear(Isa isa, const float* x, std::int64_t M, const WeightView& w, const float* bias,
            float* y, ThreadPool* pool, GemmActivations act, const LinearScratch* scratch) {
  linear_impl(isa, x, M, w, bias, y, false, pool, act, scratch);
}

void linear_add(Isa isa, const float* x, std::int64_t M, const WeightView& w, float* y,
                ThreadPool* pool, GemmActivations act, const LinearScratch* scratch) {
  linear_impl(isa, x, M, w, nullptr, y, true, pool, act, scratch);
}

void linear_add(const float* x, std::int64_t M, const WeightView& w, float* y, ThreadPool* pool,
                const LinearScratch* scratch) {
  linear_impl(active_isa(), x, M, w, nullptr, y, true, pool, active_gemm_activations(), scratch);
}

void linear(const float* x, std::int64_t M, const WeightView& w, const float* bias, float* y,
            ThreadPool* pool, const LinearScratch* scratch) {
  linear_impl(active_isa(), x, M, w, bias, y, false, pool, active_gemm_activations(), scratch);
}

void rms_norm(Isa isa, const float* x, std::int64_t M, std::int64_t D, const void* weight,
              DType weight_dtype, float eps, float* out) {
  KUN_CHECK(D > 0 && weight != nullptr) << "D " << D;
  const IsaKernels& k = kernels_for(isa);
  for (std::int64_t m = 0; m < M; ++m) k.rms_norm_row(x + m * D, D, weight, weight_dtype, eps, out + m * D);
}

void rms_norm(const float* x, std::int64_t M, std::int64_t D, const void* weight, DType weight_dtype,
              float eps, float* out) {
  rms_norm(active_isa(), x, M, D, weight, weight_dtype, eps, out);
}

namespace {

// The longest head rope_qk rotates with its angles on the stack.
constexpr std::int64_t kMaxRopeHeadDim = 1024;

// Row m's angles (rope_cos_sin's layout): cos at i, sin at half + i.
void angles_of_row(std::int64_t position, std::int64_t head_dim, const float* inv_freq, float* cos_sin) {
  const std::int64_t half = head_dim / 2;
  const float pos = static_cast<float>(position);
  for (std::int64_t i = 0; i < half; ++i) {
    // HF: freqs = pos * inv_freq (f32), emb = cat(freqs, freqs), x*cos + rotate_half(x)*sin.
    const float angle = pos * inv_freq[i];
    cos_sin[i] = std::cos(angle);
    cos_sin[half + i] = std::sin(angle);
  }
}

// Rotates pair (i, i + head_dim/2) of each of `num_heads` consecutive heads at `row` by the row's
// angles: (a, b) -> (a c - b s, b c + a s), each product rounded on its own (-ffp-contract=off).
// Contiguous in i, so the compiler vectorizes it.
void rotate_heads(float* row, std::int64_t num_heads, std::int64_t head_dim, const float* cos_sin) {
  const std::int64_t half = head_dim / 2;
  const float* __restrict c = cos_sin;
  const float* __restrict s = cos_sin + half;
  for (std::int64_t h = 0; h < num_heads; ++h) {
    float* __restrict lo = row + h * head_dim;
    float* __restrict hi = lo + half;
    for (std::int64_t i = 0; i < half; ++i) {
      const float a = lo[i];
      const float b = hi[i];
      const float ac = a * c[i];
      const float bs = b * s[i];
      const float bc = b * c[i];
      const float as = a * s[i];
      lo[i] = ac - bs;
      hi[i] = bc + as;
    }
  }
}

// rope over rows [m0, m1): q heads, then (num_kv_heads > 0) the k heads right after them, with
// each row's angles from `cos_sin` (row stride head_dim) or, when it is null, computed here.
void rope_rows(float* x, std::int64_t m0, std::int64_t m1, std::int64_t row_stride, std::int64_t num_heads,
               std::int64_t num_kv_heads, std::int64_t head_dim, const std::int64_t* positions, const float* inv_freq,
               const float* cos_sin) {
  float own[kMaxRopeHeadDim];
  for (std::int64_t m = m0; m < m1; ++m) {
    const float* angles = cos_sin != nullptr ? cos_sin + m * head_dim : own;
    if (cos_sin == nullptr) angles_of_row(positions[m], head_dim, inv_freq, own);
    rotate_heads(x + m * row_stride, num_heads + num_kv_heads, head_dim, angles);
  }
}

// Below this many elements a row-parallel element-wise call runs on the calling thread (a
// hand-off to the pool costs a few microseconds).
constexpr std::int64_t kMinParallelElements = 1 << 15;

// Runs fn(m0, m1) over rows [0, M), split over the pool when the call is large enough.
void for_rows(ThreadPool* pool, std::int64_t M, std::int64_t elements,
              const std::function<void(std::int64_t, std::int64_t)>& fn) {
  if (pool == nullptr || pool->num_threads() == 1 || M < 2 || elements < kMinParallelElements) {
    fn(0, M);
    return;
  }
  pool->parallel_for(M, fn);
}

}  // namespace

void rope(float* x, std::int64_t M, std::int64_t num_heads, std::int64_t head_dim,
          const std::int64_t* positions, const float* inv_freq) {
  KUN_CHECK(head_dim % 2 == 0 && head_dim <= kMaxRopeHeadDim) << "head_dim " << head_dim;
  rope_rows(x, 0, M, num_heads * head_dim, num_heads, 0, head_dim, positions, inv_freq, nullptr);
}

namespace {

void check_rope_qk_shape(std::int64_t row_stride, std::int64_t num_heads, std::int64_t num_kv_heads,
                         std::int64_t head_dim) {
  KUN_CHECK(head_dim % 2 == 0 && head_dim <= kMaxRopeHeadDim && num_heads > 0 && num_kv_heads >= 0 &&
            row_stride >= (num_heads + num_kv_heads) * head_dim)
      << "head_dim " << head_dim << " heads " << num_heads << " + " << num_kv_heads << " row stride " << row_stride;
}

struct RopeJob {
  float* x;
  std::int64_t row_stride, num_heads, num_kv_heads, head_dim;
  const std::int64_t* positions;
  const float* inv_freq;
  const float* cos_sin;  // null: the angles from positions and inv_freq
};

void rope_qk_job(const RopeJob& job, std::int64_t M, ThreadPool* pool) {
  const RopeJob* j = &job;  // one pointer captured: std::function stays inline
  for_rows(pool, M, M * (job.num_heads + job.num_kv_heads) * job.head_dim, [j](std::int64_t m0, std::int64_t m1) {
    rope_rows(j->x, m0, m1, j->row_stride, j->num_heads, j->num_kv_heads, j->head_dim, j->positions, j->inv_freq,
              j->cos_sin);
  });
}

}  // namespace

void rope_qk(float* x, std::int64_t M, std::int64_t row_stride, std::int64_t num_heads, std::int64_t num_kv_heads,
             std::int64_t head_dim, const std::int64_t* positions, const float* inv_freq, ThreadPool* pool) {
  check_rope_qk_shape(row_stride, num_heads, num_kv_heads, head_dim);
  if (M <= 0) return;
  const RopeJob job{x, row_stride, num_heads, num_kv_heads, head_dim, positions, inv_freq, nullptr};
  rope_qk_job(job, M, pool);
}

void rope_cos_sin(const std::int64_t* positions, std::int64_t M, std::int64_t head_dim, const float* inv_freq,
                  float* cos_sin, ThreadPool* pool) {
  KUN_CHECK(head_dim % 2 == 0 && head_dim > 0) << "head_dim " << head_dim;
  if (M <= 0) return;
  struct Job {
    const std::int64_t* positions;
    std::int64_t head_dim;
    const float* inv_freq;
    float* cos_sin;
  };
  const Job job{positions, head_dim, inv_freq, cos_sin};
  const Job* j = &job;
  // A sin and a cos cost about 20 multiply-adds each.
  for_rows(pool, M, M * head_dim * 20, [j](std::int64_t m0, std::int64_t m1) {
    for (std::int64_t m = m0; m < m1; ++m) angles_of_row(j->positions[m], j->head_dim, j->inv_freq, j->cos_sin + m * j->head_dim);
  });
}

void rope_qk_cos_sin(float* x, std::int64_t M, std::int64_t row_stride, std::int64_t num_heads,
                     std::int64_t num_kv_heads, std::int64_t head_dim, const float* cos_sin, ThreadPool* pool) {
  check_rope_qk_shape(row_stride, num_heads, num_kv_heads, head_dim);
  if (M <= 0) return;
  const RopeJob job{x, row_stride, num_heads, num_kv_heads, head_dim, nullptr, nullptr, cos_sin};
  rope_qk_job(job, M, pool);
}

void rms_norm(const float* x, std::int64_t M, std::int64_t D, const void* weight, DType weight_dtype, float eps,
              float* out, ThreadPool* pool) {
  KUN_CHECK(D > 0 && weight != nullptr) << "D " << D;
  if (M <= 0) return;
  struct Job {
    const IsaKernels* k;
    const float* x;
    std::int64_t D;
    const void* weight;
    DType dtype;
    float eps;
    float* out;
  };
  const Job job{&kernels_for(active_isa()), x, D, weight, weight_dtype, eps, out};
  const Job* j = &job;
  for_rows(pool, M, M * D, [j](std::int64_t m0, std::int64_t m1) {
    for (std::int64_t m = m0; m < m1; ++m) j->k->rms_norm_row(j->x + m * j->D, j->D, j->weight, j->dtype, j->eps, j->out + m * j->D);
  });
}

namespace {

void silu_mul_rows_impl(Isa isa, const float* gate_up, std::int64_t M, std::int64_t F, float* out, ThreadPool* pool) {
  KUN_CHECK(F > 0) << "F " << F;
  if (M <= 0) return;
  struct Job {
    const IsaKernels* k;
    const float* gate_up;
    std::int64_t F;
    float* out;
  };
  const Job job{&kernels_for(isa), gate_up, F, out};
  const Job* j = &job;
  for_rows(pool, M, M * F, [j](std::int64_t m0, std::int64_t m1) {
    for (std::int64_t m = m0; m < m1; ++m) {
      const float* g = j->gate_up + m * 2 * j->F;
      j->k->silu_mul(g, g + j->F, j->F, j->out + m * j->F);
    }
  });
}

}  // namespace

void silu_mul_rows(const float* gate_up, std::int64_t M, std::int64_t F, float* out, ThreadPool* pool) {
  silu_mul_rows_impl(active_isa(), gate_up, M, F, out, pool);
}

bool linear_silu_mul_fuses(const WeightView& gate_up, GemmActivations act) {
  if (act == GemmActivations::kAmx) {
    return gate_up.layout == WeightLayout::kNarrowPanelPairs && gate_up.rows % (2 * kNarrowPanelCols) == 0;
  }
  return gate_up.layout == WeightLayout::kPanelPairs && gate_up.rows % (2 * kPanelCols) == 0;
}

void linear_silu_mul(Isa isa, const float* x, std::int64_t M, const WeightView& gate_up, float* gate_up_out,
                     float* out, ThreadPool* pool, GemmActivations act, const LinearScratch* scratch) {
  KUN_CHECK(gate_up.rows % 2 == 0) << "a gate/up weight has an even number of rows, not " << gate_up.rows;
  if (linear_silu_mul_fuses(gate_up, act)) {
    linear_impl(isa, x, M, gate_up, nullptr, out, false, pool, act, scratch, true);
    return;
  }
  KUN_CHECK(gate_up_out != nullptr) << "linear_silu_mul without fusion needs the [M][2F] buffer";
  linear_impl(isa, x, M, gate_up, nullptr, gate_up_out, false, pool, act, scratch);
  silu_mul_rows_impl(isa, gate_up_out, M, gate_up.rows / 2, out, pool);
}

void linear_silu_mul(const float* x, std::int64_t M, const WeightView& gate_up, float* gate_up_out, float* out,
                     ThreadPool* pool, const LinearScratch* scratch) {
  linear_silu_mul(active_isa(), x, M, gate_up, gate_up_out, out, pool, active_gemm_activations(), scratch);
}

void silu_mul(Isa isa, const float* gate, const float* up, std::int64_t n, float* out) {
  kernels_for(isa).silu_mul(gate, up, n, out);
}
void silu_mul(const float* gate, const float* up, std::int64_t n, float* out) {
  silu_mul(active_isa(), gate, up, n, out);
}

void add_inplace(Isa isa, float* a, const float* b, std::int64_t n) {
  kernels_for(isa).add_inplace(a, b, n);
}
void add_inplace(float* a, const float* b, std::int64_t n) { add_inplace(active_isa(), a, b, n); }

std::int64_t paged_attention_scratch_floats(const ThreadPool* pool, std::int64_t context_len) {
  return (pool != nullptr ? pool->num_threads() : 1) * context_len;
}

void paged_attention(Isa isa, const float* q, std::int64_t num_tokens, std::int64_t num_heads,
                     const std::int64_t* positions, const PagedKvView& kv, float scale, float* out,
                     float* scratch, ThreadPool* pool) {
  if (num_tokens <= 0) return;
  KUN_CHECK(kv.num_kv_heads > 0 && num_heads % kv.num_kv_heads == 0)
      << "num_heads " << num_heads << " num_kv_heads " << kv.num_kv_heads;
  KUN_CHECK(kv.block_size > 0 && kv.head_dim > 0 && scratch != nullptr) << "bad kv view or scratch";
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    KUN_CHECK(positions[t] >= 0 && positions[t] < kv.context_len)
        << "token " << t << " position " << positions[t] << " context_len " << kv.context_len;
  }
  const IsaKernels& k = kernels_for(isa);
  const int parts = pool != nullptr ? pool->num_threads() : 1;
  const AttentionJob job{&k, q, num_tokens, num_heads, positions, &kv, scale, out, scratch, parts};
  const std::int64_t pairs = num_tokens * num_heads;
  if (parts == 1 || pairs == 1) {
    attention_pairs(job, 0, pairs, scratch);
    return;
  }
  const AttentionJob* jp = &job;
  // One index per thread, so each thread knows its scratch slice.
  pool->parallel_for(parts, [jp, pairs](std::int64_t b, std::int64_t e) {
    for (std::int64_t t = b; t < e; ++t) {
      attention_pairs(*jp, pairs * t / jp->parts, pairs * (t + 1) / jp->parts,
                      jp->scratch + t * jp->kv->context_len);
    }
  });
}

void paged_attention(const float* q, std::int64_t num_tokens, std::int64_t num_heads,
                     const std::int64_t* positions, const PagedKvView& kv, float scale, float* out,
                     float* scratch, ThreadPool* pool) {
  paged_attention(active_isa(), q, num_tokens, num_heads, positions, kv, scale, out, scratch, pool);
}

std::int64_t argmax(const float* x, std::int64_t n) {
  KUN_CHECK_GT(n, 0);
  std::int64_t best = 0;
  for (std::int64_t i = 1; i < n; ++i) {
    if (x[i] > x[best]) best = i;
  }
  return best;
}

}  // namespace kun::kernels
