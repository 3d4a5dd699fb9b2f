// Portable kernels: the same algorithms with an emulated 8-lane vector of plain floats
// (separate multiply and add, since baseline x86-64 has no FMA). Used when the CPU has no AVX2,
// or when KUN_ISA=scalar.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/internal.h"

namespace kun::kernels::detail {
namespace {

struct V {
  static constexpr int kW = 8;
  static constexpr int kMr = 4;
  static constexpr int kNr = 4;
  static constexpr int kPm = 4;  // kPanelPairs GEMM tiles
  static constexpr int kPmDirect = 4;
  static constexpr int kPv = 2;
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
  static void store_n(float* p, F a, int n) {
    std::memcpy(p, a.v, static_cast<std::size_t>(n) * sizeof(float));
  }
#define KUN_SCALAR_BINOP(name, expr)       \
  static F name(F a, F b) {                \
    F r;                                   \
    for (int i = 0; i < kW; ++i) {         \
      const float x = a.v[i], y = b.v[i];  \
      r.v[i] = (expr);                     \
    }                                      \
    return r;                              \
  }
  KUN_SCALAR_BINOP(add, x + y)
  KUN_SCALAR_BINOP(sub, x - y)
  KUN_SCALAR_BINOP(mul, x * y)
  KUN_SCALAR_BINOP(div, x / y)
  KUN_SCALAR_BINOP(max, x > y ? x : y)
  KUN_SCALAR_BINOP(min, x < y ? x : y)
#undef KUN_SCALAR_BINOP
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
    F r;
    for (int i = 0; i < kW; ++i) r.v[i] = std::exp(a.v[i]);
    return r;
  }
  static float widen(const char* base, std::int64_t idx, DType dt) {
    if (dt == DType::kF32) {
      float f;
      std::memcpy(&f, base + idx * 4, 4);
      return f;
    }
    std::uint16_t h;
    std::memcpy(&h, base + idx * 2, 2);
    return dt == DType::kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
  }
  // kW columns of bf16 pairs (W[n][k], W[n][k+1]) widened to f32; _n: n columns, rest zero.
  static void load_pairs_n(const std::uint16_t* p, int n, F* even, F* odd) {
    *even = zero();
    *odd = zero();
    for (int i = 0; i < n; ++i) {
      even->v[i] = bf16_to_f32(p[2 * i]);
      odd->v[i] = bf16_to_f32(p[2 * i + 1]);
    }
  }
  static void load_pairs(const std::uint16_t* p, F* even, F* odd) { load_pairs_n(p, kW, even, odd); }
  template <DType DT>
  static F load_w(const char* base, std::int64_t idx) {
    F r;
    for (int i = 0; i < kW; ++i) r.v[i] = widen(base, idx + i, DT);
    return r;
  }
  template <DType DT>
  static F load_w_n(const char* base, std::int64_t idx, int n) {
    F r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = widen(base, idx + i, DT);
    return r;
  }
};

#include "kernels/kernels_impl.inc"

}  // namespace

const IsaKernels& scalar_kernels() {
  static const IsaKernels k{Isa::kScalar,  V::kW,           &linear_block, &linear_panels,
                            &rms_norm_row, &silu_mul,        &add_inplace,  &attention_head,
                            &read_sum,     &fma_chains,     kWidenMinRows, V::kPm, &pack_rows};
  return k;
}

}  // namespace kun::kernels::detail
