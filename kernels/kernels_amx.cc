// AMX level: the kPanelPairs GEMM on Intel AMX tiles (TDPBF16PS, 16 x 16 f32 outputs x 32 bf16
// products each) for GemmActivations::kAmx, and the peak probe of that instruction.
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

// Tile registers: C 0..3 (16 x 16 f32); A (16 rows x 16 pairs) in 4, and in 5 for a second row
// tile; B (16 pairs x 16 columns) in 6..7, and in 5 where one row tile leaves it free. All are
// 16 rows x 64 bytes, except that calls of fewer than 16 rows give A and C just their rows.
struct alignas(64) TileConfig {
  std::uint8_t palette_id;
  std::uint8_t start_row;
  std::uint8_t reserved[14];
  std::uint16_t colsb[16];
  std::uint8_t rows[16];
};

// a_rows: rows of the A and C tiles (the calls of at most 16 rows configure just their rows).
void load_tile_config(int a_rows = 16) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  for (int t = 0; t <= 4; ++t) cfg.rows[t] = static_cast<std::uint8_t>(a_rows);  // C 0..3, A 4
  _tile_loadconfig(&cfg);
}

// Rows per tile and pairs per k block.
constexpr I64 kTileRows = 16;
constexpr I64 kBlockPairs = 16;

inline I64 round_up(I64 v, I64 m) { return (v + m - 1) / m * m; }

// Packed activations: bf16, rows padded to a multiple of 16 with zeros, each row kb * 32
// elements plus 32 more (x[m][k] at element m * row_elems + k, zero past K). The extra 64 bytes
// keep a tile's 16 rows off a power-of-two stride (K = 1024: 2048 bytes put all 16 rows of
// both A tiles in the same two L1 sets; the prefill GEMM ran 1.13-1.35x slower).
inline I64 packed_row_elems(I64 K) { return round_up(round_up(K, 2) / 2, kBlockPairs) * 2 + 32; }

void pack_rows_amx(const float* x, I64 M, I64 K, float* xp, I64 t0, I64 t1, bool /*bf16_act*/) {
  const I64 row_elems = packed_row_elems(K);
  auto* out = reinterpret_cast<std::uint16_t*>(xp);
  for (I64 t = t0; t < t1; ++t) {
    for (I64 i = 0; i < kTileRows; ++i) {
      const I64 m = t * kTileRows + i;
      std::uint16_t* row = out + m * row_elems;
      if (m >= M) {
        std::memset(row, 0, static_cast<std::size_t>(row_elems) * 2);
        continue;
      }
      const float* src = x + m * K;
      I64 k = 0;
      for (; k + 16 <= K; k += 16) {
        // Vector rounding: subnormals to signed zero first (act_to_bf16's rule), then
        // vcvtneps2bf16 (round to nearest even, NaN stays NaN): the same bits as act_to_bf16.
        __m512 v = _mm512_loadu_ps(src + k);
        const __m512i bits = _mm512_castps_si512(v);
        const __m512i mag = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
        const __mmask16 tiny = _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(0x00800000));
        v = _mm512_castsi512_ps(
            _mm512_mask_and_epi32(bits, tiny, bits, _mm512_set1_epi32(static_cast<int>(0x80000000u))));
        const __m256bh h = _mm512_cvtneps_pbh(v);
        std::memcpy(row + k, &h, 32);
      }
      for (; k < K; ++k) row[k] = act_to_bf16(src[k]);
      for (; k < row_elems; ++k) row[k] = 0;
    }
  }
}

inline __mmask16 col_mask(I64 n) {
  if (n >= 16) return static_cast<__mmask16>(0xffff);
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1u);
}

// y[m][n0 + c] for the `rows` valid rows and `cols` valid columns of a stash of 16 rows x 64 f32
// (column c at stash[i * 64 + c]): dot + bias, stored or added to y.
void epilogue(const float* stash, I64 rows, I64 cols, const float* bias, float* y, I64 ldy,
              bool accumulate) {
  for (I64 i = 0; i < rows; ++i) {
    float* yr = y + i * ldy;
    const float* sr = stash + i * 64;
    for (I64 c = 0; c < cols; c += 16) {
      const __mmask16 mk = col_mask(cols - c);
      __m512 v = _mm512_maskz_loadu_ps(mk, sr + c);
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + c));
      if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, yr + c), v);
      _mm512_mask_storeu_ps(yr + c, mk, v);
    }
  }
}

// Where the B tile of column group g (16 columns) and k block kb of a panel comes from: straight
// from the panel when the block has 16 pairs and the group 16 columns, else a zero-padded copy
// in `tail` (16 pairs x 16 columns, 64 bytes a pair).
struct BSource {
  const std::uint16_t* ptr;
  I64 stride_bytes;
};

BSource b_source(const std::uint16_t* panel, I64 width, I64 pairs, I64 g, I64 kb,
                 std::uint16_t* tail) {
  const I64 p0 = kb * kBlockPairs;
  const I64 np = pairs - p0 < kBlockPairs ? pairs - p0 : kBlockPairs;
  const I64 nc = width - 16 * g < 16 ? width - 16 * g : 16;
  const std::uint16_t* src = panel + (p0 * width + 16 * g) * 2;
  if (np == kBlockPairs && nc == 16) return {src, width * 4};
  std::memset(tail, 0, kBlockPairs * 64);
  for (I64 r = 0; r < np; ++r) std::memcpy(tail + r * 32, src + r * width * 2, static_cast<std::size_t>(nc) * 4);
  return {tail, 64};
}

// One row tile (M <= 16) against one panel: 4 column groups per k block, the panel streamed once.
void panel_one_row_tile(const std::uint16_t* xp, I64 row_elems, I64 rows, const std::uint16_t* panel,
                        I64 width, I64 pairs, I64 blocks, const float* bias, float* y, I64 ldy,
                        bool accumulate, float* stash, std::uint16_t* tail) {
  const I64 groups = (width + 15) / 16;
  const bool full = width == 64 && pairs % kBlockPairs == 0;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const I64 a_stride = row_elems * 2;
  for (I64 kb = 0; kb < blocks; ++kb) {
    _tile_loadd(4, xp + kb * 32, a_stride);
    if (full) {
      const std::uint16_t* src = panel + kb * kBlockPairs * 128;
      // No software prefetch: the hardware prefetchers follow the 4 KiB blocks, and prefetching
      // 4 or 8 blocks ahead measured 0.66-0.85 of the read probe against 0.83-0.88 without.
      _tile_loadd(5, src, 256);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, src + 32, 256);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, src + 64, 256);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, src + 96, 256);
      _tile_dpbf16ps(3, 4, 5);
    } else {
      // Narrow panel or partial block: each group's tile from b_source (the tail buffer is
      // rewritten per group, so each load completes before the next copy).
      for (I64 g = 0; g < groups; ++g) {
        const BSource b = b_source(panel, width, pairs, g, kb, tail);
        _tile_loadd(5, b.ptr, b.stride_bytes);
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
  epilogue(stash, rows, width, bias, y, ldy, accumulate);
}

// Up to two row tiles x two column groups (32 x 32 outputs, starting at column group g) of a
// panel over every k block: fewer rows or a narrower panel run one of each.
void panel_block_2x2(const std::uint16_t* xp, I64 row_elems, I64 rows, const std::uint16_t* panel,
                     I64 width, I64 pairs, I64 blocks, I64 g, const float* bias, float* y, I64 ldy,
                     bool accumulate, float* stash, std::uint16_t* tail) {
  const I64 a_stride = row_elems * 2;
  const bool two_rows = rows > kTileRows;
  const bool two_groups = width - 16 * g > 16;
  const bool direct = pairs % kBlockPairs == 0 && width - 16 * g >= 32;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const std::uint16_t* a1 = xp + kTileRows * row_elems;
  for (I64 kb = 0; kb < blocks; ++kb) {
    _tile_loadd(4, xp + kb * 32, a_stride);
    if (two_rows) _tile_loadd(5, a1 + kb * 32, a_stride);
    if (direct) {
      const std::uint16_t* src = panel + (kb * kBlockPairs * width + 16 * g) * 2;
      _tile_loadd(6, src, width * 4);
      _tile_loadd(7, src + 32, width * 4);
    } else {
      BSource b = b_source(panel, width, pairs, g, kb, tail);
      _tile_loadd(6, b.ptr, b.stride_bytes);
      if (two_groups) {
        b = b_source(panel, width, pairs, g + 1, kb, tail);
        _tile_loadd(7, b.ptr, b.stride_bytes);
      }
    }
    _tile_dpbf16ps(0, 4, 6);
    if (two_groups) _tile_dpbf16ps(1, 4, 7);
    if (two_rows) {
      _tile_dpbf16ps(2, 5, 6);
      if (two_groups) _tile_dpbf16ps(3, 5, 7);
    }
  }
  const I64 cols = width - 16 * g < 32 ? width - 16 * g : 32;
  _tile_stored(0, stash, 256);
  if (two_groups) _tile_stored(1, stash + 16, 256);
  epilogue(stash, rows < kTileRows ? rows : kTileRows, cols, bias, y, ldy, accumulate);
  if (two_rows) {
    _tile_stored(2, stash, 256);
    if (two_groups) _tile_stored(3, stash + 16, 256);
    epilogue(stash, rows - kTileRows, cols, bias, y + kTileRows * ldy, ldy, accumulate);
  }
}

// k blocks per chunk of the two-row-tile decode path: 8 blocks = 32 KiB of a panel, read from
// DRAM by the first half's pass and from cache by the second's.
constexpr I64 kChunkBlocks = 8;

// Two row tiles (17 .. 32 rows) against one full panel (64 columns, whole k blocks): the panel in
// chunks of kChunkBlocks blocks, each chunk run for columns 0-31 and then 32-63 with the partial
// sums parked in f32 between chunks (exact), so the weights stream from DRAM once, in order,
// instead of once per 32-column half. stash: 32 x 64 f32; park: 2 halves x 4 tiles x 256 f32.
void panel_two_row_tiles(const std::uint16_t* xp, I64 row_elems, I64 rows, const std::uint16_t* panel,
                         I64 blocks, const float* bias, float* y, I64 ldy, bool accumulate, float* stash,
                         float* park) {
  const I64 a_stride = row_elems * 2;
  const std::uint16_t* a1 = xp + kTileRows * row_elems;
  for (I64 c0 = 0; c0 < blocks; c0 += kChunkBlocks) {
    const I64 c1 = c0 + kChunkBlocks < blocks ? c0 + kChunkBlocks : blocks;
    for (I64 half = 0; half < 2; ++half) {
      float* pk = park + half * 1024;
      if (c0 == 0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      } else {
        _tile_loadd(0, pk, 64);
        _tile_loadd(1, pk + 256, 64);
        _tile_loadd(2, pk + 512, 64);
        _tile_loadd(3, pk + 768, 64);
      }
      for (I64 kb = c0; kb < c1; ++kb) {
        _tile_loadd(4, xp + kb * 32, a_stride);
        _tile_loadd(5, a1 + kb * 32, a_stride);
        const std::uint16_t* src = panel + kb * kBlockPairs * 128 + half * 64;
        _tile_loadd(6, src, 256);
        _tile_loadd(7, src + 32, 256);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      if (c1 < blocks) {
        _tile_stored(0, pk, 64);
        _tile_stored(1, pk + 256, 64);
        _tile_stored(2, pk + 512, 64);
        _tile_stored(3, pk + 768, 64);
      } else {
        float* out = stash + half * 32;
        _tile_stored(0, out, 256);
        _tile_stored(1, out + 16, 256);
        _tile_stored(2, out + kTileRows * 64, 256);
        _tile_stored(3, out + kTileRows * 64 + 16, 256);
      }
    }
  }
  epilogue(stash, kTileRows, 64, bias, y, ldy, accumulate);
  epilogue(stash + kTileRows * 64, rows - kTileRows, 64, bias, y + kTileRows * ldy, ldy, accumulate);
}

void linear_panels_amx(const float* xpf, I64 M, const WeightView& w, I64 p0, I64 p1,
                       const float* bias, float* y, bool accumulate, float* scratch,
                       bool /*bf16_act*/) {
  const auto* xp = reinterpret_cast<const std::uint16_t*>(xpf);
  const I64 N = w.rows;
  const I64 K = w.cols;
  const I64 Kp = K + (K & 1);
  const I64 pairs = Kp / 2;
  const I64 blocks = (pairs + kBlockPairs - 1) / kBlockPairs;
  const I64 row_elems = packed_row_elems(K);
  // Scratch (linear_panels_scratch_floats(M) >= 128 x 64 floats): a 32 x 64 f32 stash, the
  // parked partial sums of panel_two_row_tiles (2048 f32), a B tail tile (16 x 32 bf16).
  float* stash = scratch;
  float* park = scratch + 2 * kTileRows * 64;
  auto* tail = reinterpret_cast<std::uint16_t*>(park + 2048);
  const auto* wbase = static_cast<const std::uint16_t*>(w.data);
  // Calls of fewer than 16 rows configure A and C with just their rows (a row's value does not
  // depend on it; TDPBF16PS does less work): 0.86-0.875 of the read probe at M = 1 against
  // 0.83-0.85 with 16.
  load_tile_config(M < kTileRows ? static_cast<int>(M) : static_cast<int>(kTileRows));
  for (I64 p = p0; p < p1; ++p) {
    const I64 n0 = p * kPanelCols;
    const I64 width = N - n0 < kPanelCols ? N - n0 : kPanelCols;
    const std::uint16_t* panel = wbase + n0 * Kp;
    const float* pb = bias != nullptr ? bias + n0 : nullptr;
    if (M <= kTileRows) {
      panel_one_row_tile(xp, row_elems, M, panel, width, pairs, blocks, pb, y + n0, N, accumulate,
                         stash, tail);
      continue;
    }
    if (M <= 2 * kTileRows && width == kPanelCols && pairs % kBlockPairs == 0) {
      panel_two_row_tiles(xp, row_elems, M, panel, blocks, pb, y + n0, N, accumulate, stash, park);
      continue;
    }
    for (I64 g = 0; g * 16 < width; g += 2) {
      for (I64 m0 = 0; m0 < M; m0 += 2 * kTileRows) {
        const I64 rows = M - m0 < 2 * kTileRows ? M - m0 : 2 * kTileRows;
        panel_block_2x2(xp + m0 * row_elems, row_elems, rows, panel, width, pairs, blocks, g,
                        pb != nullptr ? pb + 16 * g : nullptr, y + m0 * N + n0 + 16 * g, N,
                        accumulate, stash, tail);
      }
    }
  }
  _tile_release();
}

// Peak probe: 4 independent accumulator tiles, A and B reloaded never (register-resident).
double amx_dot_chains_impl(I64 iters, float seed, float* sink) {
  load_tile_config();
  alignas(64) std::uint16_t a[16 * 32];
  alignas(64) float c[16 * 16];
  const std::uint16_t one = act_to_bf16(seed);
  for (auto& v : a) v = one;
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

AmxGemm amx_gemm() { return AmxGemm{linear_panels_amx, pack_rows_amx}; }

double amx_dot_chains(std::int64_t iters, float seed, float* sink) {
  return amx_dot_chains_impl(iters, seed, sink);
}

bool amx_request_permission() {
  // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): Linux 5.16+ enables the tile
  // data state per process only on request.
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

}  // namespace kun::kernels::detail
