// AVX-512-BF16 level: the kPanelPairs GEMM on vdpbf16ps (bf16 pairs multiplied and accumulated
// in f32, 32 products per instruction) and the peak probe of that instruction. The arithmetic is
// bf16_dot.inc's, which the FMA emulation of every other table reproduces bit for bit, so which
// table a call uses never changes a value. Compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512bf16; only reached through kernels_for(kAvx512Bf16) after the runtime check.
// GCC 12 reports its own _mm512_undefined_* placeholders as uninitialized (false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <cstring>

#include "kernels/internal.h"

namespace kun::kernels::detail {
namespace {

using I64 = std::int64_t;

#include "kernels/bf16_dot.inc"
#include "kernels/avx512_bf16_round.inc"

inline I64 min_i64(I64 a, I64 b) { return a < b ? a : b; }

// Register tile: kDpRows activation rows x 64 columns (4 zmm) = 24 accumulators, plus 4 weight
// vectors and a broadcast, of the 32 zmm registers.
constexpr int kDpRows = 6;
// k pairs per cache block of a panel (calls with more than one row tile), which every row tile
// of the call reads from L1 after the first one brought it in: 128 pairs (64 columns x 256 k x 2
// bytes = 32 KiB) from 3 tiles up (13 rows and more), where the call is bound by vdpbf16ps and
// a block's partial sums are parked and reloaded once per tile; 32 pairs (8 KiB) for 2 tiles
// (7-12 rows), where the call streams its weights from DRAM: there the first tile also prefetches
// kDpStreamPairs ahead into L1, as the one-tile path does, and with 32 KiB blocks that stream
// evicted the block the second tile was about to read (48 KiB L1 on the Zen 5 host).
// Measured (decode_breakdown, llama-350m, 2 threads, Zen 5, alternated runs at a 53-55 GB/s read
// probe): batch 8 linear calls 16.1-16.2 ms with 128-pair blocks and no stream, 14.3-14.4 ms
// with 32-pair blocks and the stream.
constexpr I64 kDpKcPairs = 128;
constexpr I64 kDpKcPairsStreaming = 32;
constexpr I64 kDpStreamPairs = 64;

inline __mmask16 col_mask(I64 n) {
  if (n >= 16) return static_cast<__mmask16>(0xffff);
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1u);
}

// Activations for linear_panels: bf16 pairs (x[m][2j] low half, x[m][2j + 1] high half, zero
// past K) as 32-bit words, tile-major: tile t (rows kDpRows t ..) holds pair j of row i at
// word [t * kDpRows * kh + j * kDpRows + i] (kh = K / 2 rounded up); rows past M are zero.
// 16 elements of a row are rounded at once (8 pair words), then written to their strided slots;
// the scalar rounding of every element before was 5 % of the linear calls' time in a prefill.
void pack_rows_dp(const float* x, I64 M, I64 K, float* xp, I64 t0, I64 t1, bool /*bf16_act*/) {
  const I64 kh = (K + 1) / 2;
  auto* out_base = reinterpret_cast<std::uint32_t*>(xp);
  for (I64 t = t0; t < t1; ++t) {
    std::uint32_t* out = out_base + t * kDpRows * kh;
    for (int i = 0; i < kDpRows; ++i) {
      const I64 m = t * kDpRows + i;
      if (m >= M) {
        for (I64 j = 0; j < kh; ++j) out[j * kDpRows + i] = 0;
        continue;
      }
      const float* src = x + m * K;
      I64 k = 0;
      std::uint32_t words[8];
      for (; k + 16 <= K; k += 16) {
        const __m256bh h = _mm512_cvtneps_pbh(flush_subnormals(_mm512_loadu_ps(src + k)));
        std::memcpy(words, &h, sizeof words);
        std::uint32_t* o = out + (k / 2) * kDpRows + i;
#pragma GCC unroll 8
        for (int w = 0; w < 8; ++w) o[w * kDpRows] = words[w];
      }
      for (; k + 2 <= K; k += 2) {
        out[(k / 2) * kDpRows + i] = static_cast<std::uint32_t>(act_to_bf16(src[k])) |
                                     (static_cast<std::uint32_t>(act_to_bf16(src[k + 1])) << 16);
      }
      if (K & 1) out[(kh - 1) * kDpRows + i] = act_to_bf16(src[K - 1]);
    }
  }
}

// MR rows x 64 columns over pairs [0, npairs) of a block: xt is the tile's pair words at the
// block's first pair (stride kDpRows per pair), wr the panel's pair row at that pair (2 * width
// bf16 per pair). first: start from zero, else from `part` (stride kPanelCols); last: write
// y (+ bias, + y for accumulate), else the partials back to `part`. kTail: the panel is
// narrower than 64 columns (`width`), masked loads and stores. prefetch_pairs > 0: prefetch
// the weights that many pairs ahead into L1 (streaming calls); x_next: the next tile's pairs for
// this block (prefetched), or null. pf: pf_lines cache lines prefetched into L2, pf_per_pair of
// them in each pair iteration (the next k block's share of this tile; 0 lines: none).
template <int MR, bool kTail>
void dp_tile(const std::uint32_t* xt, const std::uint32_t* x_next, const std::uint16_t* wr,
             I64 width, I64 npairs, bool first, bool last, float* part, const float* bias,
             float* y, I64 ldy, bool accumulate, I64 prefetch_pairs, const char* pf, I64 pf_lines,
             I64 pf_per_pair) {
  __m512 acc[MR][4];
  __mmask16 mk[4] = {0xffff, 0xffff, 0xffff, 0xffff};
  if constexpr (kTail) {
    for (int v = 0; v < 4; ++v) mk[v] = col_mask(width - 16 * v);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      acc[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + i * kPanelCols + 16 * v);
    }
  }
  const I64 stride = 2 * width;  // bf16 per pair row
  for (I64 j = 0; j < npairs; ++j) {
    const std::uint16_t* row = wr + j * stride;
    if (prefetch_pairs > 0) {
      const char* ahead = reinterpret_cast<const char*>(row + prefetch_pairs * stride);
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
      _mm_prefetch(ahead + 128, _MM_HINT_T0);
      _mm_prefetch(ahead + 192, _MM_HINT_T0);
    } else if (x_next != nullptr && (j & 1) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(x_next + j * kDpRows), _MM_HINT_T0);
    }
    for (I64 l = j * pf_per_pair; l < (j + 1) * pf_per_pair && l < pf_lines; ++l) {
      _mm_prefetch(pf + l * 64, _MM_HINT_T1);
    }
    __m512i w[4];
    if constexpr (kTail) {
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) w[v] = _mm512_maskz_loadu_epi32(mk[v], row + 32 * v);
    } else {
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) w[v] = _mm512_loadu_si512(row + 32 * v);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(xt[j * kDpRows + i]));
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)w[v],
                                     (__m512bh)xb);
      }
    }
  }
  if (!last) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) _mm512_storeu_ps(part + i * kPanelCols + 16 * v, acc[i][v]);
    }
    return;
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      __m512 r = acc[i][v];
      float* yo = y + i * ldy + 16 * v;
      if (bias != nullptr) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mk[v], bias + 16 * v));
      if (accumulate) r = _mm512_add_ps(_mm512_maskz_loadu_ps(mk[v], yo), r);
      _mm512_mask_storeu_ps(yo, mk[v], r);
    }
  }
}

using DpTileFn = void (*)(const std::uint32_t*, const std::uint32_t*, const std::uint16_t*, I64,
                          I64, bool, bool, float*, const float*, float*, I64, bool, I64,
                          const char*, I64, I64);
constexpr DpTileFn kDpTiles[kDpRows][2] = {
    {&dp_tile<1, false>, &dp_tile<1, true>}, {&dp_tile<2, false>, &dp_tile<2, true>},
    {&dp_tile<3, false>, &dp_tile<3, true>}, {&dp_tile<4, false>, &dp_tile<4, true>},
    {&dp_tile<5, false>, &dp_tile<5, true>}, {&dp_tile<6, false>, &dp_tile<6, true>}};

// One row tile (M <= kDpRows, decode and small batches): each panel streamed once over all K,
// no partial sums, weights prefetched 64 pairs (16 KiB) ahead. More tiles: panels in k blocks
// of kDpKcPairs, each block reused from L1 by every tile, partials parked in `scratch`.
void linear_panels_dp(const float* xp, I64 M, const WeightView& w, I64 p0, I64 p1,
                      const float* bias, float* y, bool accumulate, float* scratch,
                      bool /*bf16_act: always, see avx512bf16_kernels*/) {
  // vdpbf16ps ignores MXCSR; the epilogue's adds (bias, linear_add) run under the same
  // DAZ|FTZ mode as the other tables' so that they match bit for bit there too.
  const unsigned saved_csr = _mm_getcsr();
  _mm_setcsr(saved_csr | kMxcsrFtzDaz);
  const I64 K = w.cols;
  const I64 kp = K + (K & 1);
  const I64 kh = kp / 2;
  const I64 N = w.rows;
  const auto* wbase = static_cast<const std::uint16_t*>(w.data);
  const auto* x32 = reinterpret_cast<const std::uint32_t*>(xp);
  const I64 tiles = (M + kDpRows - 1) / kDpRows;
  float* part = scratch;
  for (I64 p = p0; p < p1; ++p) {
    const I64 n0 = p * kPanelCols;
    const I64 width = min_i64(kPanelCols, N - n0);
    const int tail = width < kPanelCols ? 1 : 0;
    const std::uint16_t* panel = wbase + n0 * kp;
    const float* b = bias != nullptr ? bias + n0 : nullptr;
    if (tiles == 1) {
      kDpTiles[M - 1][tail](x32, nullptr, panel, width, kh, true, true, part, b, y + n0, N,
                            accumulate, kDpStreamPairs, nullptr, 0, 0);
      continue;
    }
    const bool streaming = tiles <= 2;
    const I64 kc = streaming ? kDpKcPairsStreaming : kDpKcPairs;
    for (I64 j0 = 0; j0 < kh; j0 += kc) {
      const I64 nj = min_i64(kc, kh - j0);
      const bool first = j0 == 0;
      const bool last = j0 + nj >= kh;
      const std::uint16_t* wr = panel + j0 * 2 * width;
      // The next block's weights (this panel's next pairs, or the next panel) prefetched into
      // L2, its lines spread evenly over every tile's pair loop: a burst of all of a tile's
      // lines before its loop (the code before) held the loop up behind the misses; spread, the
      // batch-32 linear calls went from 31.3-32.5 to 24.8 ms (decode_breakdown, 2 threads, Zen 5,
      // alternated runs, two each).
      const I64 block_lines = (nj * width * 4 + 63) / 64;
      const I64 per_tile = (block_lines + tiles - 1) / tiles;
      const I64 per_pair = (per_tile + nj - 1) / nj;
      const char* next = reinterpret_cast<const char*>(wr + nj * 2 * width);
      for (I64 t = 0; t < tiles; ++t) {
        const I64 m = t * kDpRows;
        const I64 mr = min_i64(kDpRows, M - m);
        const I64 l0 = min_i64(t * per_tile, block_lines);
        const I64 nl = min_i64(per_tile, block_lines - l0);
        const std::uint32_t* xt = x32 + t * kDpRows * kh + j0 * kDpRows;
        const std::uint32_t* xn = t + 1 < tiles ? xt + kDpRows * kh : nullptr;
        kDpTiles[mr - 1][tail](xt, xn, wr, width, nj, first, last, part + m * kPanelCols, b,
                               y + m * N + n0, N, accumulate,
                               streaming && t == 0 ? kDpStreamPairs : 0, next + l0 * 64, nl,
                               per_pair);
      }
    }
  }
  _mm_setcsr(saved_csr);
}

}  // namespace

double avx512bf16_dot_chains(std::int64_t iters, float seed, float* sink) {
  constexpr int kChains = 12;
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(seed + 0.001f * static_cast<float>(c));
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(-1e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f));
  for (std::int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  }
  __m512 s = acc[0];
  for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
  *sink = _mm512_reduce_add_ps(s);
  // 32 bf16 products and 32 additions per instruction.
  return static_cast<double>(iters) * kChains * 64.0;
}

const IsaKernels& avx512bf16_kernels() {
  static const IsaKernels k = [] {
    IsaKernels t = avx512_kernels();
    t.isa = Isa::kAvx512Bf16;
    t.linear_panels = &linear_panels_dp;
    t.pack_rows = &pack_rows_dp;
    t.widen_min_rows = 1;  // one layout for every M: tiles of kDpRows pair rows
    t.tile_rows = kDpRows;
    t.direct_tile_rows = kDpRows;
    return t;
  }();
  return k;
}

}  // namespace kun::kernels::detail
