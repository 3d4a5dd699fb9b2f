// Paged attention (f32 / bf16 KV), portable: an emulated 8-lane vector of plain floats with the
// operations of kernels_scalar.cc (separate multiply and add). Used without AVX2 or with
// KUN_ISA=scalar.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/attention_internal.h"

namespace kun::kernels::detail {
namespace {

struct AV {
  static constexpr int kW = 8;
  static constexpr int kKeys = 2;
  static constexpr int kVecsPerPass = 2;
  struct F {
    float v[kW];
  };
  static F zero() { return set1(0.0f); }
  static F set1(float s) {
    F r;
    for (int i = 0; i < kW; ++i) r.v[i] = s;
    return r;
  }
  static F load(const float* p) {
    F r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static F load_n(const float* p, int n) {
    F r = zero();
    std::memcpy(r.v, p, static_cast<std::size_t>(n) * sizeof(float));
    return r;
  }
  static void store(float* p, F a) { std::memcpy(p, a.v, sizeof(a.v)); }
  static void store_n(float* p, F a, int n) { std::memcpy(p, a.v, static_cast<std::size_t>(n) * sizeof(float)); }
  static F add(F a, F b) {
    for (int i = 0; i < kW; ++i) a.v[i] = a.v[i] + b.v[i];
    return a;
  }
  static F sub(F a, F b) {
    for (int i = 0; i < kW; ++i) a.v[i] = a.v[i] - b.v[i];
    return a;
  }
  static F mul(F a, F b) {
    for (int i = 0; i < kW; ++i) a.v[i] = a.v[i] * b.v[i];
    return a;
  }
  static F fma(F a, F b, F c) {
    F r;
    for (int i = 0; i < kW; ++i) {
      const float prod = a.v[i] * b.v[i];
      r.v[i] = prod + c.v[i];
    }
    return r;
  }
  // Same tree shape as the SIMD versions: halves, then quarters, then pairs.
  static float reduce_add(F a) {
    float s4[4], s2[2];
    for (int i = 0; i < 4; ++i) s4[i] = a.v[i] + a.v[i + 4];
    for (int i = 0; i < 2; ++i) s2[i] = s4[i] + s4[i + 2];
    return s2[0] + s2[1];
  }
  static F exp(F a) {
    for (int i = 0; i < kW; ++i) a.v[i] = std::exp(a.v[i]);
    return a;
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
  static const AttentionKernels k{Isa::kScalar, &attention_heads_f32, &attention_heads_bf16, &to_bf16_rows};
  return k;
}

}  // namespace kun::kernels::detail
