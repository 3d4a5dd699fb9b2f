// Front end of paged attention over a PagedKvCache (f32 or bf16 elements): argument checks,
// threading, and dispatch to the per-ISA bodies of attention_impl.inc.
#include <algorithm>
#include <cstring>

#include "common/check.h"
#include "kernels/attention_internal.h"
#include "kernels/kernels.h"

namespace kun::kernels {
namespace {

using detail::AttentionKernels;

const AttentionKernels& attention_kernels_for(Isa isa, AttentionArithmetic arithmetic = AttentionArithmetic::kF32) {
  KUN_CHECK(isa_supported(isa)) << "ISA " << isa_name(isa) << " not supported by this CPU";
  if (arithmetic == AttentionArithmetic::kAmx) {
    KUN_CHECK(gemm_activations_supported(GemmActivations::kAmx) && isa == Isa::kAvx512Bf16)
        << "AMX attention needs AMX-BF16 and the avx512bf16 ISA (asked with ISA " << isa_name(isa) << ")";
    return detail::amx_attention_kernels();
  }
  switch (isa) {
    case Isa::kScalar: return detail::scalar_attention_kernels();
    case Isa::kAvx2: return detail::avx2_attention_kernels();
    case Isa::kAvx512:
    case Isa::kAvx512Bf16: return detail::avx512_attention_kernels();
  }
  return detail::scalar_attention_kernels();
}

// Below this many multiply-adds (q.k and p.V over every attended position of every head) a
// sequence is not split over the pool: a decode step of a short sequence takes a few
// microseconds, about what handing half of it to a worker and waiting for it back costs. A
// batched decode step's short sequences are dealt whole to the threads instead
// (paged_attention_batch).
constexpr std::int64_t kMinParallelMacs = 1 << 19;

using RowsFn = void (*)(const float* const*, float* const*, const std::int64_t*, int, const PagedKvCache&,
                       std::int64_t, float, float*, std::int64_t);

// Query heads computed together: a GQA group, in chunks of at most max_rows.
std::int64_t heads_per_unit(std::int64_t num_heads, std::int64_t num_kv_heads, std::int64_t max_rows) {
  const std::int64_t group = num_heads / num_kv_heads;
  return group < max_rows ? group : max_rows;
}

struct CacheJob {
  RowsFn rows;
  const float* q;
  std::int64_t q_stride;         // floats from one token's q row to the next
  std::int64_t num_tokens;
  std::int64_t num_heads;
  std::int64_t chunk;            // heads per unit
  std::int64_t tile_tokens;      // tokens per unit (chunk x tile_tokens <= the table's max_rows)
  std::int64_t units_per_tile;   // kv heads x head chunks
  const std::int64_t* positions;  // token t at positions[t], or (null) at start_pos + t
  std::int64_t start_pos;
  const PagedKvCache* kv;
  float scale;
  float* out;
  std::int64_t out_stride;
  float* scratch;
  int parts;
  std::int64_t units;
  std::int64_t macs;             // q.k and p.V multiply-adds of the whole job
  std::int64_t scratch_rows;     // the table's max_rows: score rows per thread's scratch slice
};

std::int64_t position(const CacheJob& j, std::int64_t t) { return j.positions != nullptr ? j.positions[t] : j.start_pos + t; }

// Unit u: token tile u / units_per_tile (tile_tokens consecutive tokens of the call), kv head and
// head chunk from the rest; its rows are (token, head) for every token of the tile and head of
// the chunk.
void cache_unit(const CacheJob& j, std::int64_t u, float* scratch) {
  const std::int64_t hd = j.kv->head_dim;
  const std::int64_t group = j.num_heads / j.kv->num_kv_heads;
  const std::int64_t chunks_per_kv = (group + j.chunk - 1) / j.chunk;
  const std::int64_t tile = u / j.units_per_tile;
  const std::int64_t r = u % j.units_per_tile;
  const std::int64_t kvh = r / chunks_per_kv;
  const std::int64_t h0 = kvh * group + (r % chunks_per_kv) * j.chunk;
  const std::int64_t n = std::min(j.chunk, kvh * group + group - h0);
  const std::int64_t t0 = tile * j.tile_tokens;
  const std::int64_t t1 = std::min(j.num_tokens, t0 + j.tile_tokens);
  const float* q[detail::kMaxTableRows];
  float* out[detail::kMaxTableRows];
  std::int64_t n_ctx[detail::kMaxTableRows];
  int rows = 0;
  for (std::int64_t t = t0; t < t1; ++t) {
    for (std::int64_t h = h0; h < h0 + n; ++h, ++rows) {
      q[rows] = j.q + t * j.q_stride + h * hd;
      out[rows] = j.out + t * j.out_stride + h * hd;
      n_ctx[rows] = position(j, t) + 1;
    }
  }
  j.rows(q, out, n_ctx, rows, *j.kv, kvh, j.scale, scratch, j.kv->context_len);
}

// Checks one sequence's arguments and sets up its job (units and their grouping depend only on
// the head counts and the tokens, never on the pool or on other sequences).
CacheJob make_job(const AttentionKernels& k, const float* q, std::int64_t q_stride, std::int64_t num_tokens,
                  std::int64_t num_heads, const std::int64_t* positions, std::int64_t start_pos, const PagedKvCache& kv,
                  float scale, float* out, std::int64_t out_stride, float* scratch, int parts) {
  KUN_CHECK(kv.dtype == DType::kBF16 || kv.dtype == DType::kF32)
      << "KV cache dtype " << dtype_name(kv.dtype) << " (bf16 or f32)";
  KUN_CHECK(kv.num_kv_heads > 0 && num_heads % kv.num_kv_heads == 0)
      << "num_heads " << num_heads << " num_kv_heads " << kv.num_kv_heads;
  KUN_CHECK(kv.block_size > 0 && kv.head_dim > 0 && scratch != nullptr) << "bad kv cache or scratch";
  KUN_CHECK((kv.key_blocks != nullptr && kv.value_blocks != nullptr) ||
            (kv.key_blocks == nullptr && kv.value_blocks == nullptr && kv.blocks != nullptr))
      << "kv blocks: key and value lists, or one list of blocks";
  KUN_CHECK(q != nullptr && out != nullptr && q_stride >= num_heads * kv.head_dim && out_stride >= num_heads * kv.head_dim)
      << "q / out rows of " << q_stride << " / " << out_stride << " floats for " << num_heads << " heads of " << kv.head_dim;
  const std::int64_t chunk = heads_per_unit(num_heads, kv.num_kv_heads, k.max_rows);
  const std::int64_t group = num_heads / kv.num_kv_heads;
  const std::int64_t units_per_tile = kv.num_kv_heads * ((group + chunk - 1) / chunk);
  const std::int64_t tile_tokens = std::max<std::int64_t>(1, k.max_rows / chunk);
  CacheJob job{kv.dtype == DType::kBF16 ? k.rows_bf16 : k.rows_f32,
               q, q_stride, num_tokens, num_heads, chunk, tile_tokens, units_per_tile, positions, start_pos, &kv,
               scale, out, out_stride, scratch, parts, 0, 0, k.max_rows};
  // Positions attended over all tokens: a sum over the listed positions, or in closed form for
  // consecutive ones (so paged_attention_batch, which sets a sequence's job up twice, pays O(1)).
  std::int64_t attended = 0;
  if (positions == nullptr) {
    KUN_CHECK(start_pos >= 0 && start_pos + num_tokens <= kv.context_len)
        << "tokens at positions [" << start_pos << ", " << start_pos + num_tokens << ") context_len " << kv.context_len;
    attended = num_tokens * start_pos + num_tokens * (num_tokens + 1) / 2;
  } else {
    for (std::int64_t t = 0; t < num_tokens; ++t) {
      const std::int64_t pos = positions[t];
      KUN_CHECK(pos >= 0 && pos < kv.context_len) << "token " << t << " position " << pos << " context_len " << kv.context_len;
      attended += pos + 1;
    }
  }
  job.units = (num_tokens + tile_tokens - 1) / tile_tokens * units_per_tile;
  job.macs = 2 * attended * num_heads * kv.head_dim;
  return job;
}

void run_serial(const CacheJob& j, float* scratch) {
  for (std::int64_t u = 0; u < j.units; ++u) cache_unit(j, u, scratch);
}

// Whether a job is worth splitting over the pool (see kMinParallelMacs).
bool worth_splitting(const CacheJob& j) { return j.parts > 1 && j.units > 1 && j.macs >= kMinParallelMacs; }

// A job worth splitting over the pool, else on the caller.
void run_job(const CacheJob& job, ThreadPool* pool) {
  if (!worth_splitting(job)) {
    run_serial(job, job.scratch);
    return;
  }
  const CacheJob* jp = &job;  // captured by pointer: std::function keeps it inline (no heap)
  // One index per thread, so each thread knows its scratch slice. Thread t takes units t,
  // t + parts, ...: a causal prefill's later tokens cost more, and a contiguous split would give
  // the last thread most of the work. Which thread computes a unit never changes its value.
  pool->parallel_for(job.parts, [jp](std::int64_t b, std::int64_t e) {
    for (std::int64_t t = b; t < e; ++t) {
      float* s = jp->scratch + t * jp->scratch_rows * jp->kv->context_len;
      for (std::int64_t u = t; u < jp->units; u += jp->parts) cache_unit(*jp, u, s);
    }
  });
}

struct BatchJob {
  const AttentionKernels* k;
  std::span<const AttentionSequence> seqs;
  std::int64_t num_heads;
  float scale;
  float* scratch;
  std::int64_t scratch_stride;  // floats per thread
};

}  // namespace

void paged_attention(Isa isa, const float* q, std::int64_t num_tokens, std::int64_t num_heads,
                     const std::int64_t* positions, const PagedKvCache& kv, float scale, float* out,
                     float* scratch, ThreadPool* pool, AttentionArithmetic arithmetic) {
  if (num_tokens <= 0) return;
  const std::int64_t row = num_heads * kv.head_dim;
  const CacheJob job = make_job(attention_kernels_for(isa, arithmetic), q, row, num_tokens, num_heads, positions, 0, kv, scale, out,
                                row, scratch, pool != nullptr ? pool->num_threads() : 1);
  run_job(job, pool);
}

void paged_attention_batch(Isa isa, std::span<const AttentionSequence> seqs, std::int64_t num_heads, float scale,
                           float* scratch, ThreadPool* pool, AttentionArithmetic arithmetic) {
  const AttentionKernels& k = attention_kernels_for(isa, arithmetic);
  const int parts = pool != nullptr ? pool->num_threads() : 1;
  // The sequences worth splitting run over the pool one after the other; the others are dealt
  // whole to the threads, each on its thread's scratch slice (their jobs set up again there:
  // nothing per sequence is stored, and the set-up is O(1)).
  std::int64_t small = 0, small_macs = 0, max_context = 0;
  for (const AttentionSequence& s : seqs) {
    if (s.num_tokens <= 0) continue;
    max_context = std::max(max_context, s.kv.context_len);
    const CacheJob job = make_job(k, s.q, s.q_stride, s.num_tokens, num_heads, nullptr, s.start_pos, s.kv, scale, s.out,
                                  s.out_stride, scratch, parts);
    if (worth_splitting(job)) {
      run_job(job, pool);
    } else {
      ++small;
      small_macs += job.macs;
    }
  }
  if (small == 0) return;
  const BatchJob batch{&k, seqs, num_heads, scale, scratch, k.max_rows * max_context};
  const BatchJob* bp = &batch;
  auto body = [bp, parts](std::int64_t b, std::int64_t e) {
    // Inside the pool: this thread's slice; on the caller alone (-1): the first.
    const int t = std::max(0, ThreadPool::current_thread_index());
    float* s = bp->scratch + t * bp->scratch_stride;
    for (std::int64_t i = b; i < e; ++i) {
      const AttentionSequence& q = bp->seqs[static_cast<std::size_t>(i)];
      if (q.num_tokens <= 0) continue;
      const CacheJob job = make_job(*bp->k, q.q, q.q_stride, q.num_tokens, bp->num_heads, nullptr, q.start_pos, q.kv,
                                    bp->scale, q.out, q.out_stride, s, parts);
      if (worth_splitting(job)) continue;  // ran above
      run_serial(job, s);
    }
  };
  if (parts == 1 || small == 1 || small_macs < kMinParallelMacs) {
    body(0, static_cast<std::int64_t>(seqs.size()));
    return;
  }
  pool->parallel_for_balanced(static_cast<std::int64_t>(seqs.size()), 1, body);
}

void paged_attention_batch(std::span<const AttentionSequence> seqs, std::int64_t num_heads, float scale, float* scratch,
                           ThreadPool* pool, AttentionArithmetic arithmetic) {
  paged_attention_batch(active_isa(), seqs, num_heads, scale, scratch, pool, arithmetic);
}

AttentionArithmetic attention_arithmetic_for(DType weight_dtype) {
  return active_gemm_activations() == GemmActivations::kAmx && weight_dtype == DType::kBF16 ? AttentionArithmetic::kAmx
                                                                                            : AttentionArithmetic::kF32;
}

std::int64_t paged_kv_cache_scratch_floats(const ThreadPool* pool, std::int64_t context_len, std::int64_t num_heads,
                                           std::int64_t num_kv_heads, AttentionArithmetic arithmetic) {
  KUN_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0)
      << "num_heads " << num_heads << " num_kv_heads " << num_kv_heads;
  const std::int64_t rows = arithmetic == AttentionArithmetic::kAmx ? detail::kMaxTableRows : detail::kMaxRows;
  return (pool != nullptr ? pool->num_threads() : 1) * rows * context_len;
}

void paged_attention(const float* q, std::int64_t num_tokens, std::int64_t num_heads,
                     const std::int64_t* positions, const PagedKvCache& kv, float scale, float* out,
                     float* scratch, ThreadPool* pool, AttentionArithmetic arithmetic) {
  paged_attention(active_isa(), q, num_tokens, num_heads, positions, kv, scale, out, scratch, pool, arithmetic);
}

void store_kv_row(const float* x, std::int64_t n, DType dtype, void* out) {
  KUN_CHECK_GE(n, 0);
  if (dtype == DType::kF32) {
    std::memcpy(out, x, static_cast<std::size_t>(n) * sizeof(float));
    return;
  }
  KUN_CHECK(dtype == DType::kBF16) << "KV cache dtype " << dtype_name(dtype) << " (bf16 or f32)";
  attention_kernels_for(active_isa()).to_bf16(x, n, static_cast<std::uint16_t*>(out));
}

}  // namespace kun::kernels
