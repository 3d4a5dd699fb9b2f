// Paged attention on Intel AMX tiles over a bf16 KV cache: AttentionArithmetic::kAmx. The scores
// (q.k) and the weighted sum of V run on tiles; the softmax between them is the AVX-512 unit's
// code (softmax_row, compiled here again from attention_impl.inc). A call takes up to 16 query
// rows (one tile).
//
// Scores: S^T = K Q^T, one TDPBF16PS per 32 elements of head_dim. A = a key tile straight from
// the cache (kt keys x 32 bf16, a row per key, the row stride head_dim), so the cache is read as it
// is stored; B = the rows' q, rounded to bf16 (as the AMX GEMM rounds its activations) and laid
// out in pairs (16 pairs x 16 rows), built once per call and kept in tiles. C (kt keys x 16 rows)
// goes through a small stash into each row's scores (one gather per row and key tile), times
// scale. A score is C = 0, then C = TDPBF16PS(C, key block, q block) for the 32-element blocks of
// head_dim in order (the last as long as head_dim leaves it), times scale.
//
// Weighted V: O = P V per 64 columns of head_dim. A = the rows' probabilities (exp(s - max)) of
// 32 keys rounded to bf16, zero past each row's context; B = pairs of consecutive V rows
// interleaved (16 key pairs x 16 columns), zero past the call's keys. O is C = 0, then TDPBF16PS
// per block of 32 keys in order, times 1 / sum (the f32 sum of the unrounded probabilities).
//
// TDPBF16PS computes each C element from its A row and B column alone, so neither result depends
// on the other rows of the call, on the key tile a key falls in (kt is fixed by the block size),
// on the thread, or on whether a key past a row's context holds a value or zero (its probability
// is zero): the result of a (token, head) depends only on its q and the cached K/V at positions
// [0, pos], as kernels.h requires. It is the hardware's sum, not vdpbf16ps's sequential one
// (kernels_amx.cc), so no other unit reproduces these bits; the precision is that of bf16
// activations (q and the probabilities rounded to bf16, K and V already bf16, f32 sums).
//
// An f32 cache (the table's rows_f32), an odd head_dim or one above kMaxHeadDim keep the AVX-512
// unit's arithmetic (amx_scores_apply); a head_dim that is not a multiple of 16 keeps its
// weighted V (amx_values_apply).
//
// Compiled with the flags of kernels_amx.cc; reached only through amx_attention_kernels(), which
// the front end uses only when the AMX GEMM mode is supported (dispatch.cc has asked the kernel
// for the tile state).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <cstring>

#include "kernels/attention_internal.h"
#include "kernels/internal.h"

namespace kun::kernels::detail {
namespace {

#include "kernels/bf16_dot.inc"
#include "kernels/simd_avx512.inc"

#include "kernels/amx_tiles.inc"
#include "kernels/attention_avx512_traits.inc"

#include "kernels/attention_impl.inc"

// B (the rows' q) stays in tiles 4..7: at most 4 blocks of 32 elements of head_dim.
constexpr std::int64_t kMaxHeadDim = 128;

// The AMX scores (of a bf16 cache) need pairs of head_dim elements and B in tiles 4..7.
inline bool amx_scores_apply(const PagedKvCache& kv) { return kv.head_dim % 2 == 0 && kv.head_dim <= kMaxHeadDim; }

// The weighted sum of V on AMX tiles: whole 16-column tiles of head_dim only.
inline bool amx_values_apply(const PagedKvCache& kv) { return kv.head_dim % 16 == 0; }

// Tiles: C 0 and 1 (two key tiles in flight, kt keys x 16 rows f32); A 2 and 3 (kt keys x 32
// bf16, the two key tiles'; with a shorter last block of head_dim, rem elements, A 3 is that
// block's, kt x rem, and both key tiles load A 2 for the full blocks); B 4 .. 4 + blocks - 1 (the
// rows' q, 16 pairs x 16 rows each, rem / 2 pairs for the last), loaded once per call.
void load_score_tiles(int kt, std::int64_t blocks, int rem) {
  TileConfig cfg = palette1_config();
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = static_cast<std::uint8_t>(kt);
    cfg.colsb[t] = 64;
  }
  if (rem > 0) cfg.colsb[3] = static_cast<std::uint16_t>(rem * 2);
  for (std::int64_t b = 0; b < blocks; ++b) {
    cfg.rows[4 + b] = static_cast<std::uint8_t>(rem > 0 && b == blocks - 1 ? rem / 2 : 16);
    cfg.colsb[4 + b] = 64;
  }
  load_tile_config(cfg);
}

// Every tile 16 rows x 64 bytes: the weighted V's tiles, and the scores' ones when a key tile is
// 16 keys and head_dim a multiple of 32 (amx_scores then leaves this configuration loaded).
void load_square_tiles() { load_tile_config(square_tile_config()); }

// TDPBF16PS into C tile `c` (0 or 1) from A tile `a` (2 or 3) and B tile 4 + kb (the tile
// numbers are immediates).
inline void dp(int c, int a, std::int64_t kb) {
  switch (c * 16 + a * 4 + static_cast<int>(kb)) {
    case 8: _tile_dpbf16ps(0, 2, 4); return;
    case 9: _tile_dpbf16ps(0, 2, 5); return;
    case 10: _tile_dpbf16ps(0, 2, 6); return;
    case 11: _tile_dpbf16ps(0, 2, 7); return;
    case 12: _tile_dpbf16ps(0, 3, 4); return;
    case 13: _tile_dpbf16ps(0, 3, 5); return;
    case 14: _tile_dpbf16ps(0, 3, 6); return;
    case 15: _tile_dpbf16ps(0, 3, 7); return;
    case 24: _tile_dpbf16ps(1, 2, 4); return;
    case 25: _tile_dpbf16ps(1, 2, 5); return;
    case 26: _tile_dpbf16ps(1, 2, 6); return;
    case 27: _tile_dpbf16ps(1, 2, 7); return;
    case 28: _tile_dpbf16ps(1, 3, 4); return;
    case 29: _tile_dpbf16ps(1, 3, 5); return;
    case 30: _tile_dpbf16ps(1, 3, 6); return;
    case 31: _tile_dpbf16ps(1, 3, 7); return;
    default: return;
  }
}

inline void load_b(std::int64_t kb, const void* p) {
  switch (kb) {
    case 0: _tile_loadd(4, p, 64); return;
    case 1: _tile_loadd(5, p, 64); return;
    case 2: _tile_loadd(6, p, 64); return;
    default: _tile_loadd(7, p, 64); return;
  }
}

// Returns whether it left load_square_tiles' configuration loaded.
bool amx_scores(const float* const* q, int rows, const std::int64_t* n_ctx, std::int64_t n_max,
                const PagedKvCache& kv, std::int64_t kv_head, float scale, float* const* sc) {
  const std::int64_t hd = kv.head_dim;
  const std::int64_t bs = kv.block_size;
  const std::int64_t full_blocks = hd / 32;
  const int rem = static_cast<int>(hd % 32);
  const std::int64_t blocks = full_blocks + (rem > 0 ? 1 : 0);
  // Keys per tile: the largest divisor of the block size up to 16, so no tile spans two blocks.
  int kt = 16;
  while (bs % kt != 0) --kt;
  // B: qt[block][pair][row], 32-bit pairs of bf16 q elements, zero for missing rows.
  alignas(64) std::uint32_t qt[kMaxHeadDim / 32][16][16];
  std::memset(qt, 0, static_cast<std::size_t>(blocks) * sizeof qt[0]);
  const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  for (int r = 0; r < rows; ++r) {
    // Full blocks: 32 elements rounded at once (act_to_bf16's bits: subnormals to signed zero,
    // then round to nearest even), their 16 pairs scattered down column r of the block's tile.
    for (std::int64_t kb = 0; kb < full_blocks; ++kb) {
      const __m512 lo = flush_subnormals(_mm512_loadu_ps(q[r] + kb * 32));
      const __m512 hi = flush_subnormals(_mm512_loadu_ps(q[r] + kb * 32 + 16));
      const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      _mm512_i32scatter_epi32(&qt[kb][0][0], _mm512_add_epi32(column, _mm512_set1_epi32(r)), pairs, 4);
    }
    for (std::int64_t p = full_blocks * 16; p < hd / 2; ++p) {
      const std::uint32_t lo = act_to_bf16(q[r][2 * p]);
      const std::uint32_t hi = act_to_bf16(q[r][2 * p + 1]);
      qt[p / 16][p % 16][r] = lo | (hi << 16);
    }
  }
  alignas(64) float stash[2][16][16];
  const bool square = kt == 16 && rem == 0;
  if (square) {
    load_square_tiles();
  } else {
    load_score_tiles(kt, blocks, rem);
  }
  memory_barrier();  // qt's stores before the TILELOADDs that read it
  for (std::int64_t kb = 0; kb < blocks; ++kb) load_b(kb, &qt[kb][0][0]);
  const std::int64_t stride = hd * 2;
  auto keys_at = [&](std::int64_t j0) {
    return static_cast<const std::uint16_t*>(key_block(kv, j0 / bs)) + (kv_head * bs + j0 % bs) * hd;
  };
  // Scores of key tiles j0 (C 0) and, where there is one, j0 + kt (C 1), interleaved so that
  // the two chains of TDPBF16PS overlap.
  for (std::int64_t j0 = 0; j0 < n_max; j0 += 2 * kt) {
    const bool two = j0 + kt < n_max;
    const std::uint16_t* k0 = keys_at(j0);
    const std::uint16_t* k1 = two ? keys_at(j0 + kt) : nullptr;
    _tile_zero(0);
    _tile_zero(1);
    for (std::int64_t kb = 0; kb < full_blocks; ++kb) {
      _tile_loadd(2, k0 + kb * 32, stride);
      dp(0, 2, kb);
      if (two) {
        if (rem > 0) {
          _tile_loadd(2, k1 + kb * 32, stride);
          dp(1, 2, kb);
        } else {
          _tile_loadd(3, k1 + kb * 32, stride);
          dp(1, 3, kb);
        }
      }
    }
    if (rem > 0) {
      _tile_loadd(3, k0 + full_blocks * 32, stride);
      dp(0, 3, full_blocks);
      if (two) {
        _tile_loadd(3, k1 + full_blocks * 32, stride);
        dp(1, 3, full_blocks);
      }
    }
    _tile_stored(0, &stash[0][0][0], 64);
    if (two) _tile_stored(1, &stash[1][0][0], 64);
    memory_barrier();  // the TILESTOREDs before the reads below
    for (int t = 0; t < (two ? 2 : 1); ++t) {
      const std::int64_t jt = j0 + t * kt;
      const std::int64_t count = n_max - jt < kt ? n_max - jt : kt;
      for (int r = 0; r < rows; ++r) {
        const std::int64_t own = n_ctx[r] - jt < count ? n_ctx[r] - jt : count;
        if (own <= 0) continue;
        // Column r of the stash (key i at stash[t][i][r]) times scale, into the row's scores.
        const __mmask16 m = lane_mask16(own);
        const __m512i idx = _mm512_add_epi32(column, _mm512_set1_epi32(r));
        const __m512 col = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, &stash[t][0][0], 4);
        _mm512_mask_storeu_ps(sc[r] + jt, m, _mm512_mul_ps(col, _mm512_set1_ps(scale)));
      }
    }
    memory_barrier();  // these reads before the next TILESTOREDs
  }
  return square;
}

// out[r] = inv_sum[r] * sum_j p[r][j] V_j for the rows, j < n_ctx[r], on AMX tiles (configured:
// load_square_tiles' configuration is loaded already). Tiles: C 0..3 (16 rows x 16 columns of
// head_dim each, f32), A 4 (16 rows' probabilities of 32 keys, bf16; the rows past the call's are
// zero), B 5..7 (16 key pairs x 16 columns of V; the fourth column tile reuses 5). Per pass of up
// to 64 columns of head_dim, C = 0, then C = TDPBF16PS(C, P block, V block) for the blocks of 32
// keys in order, where the P block holds row r's probabilities rounded to bf16 (act_to_bf16's
// bits) and zero past n_ctx[r], and the V block pairs consecutive keys (zero past n_max). An
// element of C comes from its own row of P and column of V alone.
void amx_values(float* const* out, int rows, const std::int64_t* n_ctx, std::int64_t n_max,
                const PagedKvCache& kv, std::int64_t kv_head, float* const* p, const float* inv_sum,
                bool configured) {
  const std::int64_t hd = kv.head_dim;
  const std::int64_t bs = kv.block_size;
  alignas(64) std::uint16_t a[16][32];
  if (rows < 16) std::memset(&a[rows][0], 0, static_cast<std::size_t>(16 - rows) * sizeof a[0]);
  alignas(64) std::uint16_t b[4][16][32];
  alignas(64) float stash[16][64];
  // Element i of the result: key a's column i / 2 (i even) or key b's (i odd), per 16 columns.
  const __m512i first16 = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                           37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i second16 = _mm512_add_epi16(first16, _mm512_set1_epi16(16));
  auto value_row = [&](std::int64_t j) {
    return static_cast<const std::uint16_t*>(value_block(kv, j / bs)) + (kv_head * bs + j % bs) * hd;
  };
  if (!configured) load_square_tiles();
  for (std::int64_t c0 = 0; c0 < hd; c0 += 64) {
    const std::int64_t cols = hd - c0 < 64 ? hd - c0 : 64;
    const int tiles = static_cast<int>(cols / 16);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (std::int64_t j0 = 0; j0 < n_max; j0 += 32) {
      memory_barrier();  // the previous block's TILELOADDs before these stores
      for (int r = 0; r < rows; ++r) {
        const std::int64_t n = n_ctx[r] - j0;
        const __m512 lo = flush_subnormals(_mm512_maskz_loadu_ps(lane_mask16(n), p[r] + j0));
        const __m512 hi = flush_subnormals(_mm512_maskz_loadu_ps(lane_mask16(n - 16), p[r] + j0 + 16));
        _mm512_store_si512(&a[r][0], (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
      for (int q = 0; q < 16; ++q) {
        const std::int64_t ja = j0 + 2 * q;
        __m512i va0 = _mm512_setzero_si512(), va1 = va0, vb0 = va0, vb1 = va0;
        if (ja < n_max) {
          const std::uint16_t* row = value_row(ja) + c0;
          va0 = _mm512_maskz_loadu_epi16(lane_mask32(cols), row);
          va1 = _mm512_maskz_loadu_epi16(lane_mask32(cols - 32), row + 32);
        }
        if (ja + 1 < n_max) {
          const std::uint16_t* row = value_row(ja + 1) + c0;
          vb0 = _mm512_maskz_loadu_epi16(lane_mask32(cols), row);
          vb1 = _mm512_maskz_loadu_epi16(lane_mask32(cols - 32), row + 32);
        }
        _mm512_store_si512(&b[0][q][0], _mm512_permutex2var_epi16(va0, first16, vb0));
        _mm512_store_si512(&b[1][q][0], _mm512_permutex2var_epi16(va0, second16, vb0));
        _mm512_store_si512(&b[2][q][0], _mm512_permutex2var_epi16(va1, first16, vb1));
        _mm512_store_si512(&b[3][q][0], _mm512_permutex2var_epi16(va1, second16, vb1));
      }
      memory_barrier();  // these stores before the TILELOADDs
      _tile_loadd(4, &a[0][0], 64);
      _tile_loadd(5, &b[0][0][0], 64);
      _tile_dpbf16ps(0, 4, 5);
      if (tiles > 1) {
        _tile_loadd(6, &b[1][0][0], 64);
        _tile_dpbf16ps(1, 4, 6);
      }
      if (tiles > 2) {
        _tile_loadd(7, &b[2][0][0], 64);
        _tile_dpbf16ps(2, 4, 7);
      }
      if (tiles > 3) {
        _tile_loadd(5, &b[3][0][0], 64);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    _tile_stored(0, &stash[0][0], 256);
    if (tiles > 1) _tile_stored(1, &stash[0][16], 256);
    if (tiles > 2) _tile_stored(2, &stash[0][32], 256);
    if (tiles > 3) _tile_stored(3, &stash[0][48], 256);
    memory_barrier();  // the TILESTOREDs before the reads below
    for (int r = 0; r < rows; ++r) {
      const __m512 scale = _mm512_set1_ps(inv_sum[r]);
      for (int t = 0; t < tiles; ++t) {
        _mm512_storeu_ps(out[r] + c0 + 16 * t, _mm512_mul_ps(_mm512_load_ps(&stash[r][16 * t]), scale));
      }
    }
  }
}

// Up to kMaxTableRows rows through the AVX-512 body, kMaxRows at a time (a row's result does not
// depend on the rows computed with it).
template <typename KT>
void rows_in_groups(const float* const* q, float* const* out, const std::int64_t* n_ctx, int rows,
                    const PagedKvCache& kv, std::int64_t kv_head, float scale, float* scores,
                    std::int64_t score_stride) {
  for (int g = 0; g < rows; g += kMaxRows) {
    const int n = rows - g < kMaxRows ? rows - g : kMaxRows;
    attention_rows<KT>(q + g, out + g, n_ctx + g, n, kv, kv_head, scale, scores + g * score_stride, score_stride);
  }
}

void amx_rows_f32(const float* const* q, float* const* out, const std::int64_t* n_ctx, int rows,
                  const PagedKvCache& kv, std::int64_t kv_head, float scale, float* scores,
                  std::int64_t score_stride) {
  rows_in_groups<float>(q, out, n_ctx, rows, kv, kv_head, scale, scores, score_stride);
}

// The scores of all rows on AMX tiles, the softmax per row, then the weighted V on AMX tiles (or
// the AVX-512 softmax and values kMaxRows rows at a time where amx_values_apply says no).
void amx_rows_bf16(const float* const* q, float* const* out, const std::int64_t* n_ctx, int rows,
                   const PagedKvCache& kv, std::int64_t kv_head, float scale, float* scores,
                   std::int64_t score_stride) {
  if (!amx_scores_apply(kv)) {
    rows_in_groups<std::uint16_t>(q, out, n_ctx, rows, kv, kv_head, scale, scores, score_stride);
    return;
  }
  float* sc[kMaxTableRows] = {};
  std::int64_t n_max = 0;
  for (int r = 0; r < rows; ++r) {
    sc[r] = scores + r * score_stride;
    n_max = n_ctx[r] > n_max ? n_ctx[r] : n_max;
  }
  const bool square = amx_scores(q, rows, n_ctx, n_max, kv, kv_head, scale, sc);
  const bool values_on_tiles = amx_values_apply(kv);
  if (values_on_tiles) {
    float inv_sum[kMaxTableRows];
    for (int r = 0; r < rows; ++r) inv_sum[r] = softmax_row(sc[r], n_ctx[r]);
    amx_values(out, rows, n_ctx, n_max, kv, kv_head, sc, inv_sum, square);
  }
  _tile_release();
  if (values_on_tiles) return;
  for (int g = 0; g < rows; g += kMaxRows) {
    switch (rows - g) {
      case 1: softmax_values_rows<std::uint16_t, 1>(out + g, n_ctx + g, kv, kv_head, sc + g); break;
      case 2: softmax_values_rows<std::uint16_t, 2>(out + g, n_ctx + g, kv, kv_head, sc + g); break;
      case 3: softmax_values_rows<std::uint16_t, 3>(out + g, n_ctx + g, kv, kv_head, sc + g); break;
      default: softmax_values_rows<std::uint16_t, 4>(out + g, n_ctx + g, kv, kv_head, sc + g); break;
    }
  }
}

}  // namespace

const AttentionKernels& amx_attention_kernels() {
  static const AttentionKernels k{Isa::kAvx512Bf16, kMaxTableRows, &amx_rows_f32, &amx_rows_bf16, &to_bf16_rows};
  return k;
}

}  // namespace kun::kernels::detail
