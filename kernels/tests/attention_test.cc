// Paged attention over the engine's KV cache (PagedKvCache, bf16 or f32 elements) on every ISA
// this CPU supports: against a double-precision reference on the bf16-rounded K/V, bit for bit
// against an f32 cache holding the same rounded values (and against the PagedKvView kernel), and
// the determinism contract (KV block size and placement, threads, tokens in the call). The
// PagedKvView kernel computes one query head at a time, the PagedKvCache kernel a GQA group at a
// time: the bit-for-bit match also shows that grouping heads changes no value.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "kernels/kernels.h"

namespace kun::kernels {
namespace {

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}) {
    if (isa_supported(i)) out.push_back(i);
  }
  return out;
}

std::vector<float> random_floats(std::int64_t n, std::uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = dist(rng);
  return v;
}

// f32 values rounded through bf16 (what a bf16 cache holds, widened back).
std::vector<float> bf16_rounded(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = bf16_to_f32(f32_to_bf16(v[i]));
  return out;
}

// Contiguous K/V of one sequence/layer: [kv_heads][ctx][hd] f32.
struct Sequence {
  std::int64_t ctx, kv_heads, hd;
  std::vector<float> k, v;
};

// The sequence laid out in blocks of `bs` tokens of `dtype` (appended with store_kv_row, as the
// forward pass does), blocks placed in a pool in shuffled order, unused slots poisoned.
struct PagedCache {
  std::vector<std::byte> pool;
  std::vector<const void*> kb, vb;
  std::vector<const float*> kb_f32, vb_f32;
  PagedKvCache cache;
};

// Block b's K rows to kdst and V rows to vdst ([kv_heads][bs][hd] of dtype each), appended with
// store_kv_row as the forward pass does.
void store_block(const Sequence& s, std::int64_t b, std::int64_t bs, DType dtype, std::byte* kdst, std::byte* vdst) {
  const std::int64_t eb = dtype_bytes(dtype);
  for (std::int64_t h = 0; h < s.kv_heads; ++h) {
    for (std::int64_t t = 0; t < bs && b * bs + t < s.ctx; ++t) {
      const std::int64_t src = (h * s.ctx + b * bs + t) * s.hd;
      store_kv_row(s.k.data() + src, s.hd, dtype, kdst + (h * bs + t) * s.hd * eb);
      store_kv_row(s.v.data() + src, s.hd, dtype, vdst + (h * bs + t) * s.hd * eb);
    }
  }
}

PagedCache page(const Sequence& s, std::int64_t bs, DType dtype, std::uint32_t shuffle_seed) {
  PagedCache p;
  const std::int64_t eb = dtype_bytes(dtype);
  const std::int64_t nblocks = (s.ctx + bs - 1) / bs;
  const std::int64_t block_bytes = s.kv_heads * bs * s.hd * eb;
  std::vector<std::int64_t> slot(static_cast<std::size_t>(2 * nblocks));
  std::iota(slot.begin(), slot.end(), 0);
  if (shuffle_seed != 0) std::shuffle(slot.begin(), slot.end(), std::mt19937(shuffle_seed));
  p.pool.assign(static_cast<std::size_t>(2 * nblocks * block_bytes), std::byte{0xff});  // NaN either way
  for (std::int64_t b = 0; b < nblocks; ++b) {
    std::byte* kdst = p.pool.data() + slot[static_cast<std::size_t>(b)] * block_bytes;
    std::byte* vdst = p.pool.data() + slot[static_cast<std::size_t>(nblocks + b)] * block_bytes;
    p.kb.push_back(kdst);
    p.vb.push_back(vdst);
    p.kb_f32.push_back(reinterpret_cast<const float*>(kdst));
    p.vb_f32.push_back(reinterpret_cast<const float*>(vdst));
    store_block(s, b, bs, dtype, kdst, vdst);
  }
  p.cache = PagedKvCache{p.kb.data(), p.vb.data(), dtype, bs, s.ctx, s.kv_heads, s.hd};
  return p;
}

void reference_attention(const Sequence& s, const float* q, std::int64_t num_tokens, std::int64_t num_heads,
                         const std::int64_t* pos, float scale, std::vector<double>* out) {
  out->assign(static_cast<std::size_t>(num_tokens * num_heads * s.hd), 0.0);
  const std::int64_t group = num_heads / s.kv_heads;
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    for (std::int64_t h = 0; h < num_heads; ++h) {
      const float* qh = q + (t * num_heads + h) * s.hd;
      const std::int64_t kvh = h / group;
      std::vector<double> sc(static_cast<std::size_t>(pos[t] + 1));
      double mx = -1e300;
      for (std::int64_t j = 0; j <= pos[t]; ++j) {
        double d = 0;
        for (std::int64_t i = 0; i < s.hd; ++i) d += double(qh[i]) * s.k[static_cast<std::size_t>((kvh * s.ctx + j) * s.hd + i)];
        sc[static_cast<std::size_t>(j)] = d * scale;
        mx = std::max(mx, sc[static_cast<std::size_t>(j)]);
      }
      double sum = 0;
      for (auto& v : sc) sum += (v = std::exp(v - mx));
      for (std::int64_t j = 0; j <= pos[t]; ++j) {
        for (std::int64_t i = 0; i < s.hd; ++i) {
          (*out)[static_cast<std::size_t>((t * num_heads + h) * s.hd + i)] +=
              sc[static_cast<std::size_t>(j)] / sum * s.v[static_cast<std::size_t>((kvh * s.ctx + j) * s.hd + i)];
        }
      }
    }
  }
}

TEST(PagedKvCacheAttention, Bf16MatchesReferenceF32CacheAndIsInvariant) {
  ThreadPool p2(2), p3(3);
  struct Case {
    std::int64_t ctx, heads, kv_heads, hd;
  };
  // GQA groups of 4 (computed together), 1 (MHA, a head_dim with a vector tail), 2, and 7 (a
  // chunk of 4 then one of 3); a long context.
  const Case cases[] = {{300, 8, 2, 64}, {37, 4, 4, 40}, {1100, 4, 1, 72}, {70, 8, 4, 32}, {129, 14, 2, 128}};
  std::uint32_t seed = 500;
  for (Isa isa : supported_isas()) {
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(isa_name(isa)) + " ctx=" + std::to_string(c.ctx) + " hd=" + std::to_string(c.hd));
      const Sequence s{c.ctx, c.kv_heads, c.hd, random_floats(c.kv_heads * c.ctx * c.hd, ++seed, -2, 2),
                       random_floats(c.kv_heads * c.ctx * c.hd, ++seed, -1, 1)};
      const Sequence rounded{c.ctx, c.kv_heads, c.hd, bf16_rounded(s.k), bf16_rounded(s.v)};
      ASSERT_NE(s.k, rounded.k) << "the test data must not be bf16-exact already";
      const std::int64_t positions[] = {c.ctx - 1, 0, c.ctx / 2, c.ctx - 2, 15, 16};
      const std::int64_t T = 6;
      const std::vector<float> q = random_floats(T * c.heads * c.hd, ++seed, -2, 2);
      const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
      std::vector<float> scratch(static_cast<std::size_t>(paged_kv_cache_scratch_floats(&p3, c.ctx, c.heads, c.kv_heads)));
      const auto out_n = static_cast<std::size_t>(T * c.heads * c.hd);

      // Baseline: bf16, block size 16, blocks in order, no pool.
      const PagedCache base = page(s, 16, DType::kBF16, 0);
      std::vector<float> out0(out_n);
      paged_attention(isa, q.data(), T, c.heads, positions, base.cache, scale, out0.data(), scratch.data(), nullptr);
      std::vector<double> ref;
      reference_attention(rounded, q.data(), T, c.heads, positions, scale, &ref);
      for (std::size_t i = 0; i < out_n; ++i) ASSERT_NEAR(out0[i], ref[i], 1e-5) << "element " << i;

      // An f32 cache of the rounded values: the same bits, through both f32 entry points.
      const PagedCache f32 = page(rounded, 16, DType::kF32, 0);
      std::vector<float> out_f32(out_n), out_view(out_n);
      paged_attention(isa, q.data(), T, c.heads, positions, f32.cache, scale, out_f32.data(), scratch.data(), nullptr);
      EXPECT_EQ(0, std::memcmp(out_f32.data(), out0.data(), out_n * sizeof(float)));
      const PagedKvView view{f32.kb_f32.data(), f32.vb_f32.data(), 16, c.ctx, c.kv_heads, c.hd};
      paged_attention(isa, q.data(), T, c.heads, positions, view, scale, out_view.data(), scratch.data(), nullptr);
      EXPECT_EQ(0, std::memcmp(out_view.data(), out0.data(), out_n * sizeof(float)));

      for (std::int64_t bs : {16, 256, 7}) {
        for (std::uint32_t shuffle : {0u, 77u}) {
          const PagedCache pc = page(s, bs, DType::kBF16, shuffle);
          for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p2, &p3}) {
            std::vector<float> out(out_n);
            paged_attention(isa, q.data(), T, c.heads, positions, pc.cache, scale, out.data(), scratch.data(), pool);
            ASSERT_EQ(0, std::memcmp(out.data(), out0.data(), out_n * sizeof(float)))
                << "bs=" << bs << " shuffle=" << shuffle;
          }
        }
      }
      // Each token alone gives the same bits as inside the batch.
      for (std::int64_t t = 0; t < T; ++t) {
        std::vector<float> one(static_cast<std::size_t>(c.heads * c.hd));
        paged_attention(isa, q.data() + t * c.heads * c.hd, 1, c.heads, positions + t, base.cache, scale, one.data(),
                        scratch.data(), &p2);
        ASSERT_EQ(0, std::memcmp(one.data(), out0.data() + t * c.heads * c.hd, one.size() * sizeof(float)))
            << "token " << t;
      }
    }
  }
}

// A prefill: every token of a chunk in one call (consecutive positions, so tiles of tokens share
// a pass over the keys, the later tokens of a tile attending a few keys more). Each token gives
// the bits it gives alone (a decode step at that position) and the bits of the one-head
// PagedKvView kernel, whatever the thread count, block size and the chunk's start.
TEST(PagedKvCacheAttention, PrefillTilesGiveEachTokensOwnBits) {
  ThreadPool p2(2), p3(3);
  struct Case {
    std::int64_t ctx, heads, kv_heads, hd, start;
  };
  // Groups of 2 (two tokens per tile), 1 (four), 4 (one) and 3; a chunk that starts mid-sequence;
  // a head_dim with a vector tail.
  const Case cases[] = {{83, 16, 8, 64, 0}, {70, 4, 4, 40, 13}, {45, 8, 2, 64, 0}, {51, 6, 2, 72, 22}};
  std::uint32_t seed = 900;
  for (Isa isa : supported_isas()) {
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(isa_name(isa)) + " ctx=" + std::to_string(c.ctx) + " heads=" + std::to_string(c.heads));
      const Sequence s{c.ctx, c.kv_heads, c.hd, random_floats(c.kv_heads * c.ctx * c.hd, ++seed, -2, 2),
                       random_floats(c.kv_heads * c.ctx * c.hd, ++seed, -1, 1)};
      const std::int64_t T = c.ctx - c.start;
      std::vector<std::int64_t> positions(static_cast<std::size_t>(T));
      std::iota(positions.begin(), positions.end(), c.start);
      const std::vector<float> q = random_floats(T * c.heads * c.hd, ++seed, -2, 2);
      const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
      std::vector<float> scratch(static_cast<std::size_t>(paged_kv_cache_scratch_floats(&p3, c.ctx, c.heads, c.kv_heads)));
      const std::int64_t row = c.heads * c.hd;
      const auto out_n = static_cast<std::size_t>(T * row);
      const PagedCache base = page(s, 16, DType::kBF16, 0);
      // Each token alone.
      std::vector<float> alone(out_n);
      for (std::int64_t t = 0; t < T; ++t) {
        paged_attention(isa, q.data() + t * row, 1, c.heads, positions.data() + t, base.cache, scale,
                        alone.data() + t * row, scratch.data(), nullptr);
      }
      std::vector<double> ref;
      reference_attention(Sequence{c.ctx, c.kv_heads, c.hd, bf16_rounded(s.k), bf16_rounded(s.v)}, q.data(), T,
                          c.heads, positions.data(), scale, &ref);
      for (std::size_t i = 0; i < out_n; ++i) ASSERT_NEAR(alone[i], ref[i], 1e-5) << "element " << i;
      // The one-head kernel over an f32 view of the same rounded values.
      const PagedCache f32 = page(Sequence{c.ctx, c.kv_heads, c.hd, bf16_rounded(s.k), bf16_rounded(s.v)}, 16,
                                  DType::kF32, 0);
      const PagedKvView view{f32.kb_f32.data(), f32.vb_f32.data(), 16, c.ctx, c.kv_heads, c.hd};
      std::vector<float> out_view(out_n);
      paged_attention(isa, q.data(), T, c.heads, positions.data(), view, scale, out_view.data(), scratch.data(), nullptr);
      EXPECT_EQ(0, std::memcmp(out_view.data(), alone.data(), out_n * sizeof(float)));
      for (std::int64_t bs : {16, 5}) {
        const PagedCache pc = page(s, bs, DType::kBF16, bs == 5 ? 31u : 0u);
        for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p2, &p3}) {
          std::vector<float> out(out_n);
          paged_attention(isa, q.data(), T, c.heads, positions.data(), pc.cache, scale, out.data(), scratch.data(),
                          pool);
          for (std::int64_t t = 0; t < T; ++t) {
            ASSERT_EQ(0, std::memcmp(out.data() + t * row, alone.data() + t * row, static_cast<std::size_t>(row) * 4))
                << "token " << t << " bs=" << bs;
          }
        }
      }
    }
  }
}

// The sequence in the engine's block format: block b holds its keys and then, value_offset_bytes
// in, its values; blocks placed in a pool in shuffled order, unused slots poisoned.
struct CombinedCache {
  std::vector<std::byte> pool;
  std::vector<const std::byte*> blocks;
  PagedKvCache cache;
};

CombinedCache page_combined(const Sequence& s, std::int64_t bs, DType dtype, std::uint32_t shuffle_seed) {
  CombinedCache p;
  const std::int64_t eb = dtype_bytes(dtype);
  const std::int64_t nblocks = (s.ctx + bs - 1) / bs;
  const std::int64_t half = s.kv_heads * bs * s.hd * eb;
  std::vector<std::int64_t> slot(static_cast<std::size_t>(nblocks + 3));
  std::iota(slot.begin(), slot.end(), 0);
  std::shuffle(slot.begin(), slot.end(), std::mt19937(shuffle_seed));
  p.pool.assign(static_cast<std::size_t>((nblocks + 3) * 2 * half), std::byte{0xff});
  for (std::int64_t b = 0; b < nblocks; ++b) {
    std::byte* dst = p.pool.data() + slot[static_cast<std::size_t>(b)] * 2 * half;
    p.blocks.push_back(dst);
    store_block(s, b, bs, dtype, dst, dst + half);
  }
  p.cache.dtype = dtype;
  p.cache.block_size = bs;
  p.cache.context_len = s.ctx;
  p.cache.num_kv_heads = s.kv_heads;
  p.cache.head_dim = s.hd;
  p.cache.blocks = p.blocks.data();
  p.cache.value_offset_bytes = half;
  return p;
}

// A batched step: decode sequences of many lengths, a prefill chunk long enough to be split over
// the pool and a sequence with no tokens, each over its own cache in the engine's block format, q
// and out rows with strides wider than the heads. Every sequence gets, bit for bit, what
// paged_attention over it alone gives, for every ISA, both KV dtypes and 1-3 threads.
TEST(PagedKvCacheAttention, BatchGivesEachSequenceItsOwnBits) {
  ThreadPool p2(2), p3(3);
  const std::int64_t heads = 8, kv_heads = 2, hd = 64, q_stride = heads * hd + 96, out_stride = heads * hd + 16;
  struct Seq {
    std::int64_t ctx, tokens;
  };
  // Decodes (1 token) of 1 .. 700 positions, a 300-token prefill chunk at 100 (2 x 300 x 250 x 8
  // x 64 multiply-adds: split over the pool), an empty slice.
  const Seq seqs[] = {{1, 1}, {17, 1}, {48, 1}, {700, 1}, {400, 300}, {33, 1}, {5, 0}, {129, 1}, {64, 3}};
  std::uint32_t seed = 1300;
  for (DType dtype : {DType::kBF16, DType::kF32}) {
    std::vector<Sequence> data;
    std::vector<CombinedCache> caches;
    std::vector<std::vector<float>> q;
    std::int64_t max_ctx = 0;
    for (const Seq& sq : seqs) {
      data.push_back(Sequence{sq.ctx, kv_heads, hd, random_floats(kv_heads * sq.ctx * hd, ++seed, -2, 2),
                              random_floats(kv_heads * sq.ctx * hd, ++seed, -1, 1)});
      caches.push_back(page_combined(data.back(), 16, dtype, ++seed));
      q.push_back(random_floats(std::max<std::int64_t>(sq.tokens, 1) * q_stride, ++seed, -2, 2));
      max_ctx = std::max(max_ctx, sq.ctx);
    }
    const float scale = 0.125f;
    std::vector<float> scratch(static_cast<std::size_t>(paged_kv_cache_scratch_floats(&p3, max_ctx, heads, kv_heads)));
    for (Isa isa : supported_isas()) {
      // Each sequence alone: contiguous q, the positions listed, the separate key / value lists.
      std::vector<std::vector<float>> alone;
      for (std::size_t i = 0; i < std::size(seqs); ++i) {
        const Seq& sq = seqs[i];
        std::vector<float> qc(static_cast<std::size_t>(sq.tokens * heads * hd));
        std::vector<std::int64_t> pos(static_cast<std::size_t>(sq.tokens));
        for (std::int64_t t = 0; t < sq.tokens; ++t) {
          std::copy_n(q[i].data() + t * q_stride, heads * hd, qc.data() + t * heads * hd);
          pos[static_cast<std::size_t>(t)] = sq.ctx - sq.tokens + t;
        }
        const PagedCache separate = page(data[i], 16, dtype, 0);
        alone.emplace_back(qc.size());
        paged_attention(isa, qc.data(), sq.tokens, heads, pos.data(), separate.cache, scale, alone.back().data(),
                        scratch.data(), nullptr);
      }
      for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p2, &p3}) {
        SCOPED_TRACE(std::string(isa_name(isa)) + " " + std::string(dtype_name(dtype)) + " threads " +
                     std::to_string(pool != nullptr ? pool->num_threads() : 1));
        std::vector<std::vector<float>> out;
        std::vector<AttentionSequence> batch;
        for (std::size_t i = 0; i < std::size(seqs); ++i) {
          out.emplace_back(static_cast<std::size_t>(std::max<std::int64_t>(seqs[i].tokens, 1) * out_stride), -3.0f);
        }
        for (std::size_t i = 0; i < std::size(seqs); ++i) {
          AttentionSequence a;
          a.q = q[i].data();
          a.q_stride = q_stride;
          a.num_tokens = seqs[i].tokens;
          a.start_pos = seqs[i].ctx - seqs[i].tokens;
          a.kv = caches[i].cache;
          a.out = out[i].data();
          a.out_stride = out_stride;
          batch.push_back(a);
        }
        paged_attention_batch(isa, batch, heads, scale, scratch.data(), pool);
        for (std::size_t i = 0; i < std::size(seqs); ++i) {
          for (std::int64_t t = 0; t < seqs[i].tokens; ++t) {
            ASSERT_EQ(0, std::memcmp(out[i].data() + t * out_stride, alone[i].data() + t * heads * hd,
                                     static_cast<std::size_t>(heads * hd) * sizeof(float)))
                << "sequence " << i << " token " << t;
            // The gap between strided rows is untouched.
            ASSERT_EQ(out[i][static_cast<std::size_t>(t * out_stride + heads * hd)], -3.0f);
          }
        }
      }
    }
  }
}

// AttentionArithmetic::kAmx (q.k and P.V on AMX tiles, up to 16 query rows per call): a prefill chunk in one
// call gives every token the bits it gets alone (a decode step), whatever the threads, the block
// size (which sets the key tile: 16, 7, 5 or 256 keys per block) and the placement of the blocks;
// the batch entry gives each sequence its own bits; the result is within bf16-activation error of
// the double reference and differs from the f32 scores (so the AMX path ran). A head_dim the AMX
// scores do not take (odd, or above 128) keeps the f32 scores' bits.
TEST(PagedKvCacheAttention, AmxIsBatchInvariantAndClose) {
  if (!gemm_activations_supported(GemmActivations::kAmx)) GTEST_SKIP() << "no AMX-BF16 on this CPU";
  ThreadPool p2(2), p3(3);
  struct Case {
    std::int64_t ctx, heads, kv_heads, hd, start;
    bool amx;  // the AMX scores apply
  };
  // GQA groups of 2 (8 tokens per 16-row tile), 1 (16 tokens), 4 and 7 (7 rows); head_dims with a
  // last score block of 8 (40, 72) and 2 (66) elements, 128 (four blocks), 80 (a last weighted-V
  // pass of 16 columns); 40, 66 and 72 keep the f32 weighted V (not multiples of 16), 33 and 160
  // all of the f32 arithmetic.
  const Case cases[] = {{300, 16, 8, 64, 0, true},  {70, 4, 4, 40, 13, true},  {129, 8, 2, 72, 60, true},
                        {90, 14, 2, 128, 31, true}, {50, 4, 2, 66, 0, true},   {61, 4, 2, 80, 9, true},
                        {40, 4, 2, 33, 3, false},
                        {40, 4, 2, 160, 3, false}};
  std::uint32_t seed = 1300;
  const Isa isa = Isa::kAvx512Bf16;
  for (const Case& c : cases) {
    SCOPED_TRACE("ctx=" + std::to_string(c.ctx) + " heads=" + std::to_string(c.heads) + "/" +
                 std::to_string(c.kv_heads) + " hd=" + std::to_string(c.hd));
    const Sequence s{c.ctx, c.kv_heads, c.hd, random_floats(c.kv_heads * c.ctx * c.hd, ++seed, -2, 2),
                     random_floats(c.kv_heads * c.ctx * c.hd, ++seed, -1, 1)};
    const Sequence rounded{c.ctx, c.kv_heads, c.hd, bf16_rounded(s.k), bf16_rounded(s.v)};
    const std::int64_t T = c.ctx - c.start;
    std::vector<std::int64_t> positions(static_cast<std::size_t>(T));
    std::iota(positions.begin(), positions.end(), c.start);
    const std::vector<float> q = random_floats(T * c.heads * c.hd, ++seed, -2, 2);
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
    std::vector<float> scratch(
        static_cast<std::size_t>(paged_kv_cache_scratch_floats(&p3, c.ctx, c.heads, c.kv_heads, AttentionArithmetic::kAmx)));
    const std::int64_t row = c.heads * c.hd;
    const auto out_n = static_cast<std::size_t>(T * row);

    const PagedCache base = page(s, 16, DType::kBF16, 0);
    std::vector<float> out0(out_n), f32_scores(out_n);
    paged_attention(isa, q.data(), T, c.heads, positions.data(), base.cache, scale, out0.data(), scratch.data(), nullptr,
                    AttentionArithmetic::kAmx);
    paged_attention(isa, q.data(), T, c.heads, positions.data(), base.cache, scale, f32_scores.data(), scratch.data(),
                    nullptr, AttentionArithmetic::kF32);
    const bool same_as_f32 = std::memcmp(out0.data(), f32_scores.data(), out_n * sizeof(float)) == 0;
    EXPECT_EQ(same_as_f32, !c.amx) << "the AMX scores ran exactly where they apply";

    std::vector<double> ref;
    reference_attention(rounded, q.data(), T, c.heads, positions.data(), scale, &ref);
    double max_err = 0;
    for (std::size_t i = 0; i < out_n; ++i) max_err = std::max(max_err, std::abs(out0[i] - ref[i]));
    // q rounded to bf16 (relative 2^-9 per element): the outputs (|v| <= 1) move by a few 1e-3.
    EXPECT_LT(max_err, c.amx ? 2e-2 : 1e-5);
    std::printf("amx attention ctx %lld hd %lld: max |out - reference| %.3g\n", static_cast<long long>(c.ctx),
                static_cast<long long>(c.hd), max_err);

    for (std::int64_t bs : {16, 7, 5, 256}) {
      for (std::uint32_t shuffle : {0u, 31u}) {
        const PagedCache pc = page(s, bs, DType::kBF16, shuffle);
        for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p2, &p3}) {
          std::vector<float> out(out_n);
          paged_attention(isa, q.data(), T, c.heads, positions.data(), pc.cache, scale, out.data(), scratch.data(), pool,
                          AttentionArithmetic::kAmx);
          ASSERT_EQ(0, std::memcmp(out.data(), out0.data(), out_n * sizeof(float))) << "bs=" << bs << " shuffle=" << shuffle;
        }
      }
    }
    // Each token alone (a decode step), and the chunk split at odd places, give the same bits.
    for (std::int64_t t = 0; t < T; ++t) {
      std::vector<float> one(static_cast<std::size_t>(row));
      paged_attention(isa, q.data() + t * row, 1, c.heads, positions.data() + t, base.cache, scale, one.data(),
                      scratch.data(), &p2, AttentionArithmetic::kAmx);
      ASSERT_EQ(0, std::memcmp(one.data(), out0.data() + t * row, one.size() * sizeof(float))) << "token " << t;
    }
    std::vector<AttentionSequence> parts;
    std::vector<float> split(out_n);
    for (std::int64_t t0 = 0; t0 < T;) {
      const std::int64_t n = std::min<std::int64_t>(T - t0, 1 + (t0 * 7 + 3) % 11);
      AttentionSequence a;
      a.q = q.data() + t0 * row;
      a.q_stride = row;
      a.num_tokens = n;
      a.start_pos = c.start + t0;
      a.kv = base.cache;
      a.kv.context_len = c.start + t0 + n;
      a.out = split.data() + t0 * row;
      a.out_stride = row;
      parts.push_back(a);
      t0 += n;
    }
    paged_attention_batch(isa, parts, c.heads, scale, scratch.data(), &p2, AttentionArithmetic::kAmx);
    EXPECT_EQ(0, std::memcmp(split.data(), out0.data(), out_n * sizeof(float))) << "chunks through the batch entry";
  }
}

TEST(StoreKvRow, Bf16RoundsToNearestEvenLikeCommonDtype) {
  std::vector<float> x = random_floats(1000, 7, -1e3f, 1e3f);
  const float specials[] = {0.0f, -0.0f, 1.0f + 1.0f / 256, 1.0f + 3.0f / 256, -(1.0f + 1.0f / 256),
                            std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::max(), 3.3895314e38f};
  x.insert(x.end(), std::begin(specials), std::end(specials));
  std::vector<std::uint16_t> got(x.size());
  store_kv_row(x.data(), static_cast<std::int64_t>(x.size()), DType::kBF16, got.data());
  for (std::size_t i = 0; i < x.size(); ++i) ASSERT_EQ(got[i], f32_to_bf16(x[i])) << "element " << i << " = " << x[i];
  EXPECT_EQ(bf16_to_f32(got[1000 + 2]), 1.0f);                // tie: to even
  EXPECT_EQ(bf16_to_f32(got[1000 + 3]), 1.0f + 4.0f / 256);   // above the tie: up
  EXPECT_TRUE(std::isnan(bf16_to_f32(got[1000 + 7])));
  std::vector<float> copy(x.size());
  store_kv_row(x.data(), static_cast<std::int64_t>(x.size()), DType::kF32, copy.data());
  EXPECT_EQ(0, std::memcmp(copy.data(), x.data(), x.size() * sizeof(float)));
}

}  // namespace
}  // namespace kun::kernels
