#include "common/dtype.h"

#include <cmath>

namespace kun {

bool parse_dtype(std::string_view name, DType* out) {
  if (name == "f32" || name == "float32" || name == "F32") { *out = DType::kF32; return true; }
  if (name == "f16" || name == "float16" || name == "F16") { *out = DType::kF16; return true; }
  if (name == "bf16" || name == "bfloat16" || name == "BF16") { *out = DType::kBF16; return true; }
  return false;
}

float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: value = mant * 2^-24
      float v = std::ldexp(static_cast<float>(mant), -24);
      return sign ? -v : v;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

std::uint16_t f32_to_f16(float f) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (u >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (u < 0x38800000u) {  // subnormal or zero in f16
    float a = std::bit_cast<float>(u);
    // round to nearest even multiple of 2^-24
    float scaled = a * 16777216.0f;  // 2^24
    auto m = static_cast<std::uint32_t>(std::nearbyint(scaled));
    return static_cast<std::uint16_t>(sign | m);
  }
  std::uint32_t exp = ((u >> 23) - 112) << 10;
  std::uint32_t mant = (u >> 13) & 0x3ffu;
  std::uint32_t rest = u & 0x1fffu;
  std::uint32_t out = exp | mant;
  if (rest > 0x1000u || (rest == 0x1000u && (mant & 1u))) out += 1;  // may carry into exponent
  return static_cast<std::uint16_t>(sign | out);
}

void convert_dtype(const void* src, DType src_type, void* dst, DType dst_type, std::int64_t n) {
  if (src_type == dst_type) {
    std::memcpy(dst, src, static_cast<std::size_t>(n * dtype_bytes(src_type)));
    return;
  }
  auto load = [&](std::int64_t i) -> float {
    switch (src_type) {
      case DType::kF32: return static_cast<const float*>(src)[i];
      case DType::kF16: return f16_to_f32(static_cast<const std::uint16_t*>(src)[i]);
      case DType::kBF16: return bf16_to_f32(static_cast<const std::uint16_t*>(src)[i]);
    }
    return 0.0f;
  };
  for (std::int64_t i = 0; i < n; ++i) {
    float v = load(i);
    switch (dst_type) {
      case DType::kF32: static_cast<float*>(dst)[i] = v; break;
      case DType::kF16: static_cast<std::uint16_t*>(dst)[i] = f32_to_f16(v); break;
      case DType::kBF16: static_cast<std::uint16_t*>(dst)[i] = f32_to_bf16(v); break;
    }
  }
}

}  // namespace kun
