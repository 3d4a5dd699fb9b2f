// Front end of paged attention over a PagedKvCache (f32 or bf16 elements): argument checks,
// threading, and dispatch to the per-ISA bodies of attention_impl.inc.
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

using HeadFn = void (*)(const float*, const PagedKvCache&, std::int64_t, std::int64_t, float, float*, float*);

struct CacheJob {
  HeadFn head;
  const float* q;
  std::int64_t num_heads;
  const std::int64_t* positions;
  const PagedKvCache* kv;
  float scale;
  float* out;
  float* scratch;
  int parts;
};

// (token, head) pairs [begin, end), one head at a time.
void cache_pairs(const CacheJob& j, std::int64_t begin, std::int64_t end, float* scratch) {
  const std::int64_t hd = j.kv->head_dim;
  const std::int64_t group = j.num_heads / j.kv->num_kv_heads;
  for (std::int64_t p = begin; p < end; ++p) {
    const std::int64_t t = p / j.num_heads;
    const std::int64_t h = p % j.num_heads;
    const std::int64_t off = (t * j.num_heads + h) * hd;
    j.head(j.q + off, *j.kv, h / group, j.positions[t] + 1, j.scale, j.out + off, scratch);
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
  const CacheJob job{kv.dtype == DType::kBF16 ? k.head_bf16 : k.head_f32,
                     q, num_heads, positions, &kv, scale, out, scratch, parts};
  const std::int64_t pairs = num_tokens * num_heads;
  if (parts == 1 || pairs == 1) {
    cache_pairs(job, 0, pairs, scratch);
    return;
  }
  const CacheJob* jp = &job;  // captured by pointer: std::function keeps it inline (no heap)
  // One index per thread, so each thread knows its scratch slice; a fixed split over pairs
  // (which thread computes a pair never changes its value).
  pool->parallel_for(parts, [jp, pairs](std::int64_t b, std::int64_t e) {
    for (std::int64_t t = b; t < e; ++t) {
      cache_pairs(*jp, pairs * t / jp->parts, pairs * (t + 1) / jp->parts, jp->scratch + t * jp->kv->context_len);
    }
  });
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
