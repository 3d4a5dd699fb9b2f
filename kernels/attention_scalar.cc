// Paged attention (f32 / bf16 KV), portable: an emulated 8-lane vector of plain floats with the
// operations of kernels_scalar.cc (separate multiply and add). Used without AVX2 or with
// KUN_ISA=scalar.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/attention_internal.h"
#include "kernels/internal.h"

namespace kun::kernels::detail {
namespace {

#include "kernels/simd_scalar.inc"

// The attention kernel's own tuning and KV loads on top of the shared vector operations.
struct AV : V {
  static constexpr int kKeys = 2;
  static constexpr int kVecsPerPass = 2;
  // reduce_add of kKeys accumulators (one call per key here), times scale.
  static void reduce_keys(const F* a, float scale, float* out) {
    for (int i = 0; i < kKeys; ++i) out[i] = reduce_add(a[i]) * scale;
  }
  static F load_kv(const float* p) { return load(p); }
  static F load_kv_n(const float* p, int n) { return load_n(p, n); }
  static F load_kv(const std::uint16_t* p) { return load_kv_n(p, kW); }
  static F load_kv_n(const std::uint16_t* p, int n) {
    F r = zero();
    for (int i = 0; i < n; ++i) {
      const std::uint32_t u = static_cast<std::uint32_t>(p[i]) << 16;
      std::memcpy(&r.v[i], &u, 4);
    }
    return r;
  }
};

#include "kernels/attention_impl.inc"

}  // namespace

const AttentionKernels& scalar_attention_kernels() {
  static const AttentionKernels k{Isa::kScalar, kMaxRows, &attention_rows_f32, &attention_rows_bf16, &to_bf16_rows};
  return k;
}

}  // namespace kun::kernels::detail
