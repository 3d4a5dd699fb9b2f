// AMX level: the bf16 GEMM on Intel AMX tiles (TDPBF16PS, 16 x 16 f32 outputs x 32 bf16 products
// each) for GemmActivations::kAmx, over kNarrowPanelPairs weights (a B tile is 16 k pairs of a
// 16-column panel: 1 KiB, contiguous), and the peak probe of that instruction.
//
// The arithmetic is the hardware's: TDPBF16PS sums each output's 32 bf16 products of one k block
// in a way Intel does not specify bit for bit (it is not the sequential vdpbf16ps order: measured
// in kernels/README.md), so no other table reproduces it. What this file guarantees instead is the
// batch-invariance contract: an output is C = 0, then C = TDPBF16PS(C, x block, W block) for the
// k blocks of 16 pairs in increasing order (an odd K padded with a zero, the last block with zero
// pairs), whatever M, tiling or thread count; a row of a tile never reads another row.
//
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mamx-tile -mamx-bf16; reached only
// after dispatch.cc has checked CPUID and been granted the tile state by the kernel
// (amx_request_permission).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "kernels/internal.h"

namespace kun::kernels::detail {
namespace {

using I64 = std::int64_t;

#include "kernels/bf16_dot.inc"

#include "kernels/amx_tiles.inc"

// Tile registers: C 0..3 (16 x 16 f32); A (16 rows x 16 pairs) in 4, and in 5 for a second row
// tile; B (16 pairs x 16 columns) in 6..7, and in 5 where one row tile leaves it free. All are
// 16 rows x 64 bytes, except that calls of fewer than 16 rows give A and C just their rows.
// a_rows: rows of the A and C tiles (the calls of at most 16 rows configure just their rows).
void configure_gemm_tiles(int a_rows = 16) {
  TileConfig cfg = square_tile_config();
  for (int t = 0; t <= 4; ++t) cfg.rows[t] = static_cast<std::uint8_t>(a_rows);  // C 0..3, A 4
  load_tile_config(cfg);
}

// Rows per tile and pairs per k block.
constexpr I64 kTileRows = 16;
constexpr I64 kBlockPairs = 16;

// Packed activations: bf16, rows padded to a multiple of 16 with zeros, each row kb * 32
// elements plus 32 more (x[m][k] at element m * row_elems + k, zero past K). The extra 64 bytes
// keep a tile's 16 rows off a power-of-two stride (K = 1024: 2048 bytes put all 16 rows of
// both A tiles in the same two L1 sets; the prefill GEMM ran 1.13-1.35x slower).
// (amx_packed_row_elems, internal.h: K rounded up to whole k blocks, plus 32.)
inline I64 packed_row_elems(I64 K) { return amx_packed_row_elems(K); }

void pack_rows_amx(const float* x, I64 M, I64 K, float* xp, I64 t0, I64 t1, bool /*bf16_act*/) {
  const I64 row_elems = packed_row_elems(K);
  auto* out = reinterpret_cast<std::uint16_t*>(xp);
  for (I64 t = t0; t < t1; ++t) {
    for (I64 i = 0; i < kTileRows; ++i) {
      const I64 m = t * kTileRows + i;
      std::uint16_t* row = out + m * row_elems;
      if (m >= M) {
        // Calls of fewer than 16 rows configure their tiles with just their rows, so only the
        // two-row-tile calls read (zero) padding rows.
        if (M > kTileRows) std::memset(row, 0, static_cast<std::size_t>(row_elems) * 2);
        continue;
      }
      const float* src = x + m * K;
      I64 k = 0;
      for (; k + 16 <= K; k += 16) {
        // Vector rounding: subnormals to signed zero first (act_to_bf16's rule), then
        // vcvtneps2bf16 (round to nearest even, NaN stays NaN): the same bits as act_to_bf16.
        const __m256bh h = _mm512_cvtneps_pbh(flush_subnormals(_mm512_loadu_ps(src + k)));
        std::memcpy(row + k, &h, 32);
      }
      for (; k < K; ++k) row[k] = act_to_bf16(src[k]);
      for (; k < row_elems; ++k) row[k] = 0;
    }
  }
}

// Stores the lanes mk of v at y: with `streaming`, a whole line (16 lanes, 64-byte aligned) goes
// out with a non-temporal store (no read for ownership; panels_amx's closing SFENCE orders it),
// anything else with an ordinary masked store.
inline void store_outputs(float* y, __m512 v, __mmask16 mk, bool streaming) {
  if (streaming && mk == 0xffff && (reinterpret_cast<std::uintptr_t>(y) & 63) == 0) {
    _mm512_stream_ps(y, v);
  } else {
    _mm512_mask_storeu_ps(y, mk, v);
  }
}

// y[m][n0 + c] for the `rows` valid rows and `cols` valid columns of a stash of 16 rows x 64 f32
// (column c at stash[i * 64 + c]): dot + bias, stored (store_outputs) or added to y.
void epilogue(const float* stash, I64 rows, I64 cols, const float* bias, float* y, I64 ldy,
              bool accumulate, bool streaming) {
  for (I64 i = 0; i < rows; ++i) {
    float* yr = y + i * ldy;
    const float* sr = stash + i * 64;
    for (I64 c = 0; c < cols; c += 16) {
      const __mmask16 mk = lane_mask16(cols - c);
      __m512 v = _mm512_maskz_loadu_ps(mk, sr + c);
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + c));
      if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, yr + c), v);
      store_outputs(yr + c, v, mk, streaming && !accumulate);
    }
  }
}

// Where the B tile of k block kb of a narrow panel (kNarrowPanelPairs: [pairs][width][2], width
// <= 16 columns) comes from, 64 bytes a pair either way: straight from the panel, 1 KiB
// contiguous, when the block has 16 pairs and the panel 16 columns, else a zero-padded copy in
// `tail` (16 pairs x 16 columns).
const std::uint16_t* b_source(const std::uint16_t* panel, I64 width, I64 pairs, I64 kb, std::uint16_t* tail) {
  const I64 p0 = kb * kBlockPairs;
  const I64 np = pairs - p0 < kBlockPairs ? pairs - p0 : kBlockPairs;
  const std::uint16_t* src = panel + p0 * width * 2;
  if (np == kBlockPairs && width == kNarrowPanelCols) return src;
  memory_barrier();  // the previous TILELOADD of the tail before these stores
  std::memset(tail, 0, kBlockPairs * 64);
  for (I64 r = 0; r < np; ++r) std::memcpy(tail + r * 32, src + r * width * 2, static_cast<std::size_t>(width) * 4);
  memory_barrier();  // these stores before the TILELOADD that reads them
  return tail;
}

// Reads the 16 lines of a B tile with vector loads right before its TILELOADD. A TILELOADD that
// misses holds up the TDPBF16PS behind it, and a tile register is not renamed, so the next
// block's TILELOADD waits as well: tile loads alone keep few lines in flight. Vector loads issue
// out of order, run ahead of the waiting tile instructions into the next blocks, and train the
// hardware prefetchers, so the lines are in L1 when the tile loads come. Summing them into one
// register (and handing that to an empty asm) keeps the loads from being dropped; the sum is not
// used. It replaced a prefetch of every line 4 KiB ahead into L1: on a loop over one llama-350m
// decode step's linear calls (2 threads, weights on huge pages), M = 1 went from 0.85-0.87 to
// 0.92-0.99 of the read probe (1.09-1.11x) and M = 8 1.09-1.15x; the variants tried (with the
// prefetch kept, an L2 prefetch, every 2nd or 4th line, the next block) are in kernels/README.md,
// "GEMM on AMX tiles".
inline void touch_tile_lines(const std::uint16_t* block) {
  const auto* f = reinterpret_cast<const float*>(block);
  __m512 sum = _mm512_setzero_ps();
  for (int l = 0; l < 16; ++l) sum = _mm512_add_ps(sum, _mm512_load_ps(f + 16 * l));
  __asm__ volatile("" ::"v"(sum));
}

// Up to 4 narrow panels that one row tile (or a 2 x 2 pass, 2 of them) reads side by side, C tile
// g accumulating panel g. A plain call's unit is the narrow panels of kPanelCols consecutive output
// columns (the last narrower, or fewer, where the matrix ends); a fused gate/up unit (silu_mul) is
// the gate panels of some columns followed by the up panels of the same columns.
struct Unit {
  const std::uint16_t* panels[4] = {};
  I64 widths[4] = {};
  I64 groups = 0;  // narrow panels in the unit
  I64 width = 0;   // columns of all of them
  const std::uint16_t* panel(I64 g) const { return panels[g]; }
  I64 panel_width(I64 g) const { return widths[g]; }
  // Appends the narrow panels of weight rows [n0, n0 + cols), n0 a multiple of 16 (a narrow
  // panel of rows n0.. starts at element n0 * Kp, the last one as narrow as the rows left).
  void add_rows(const std::uint16_t* wbase, I64 Kp, I64 n0, I64 cols) {
    for (I64 c = 0; c < cols; c += kNarrowPanelCols) {
      panels[groups] = wbase + (n0 + c) * Kp;
      widths[groups] = cols - c < kNarrowPanelCols ? cols - c : kNarrowPanelCols;
      width += widths[groups];
      ++groups;
    }
  }
  bool full_panels() const {
    for (I64 g = 0; g < groups; ++g) {
      if (widths[g] != kNarrowPanelCols) return false;
    }
    return true;
  }
};

using SiluMul = void (*)(const float* gate, const float* up, I64 n, float* out);

// Where the outputs of a call go. Plain (silu_mul null): y[m][c] = the product (+ bias[c]), or
// added to y. Fused: the unit's first half of columns are gate, the second up, and y[m][c] =
// silu_mul(gate, up) by the ISA's own silu_mul function (so the bits of linear followed by
// silu_mul_rows).
struct Sink {
  const float* bias = nullptr;
  float* y = nullptr;
  I64 ldy = 0;
  bool accumulate = false;
  SiluMul silu_mul = nullptr;
  // Outputs that are not added to go out with non-temporal stores (store_outputs); panels_amx
  // sets it.
  bool streaming = false;
  // The first `rows` rows of a stash (16 x 64 f32 a row tile) holding a unit's `cols` columns
  // (up from column up_col when fused), into the outputs from y_rows on (bias from bias_cols).
  void write(const float* stash, I64 rows, I64 cols, I64 up_col, float* y_rows, const float* bias_cols) const {
    if (silu_mul == nullptr) {
      epilogue(stash, rows, cols, bias_cols, y_rows, ldy, accumulate, streaming);
      return;
    }
    // Streaming: each row's silu_mul goes to `row` first, then out by store_outputs.
    alignas(64) float row[32];  // a unit's silu_mul outputs of one row (cols / 2 <= 32)
    for (I64 i = 0; i < rows; ++i) {
      float* yr = y_rows + i * ldy;
      silu_mul(stash + i * 64, stash + i * 64 + up_col, cols / 2, streaming ? row : yr);
      if (!streaming) continue;
      for (I64 c = 0; c < cols / 2; c += 16) store_outputs(yr + c, _mm512_load_ps(row + c), lane_mask16(cols / 2 - c), true);
    }
  }
};

// One row tile (M <= 16) against a unit: C tile g accumulates narrow panel g, so per k block the
// call reads 4 separate 1 KiB runs, 4 streams for the prefetchers (the kPanelPairs layout gave
// them one: 0.74 of the read probe at batch 1).
void unit_one_row_tile(const std::uint16_t* xp, I64 row_elems, I64 rows, const Unit& u, I64 pairs,
                       I64 blocks, const Sink& sink, float* y, const float* bias, float* stash,
                       std::uint16_t* tail) {
  const bool full = u.groups == 4 && u.full_panels() && pairs % kBlockPairs == 0;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const I64 a_stride = row_elems * 2;
  if (full) {
    const std::uint16_t* b0 = u.panel(0);
    const std::uint16_t* b1 = u.panel(1);
    const std::uint16_t* b2 = u.panel(2);
    const std::uint16_t* b3 = u.panel(3);
    for (I64 kb = 0; kb < blocks; ++kb) {
      const I64 off = kb * kBlockPairs * 32;
      touch_tile_lines(b0 + off);
      touch_tile_lines(b1 + off);
      touch_tile_lines(b2 + off);
      touch_tile_lines(b3 + off);
      _tile_loadd(4, xp + kb * 32, a_stride);
      _tile_loadd(5, b0 + off, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, b1 + off, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, b2 + off, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, b3 + off, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  } else {
    // A narrow last panel or a partial k block: each panel's tile from b_source (the tail buffer
    // is rewritten per panel, so each load completes before the next copy).
    for (I64 kb = 0; kb < blocks; ++kb) {
      _tile_loadd(4, xp + kb * 32, a_stride);
      for (I64 g = 0; g < u.groups; ++g) {
        _tile_loadd(5, b_source(u.panel(g), u.panel_width(g), pairs, kb, tail), 64);
        switch (g) {
          case 0: _tile_dpbf16ps(0, 4, 5); break;
          case 1: _tile_dpbf16ps(1, 4, 5); break;
          case 2: _tile_dpbf16ps(2, 4, 5); break;
          default: _tile_dpbf16ps(3, 4, 5); break;
        }
      }
    }
  }
  _tile_stored(0, stash, 256);
  _tile_stored(1, stash + 16, 256);
  _tile_stored(2, stash + 32, 256);
  _tile_stored(3, stash + 48, 256);
  sink.write(stash, rows, u.width, 16 * (u.groups / 2), y, bias);
}

// Weights to fetch into L2 ahead of their pass: the panels right after those of the current
// passes (plain: the next pair in memory, the unit's next or the next unit's first; fused: the
// next gate panel and the next up panel), a few lines per k block by the passes that read their
// own panels from L2, so the next pass pair's first pass finds its B tiles in L2 rather than
// memory. In a stand-alone loop of a 512-row gate/up projection with the weights out of cache:
// 1.10x (kernels/README.md, "Row blocks and the next panels").
struct NextPanels {
  const char* next[2] = {};
  const char* end[2] = {};
  I64 lines_per_block = 0;
  // Sets range r to elements [from, from + elems) of the weight at w, cut at element limit.
  void set(int r, const std::uint16_t* w, I64 from, I64 elems, I64 limit) {
    const I64 to = from + elems < limit ? from + elems : limit;
    next[r] = reinterpret_cast<const char*>(w + (from < limit ? from : limit));
    end[r] = reinterpret_cast<const char*>(w + (from < to ? to : (from < limit ? from : limit)));
  }
  // Spreads the ranges over `passes` passes of `blocks` k blocks.
  void spread(I64 passes, I64 blocks) {
    const I64 lines = (end[0] - next[0] + end[1] - next[1] + 63) / 64;
    lines_per_block = passes > 0 ? (lines + passes * blocks - 1) / (passes * blocks) : 0;
  }
  void fetch() {
    for (I64 l = 0; l < lines_per_block; ++l) {
      const int r = next[0] < end[0] ? 0 : 1;
      if (next[r] >= end[r]) return;
      _mm_prefetch(next[r], _MM_HINT_T1);
      next[r] += 64;
    }
  }
};

// The output rows of the next pass, fetched for writing a few rows per k block, so that the
// epilogue's stores find their lines in cache instead of waiting on memory with the tile loads.
struct NextOutputs {
  const float* row = nullptr;
  I64 ldy = 0;
  I64 rows = 0;
  I64 rows_per_block = 0;
  I64 cols = 0;
  void fetch() {
    for (I64 r = 0; r < rows_per_block && rows > 0; ++r, --rows, row += ldy) {
      for (I64 c = 0; c < cols; c += 16) __builtin_prefetch(row + c, 1, 3);
    }
  }
};

// The k loop of unit_block_2x2 into C tiles 0..3. kFromMemory: the pass whose B tiles come from
// DRAM reads each tile's lines with vector loads first and runs each product right after the
// loads it needs (A0, B0, dp, B1, dp, A1, dp, dp), so the first TDPBF16PS waits for one A and one
// B tile rather than all four; later passes, whose B is in L2, load all four first. Either way
// every C tile gets the same products in the same order, so the same bits. llama-350m
// model_bench, 6 alternated pairs: prefill 1.02-1.11x (median 1.06x), batch-32 decode median
// 1.02x (0.93-1.07x); the interleaved order in every row pass made prefill 1.07x slower, and
// choosing the order at run time inside the loop cost about 2 % of prefill. (The tail buffer of
// b_source is rewritten per panel, so each tile load precedes the next copy.)
template <bool kFromMemory>
void block_2x2_products(const std::uint16_t* xp, const std::uint16_t* a1, I64 a_stride, const Unit& u, I64 pairs,
                        I64 blocks, bool direct, bool two_rows, bool two_groups, std::uint16_t* tail,
                        NextPanels* ahead, NextOutputs* outputs) {
  const std::uint16_t* p0 = u.panel(0);
  const std::uint16_t* p1 = u.panel(two_groups ? 1 : 0);
  for (I64 kb = 0; kb < blocks; ++kb) {
    const I64 off = kb * kBlockPairs * 32;
    if constexpr (!kFromMemory) ahead->fetch();
    outputs->fetch();
    if (kFromMemory && direct) {
      touch_tile_lines(p0 + off);
      touch_tile_lines(p1 + off);
    }
    _tile_loadd(4, xp + kb * 32, a_stride);
    if (!kFromMemory && two_rows) _tile_loadd(5, a1 + kb * 32, a_stride);
    _tile_loadd(6, direct ? p0 + off : b_source(p0, u.panel_width(0), pairs, kb, tail), 64);
    if constexpr (kFromMemory) _tile_dpbf16ps(0, 4, 6);
    if (two_groups) {
      _tile_loadd(7, direct ? p1 + off : b_source(p1, u.panel_width(1), pairs, kb, tail), 64);
      if constexpr (kFromMemory) _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (kFromMemory) {
      if (two_rows) _tile_loadd(5, a1 + kb * 32, a_stride);
    } else {
      _tile_dpbf16ps(0, 4, 6);
      if (two_groups) _tile_dpbf16ps(1, 4, 7);
    }
    if (two_rows) {
      _tile_dpbf16ps(2, 5, 6);
      if (two_groups) _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// Up to two row tiles x a unit of up to two narrow panels (32 x 32 outputs) over every k block;
// fewer rows or a single panel run one of each. Each panel is one stream, read once per call of
// up to 32 rows. from_memory: the first pass over the panels, whose B tiles come from DRAM
// (touch_tile_lines: M = 32 decode GEMMs 1.06-1.10x); later row passes find them in L2
// (touching them there made prefill slower).
void unit_block_2x2(const std::uint16_t* xp, I64 row_elems, I64 rows, const Unit& u, I64 pairs,
                    I64 blocks, const Sink& sink, float* y, const float* bias, float* stash,
                    std::uint16_t* tail, bool from_memory, NextPanels* ahead, NextOutputs* outputs) {
  const I64 a_stride = row_elems * 2;
  const bool two_rows = rows > kTileRows;
  const bool two_groups = u.groups > 1;
  const bool direct = pairs % kBlockPairs == 0 && u.full_panels();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const std::uint16_t* a1 = xp + kTileRows * row_elems;
  if (from_memory) {
    block_2x2_products<true>(xp, a1, a_stride, u, pairs, blocks, direct, two_rows, two_groups, tail, ahead, outputs);
  } else {
    block_2x2_products<false>(xp, a1, a_stride, u, pairs, blocks, direct, two_rows, two_groups, tail, ahead, outputs);
  }
  _tile_stored(0, stash, 256);
  if (two_groups) _tile_stored(1, stash + 16, 256);
  sink.write(stash, rows < kTileRows ? rows : kTileRows, u.width, 16, y, bias);
  if (two_rows) {
    _tile_stored(2, stash, 256);
    if (two_groups) _tile_stored(3, stash + 16, 256);
    sink.write(stash, rows - kTileRows, u.width, 16, y + kTileRows * sink.ldy, bias);
  }
}

// Rows [0, M) of the packed activations against units [p0, p1) of kPanelCols output columns
// (fused: of gate columns, the weight's first N / 2 rows; the up columns are the rest) of a
// kNarrowPanelPairs weight, into the sink.
void panels_amx(const float* xpf, I64 M, const WeightView& w, I64 p0, I64 p1, Sink sink, float* scratch) {
  const auto* xp = reinterpret_cast<const std::uint16_t*>(xpf);
  const I64 N = w.rows;
  const I64 K = w.cols;
  const I64 Kp = K + (K & 1);
  const I64 pairs = Kp / 2;
  const I64 blocks = (pairs + kBlockPairs - 1) / kBlockPairs;
  const I64 row_elems = packed_row_elems(K);
  const bool fused = sink.silu_mul != nullptr;
  // Output columns: N, or the F gate columns of a fused call (up: rows F .. 2F of the weight).
  const I64 F = fused ? N / 2 : N;
  // Scratch (linear_panels_scratch_floats(M) >= 128 x 64 floats): a 32 x 64 f32 stash and a B
  // tail tile (16 x 32 bf16).
  float* stash = scratch;
  auto* tail = reinterpret_cast<std::uint16_t*>(scratch + 2 * kTileRows * 64);
  const auto* wbase = static_cast<const std::uint16_t*>(w.data);
  const I64 panel_elems = kNarrowPanelCols * Kp;
  // Calls of fewer than 16 rows configure A and C with just their rows (a row's value does not
  // depend on it; TDPBF16PS does less work): 0.86-0.875 of the read probe at M = 1 against
  // 0.83-0.85 with 16.
  configure_gemm_tiles(M < kTileRows ? static_cast<int>(M) : static_cast<int>(kTileRows));
  // 17-32 rows (a batched decode step: one pass of two row tiles reads the weights once) write
  // their outputs with non-temporal stores. The output rows were last written a layer ago and are
  // out of L2, so each ordinary store first read its line, and the pass waited on those reads.
  // Measured (llama-350m, batch 32, 2 threads, alternated): decode_breakdown's linear calls
  // 0.70-0.73 -> 0.76-0.79 of the read probe (qkv 0.69 -> 0.81, lm_head 0.73 -> 0.87, gate_up +
  // silu 0.73 -> 0.79-0.83). The whole step gains little, since the next operation reads those
  // outputs back from memory: model_bench batch 32 tokens/s 0.93-1.08x, median 1.02x, in 8
  // alternated pairs (kernels/README.md). At 16 rows or fewer it bought nothing at batch 8 and
  // made batch 1 slower (0.81 against 0.91 in 2 of 3 runs), and prefill's next operation reads
  // its outputs right back.
  sink.streaming = M > kTileRows && M <= 2 * kTileRows;
  const I64 passes = (M + 2 * kTileRows - 1) / (2 * kTileRows);
  for (I64 p = p0; p < p1; ++p) {
    const I64 n0 = p * kPanelCols;
    const I64 width = F - n0 < kPanelCols ? F - n0 : kPanelCols;
    if (M <= kTileRows) {
      if (!fused) {
        Unit u;
        u.add_rows(wbase, Kp, n0, width);
        unit_one_row_tile(xp, row_elems, M, u, pairs, blocks, sink, sink.y + n0,
                          sink.bias != nullptr ? sink.bias + n0 : nullptr, stash, tail);
        continue;
      }
      // Fused: 32 gate columns and their 32 up columns at a time (4 streams, as plain).
      for (I64 c0 = n0; c0 < n0 + width; c0 += 2 * kNarrowPanelCols) {
        const I64 cols = n0 + width - c0 < 2 * kNarrowPanelCols ? n0 + width - c0 : 2 * kNarrowPanelCols;
        Unit u;
        u.add_rows(wbase, Kp, c0, cols);
        u.add_rows(wbase, Kp, F + c0, cols);
        unit_one_row_tile(xp, row_elems, M, u, pairs, blocks, sink, sink.y + c0, nullptr, stash, tail);
      }
      continue;
    }
    // Passes of 2 row tiles over a unit of 2 narrow panels: consecutive ones (plain), or a gate
    // panel and its up panel (fused).
    const I64 step = fused ? kNarrowPanelCols : 2 * kNarrowPanelCols;
    for (I64 c0 = n0; c0 < n0 + width; c0 += step) {
      const I64 cols = n0 + width - c0 < step ? n0 + width - c0 : step;
      Unit u;
      u.add_rows(wbase, Kp, c0, cols);
      if (fused) u.add_rows(wbase, Kp, F + c0, cols);
      NextPanels ahead;
      if (fused) {
        ahead.set(0, wbase, (c0 + kNarrowPanelCols) * Kp, panel_elems, F * Kp);
        ahead.set(1, wbase, (F + c0 + kNarrowPanelCols) * Kp, panel_elems, N * Kp);
      } else {
        ahead.set(0, wbase, (c0 + step) * Kp, 2 * panel_elems, N * Kp);
      }
      ahead.spread(passes - 1, blocks);
      const float* bias = sink.bias != nullptr ? sink.bias + c0 : nullptr;
      for (I64 m0 = 0; m0 < M; m0 += 2 * kTileRows) {
        const I64 rows = M - m0 < 2 * kTileRows ? M - m0 : 2 * kTileRows;
        float* y = sink.y + m0 * sink.ldy + c0;
        NextOutputs outputs;
        if (m0 + rows < M) {
          outputs.row = y + rows * sink.ldy;
          outputs.ldy = sink.ldy;
          outputs.rows = M - m0 - rows < 2 * kTileRows ? M - m0 - rows : 2 * kTileRows;
          outputs.rows_per_block = (outputs.rows + blocks - 1) / blocks;
          outputs.cols = cols;
        }
        unit_block_2x2(xp + m0 * row_elems, row_elems, rows, u, pairs, blocks, sink, y, bias, stash, tail,
                       m0 == 0, &ahead, &outputs);
      }
    }
  }
  if (sink.streaming) _mm_sfence();  // the non-temporal stores before the caller's hand-off
  _tile_release();
}

// Units [p0, p1) of kPanelCols output columns of a kNarrowPanelPairs weight (IsaKernels::linear_panels).
void linear_panels_amx(const float* xpf, I64 M, const WeightView& w, I64 p0, I64 p1,
                       const float* bias, float* y, bool accumulate, float* scratch,
                       bool /*bf16_act*/) {
  Sink sink;
  sink.bias = bias;
  sink.y = y;
  sink.ldy = w.rows;
  sink.accumulate = accumulate;
  panels_amx(xpf, M, w, p0, p1, sink, scratch);
}

// silu_mul of the gate and up products (the weight's rows [0, F) and [F, 2F), F a multiple of 16)
// for units [p0, p1) of kPanelCols gate columns, into out ([M][F]).
void linear_panels_silu_mul_amx(const float* xpf, I64 M, const WeightView& w, I64 p0, I64 p1,
                                SiluMul silu_mul, float* out, float* scratch) {
  Sink sink;
  sink.y = out;
  sink.ldy = w.rows / 2;
  sink.silu_mul = silu_mul;
  panels_amx(xpf, M, w, p0, p1, sink, scratch);
}

// Peak probe: 4 independent accumulator tiles, A and B reloaded never (register-resident).
double amx_dot_chains_impl(I64 iters, float seed, float* sink) {
  configure_gemm_tiles();
  alignas(64) std::uint16_t a[16 * 32];
  alignas(64) float c[16 * 16];
  const std::uint16_t one = act_to_bf16(seed);
  for (auto& v : a) v = one;
  memory_barrier();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a, 64);
  _tile_loadd(6, a, 64);
  _tile_loadd(7, a, 64);
  for (I64 i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  _tile_release();
  *sink = c[0];
  return static_cast<double>(iters) * 4.0 * 16.0 * 16.0 * 32.0 * 2.0;
}

}  // namespace

AmxGemm amx_gemm() { return AmxGemm{linear_panels_amx, pack_rows_amx, linear_panels_silu_mul_amx}; }

double amx_dot_chains(std::int64_t iters, float seed, float* sink) {
  return amx_dot_chains_impl(iters, seed, sink);
}

bool amx_request_permission() {
  // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): Linux 5.16+ enables the tile
  // data state per process only on request.
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

}  // namespace kun::kernels::detail
