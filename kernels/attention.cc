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

const AttentionKernels& attention_kernels_for(Isa isa) {
  KUN_CHECK(isa_supported(isa)) << "ISA " << isa_name(isa) << " not supported by this CPU";
  switch (isa) {
    case Isa::kScalar: return detail::scalar_attention_kernels();
    case Isa::kAvx2: return detail::avx2_attention_kernels();
    case Isa::kAvx512:
    case Isa::kAvx512Bf16: return detail::avx512_attention_kernels();
  }
  return detail::scalar_attention_kernels();
}

using HeadsFn = void (*)(const float*, int, const PagedKvCache&, std::int64_t, std::int64_t, float, float*, float*);

// Query heads computed together: a GQA group, in chunks of at most kMaxGroupHeads.
std::int64_t heads_per_unit(std::int64_t num_heads, std::int64_t num_kv_heads) {
  const std::int64_t group = num_heads / num_kv_heads;
  return group < detail::kMaxGroupHeads ? group : detail::kMaxGroupHeads;
}

struct CacheJob {
  HeadsFn heads;
  const float* q;
  std::int64_t num_heads;
  std::int64_t chunk;            // heads per unit
  std::int64_t units_per_token;  // num_heads / chunk, rounded up within each kv head
  const std::int64_t* positions;
  const PagedKvCache* kv;
  float scale;
  float* out;
  float* scratch;
  int parts;
};

// Units [begin, end): unit u is token u / units_per_token, kv head and head chunk from the rest.
void cache_units(const CacheJob& j, std::int64_t begin, std::int64_t end, float* scratch) {
  const std::int64_t hd = j.kv->head_dim;
  const std::int64_t group = j.num_heads / j.kv->num_kv_heads;
  const std::int64_t chunks_per_kv = (group + j.chunk - 1) / j.chunk;
  for (std::int64_t u = begin; u < end; ++u) {
    const std::int64_t t = u / j.units_per_token;
    const std::int64_t r = u % j.units_per_token;
    const std::int64_t kvh = r / chunks_per_kv;
    const std::int64_t h0 = kvh * group + (r % chunks_per_kv) * j.chunk;
    const std::int64_t n = std::min(j.chunk, kvh * group + group - h0);
    const std::int64_t off = (t * j.num_heads + h0) * hd;
    j.heads(j.q + off, static_cast<int>(n), *j.kv, kvh, j.positions[t] + 1, j.scale, j.out + off, scratch);
  }
}

}  // namespace

void paged_attention(Isa isa, const float* q, std::int64_t num_tokens, std::int64_t num_heads,
                     const std::int64_t* positions, const PagedKvCache& kv, float scale, float* out,
                     float* scratch, ThreadPool* pool) {
  if (num_tokens <= 0) return;
  KUN_CHECK(kv.dtype == DType::kBF16 || kv.dtype == DType::kF32)
      << "KV cache dtype " << dtype_name(kv.dtype) << " (bf16 or f32)";
  KUN_CHECK(kv.num_kv_heads > 0 && num_heads % kv.num_kv_heads == 0)
      << "num_heads " << num_heads << " num_kv_heads " << kv.num_kv_heads;
  KUN_CHECK(kv.block_size > 0 && kv.head_dim > 0 && scratch != nullptr) << "bad kv cache or scratch";
  KUN_CHECK(kv.key_blocks != nullptr && kv.value_blocks != nullptr) << "null kv block lists";
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    KUN_CHECK(positions[t] >= 0 && positions[t] < kv.context_len)
        << "token " << t << " position " << positions[t] << " context_len " << kv.context_len;
  }
  const AttentionKernels& k = attention_kernels_for(isa);
  const int parts = pool != nullptr ? pool->num_threads() : 1;
  const std::int64_t chunk = heads_per_unit(num_heads, kv.num_kv_heads);
  const std::int64_t group = num_heads / kv.num_kv_heads;
  const std::int64_t units_per_token = kv.num_kv_heads * ((group + chunk - 1) / chunk);
  const CacheJob job{kv.dtype == DType::kBF16 ? k.heads_bf16 : k.heads_f32,
                     q, num_heads, chunk, units_per_token, positions, &kv, scale, out, scratch, parts};
  const std::int64_t units = num_tokens * units_per_token;
  if (parts == 1 || units == 1) {
    cache_units(job, 0, units, scratch);
    return;
  }
  const CacheJob* jp = &job;  // captured by pointer: std::function keeps it inline (no heap)
  // One index per thread, so each thread knows its scratch slice; a fixed split over units
  // (which thread computes a unit never changes its value).
  pool->parallel_for(parts, [jp, units](std::int64_t b, std::int64_t e) {
    for (std::int64_t t = b; t < e; ++t) {
      cache_units(*jp, units * t / jp->parts, units * (t + 1) / jp->parts,
                  jp->scratch + t * jp->chunk * jp->kv->context_len);
    }
  });
}

std::int64_t paged_kv_cache_scratch_floats(const ThreadPool* pool, std::int64_t context_len, std::int64_t num_heads,
                                           std::int64_t num_kv_heads) {
  KUN_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0)
      << "num_heads " << num_heads << " num_kv_heads " << num_kv_heads;
  return (pool != nullptr ? pool->num_threads() : 1) * heads_per_unit(num_heads, num_kv_heads) * context_len;
}

void paged_attention(const float* q, std::int64_t num_tokens, std::int64_t num_heads,
                     const std::int64_t* positions, const PagedKvCache& kv, float scale, float* out,
                     float* scratch, ThreadPool* pool) {
  paged_attention(active_isa(), q, num_tokens, num_heads, positions, kv, scale, out, scratch, pool);
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
