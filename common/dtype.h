// Element types of weights and activations, with bf16/f16 <-> f32 conversion.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace kun {

enum class DType : std::uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr std::int64_t dtype_bytes(DType t) { return t == DType::kF32 ? 4 : 2; }
constexpr std::string_view dtype_name(DType t) {
  return t == DType::kF32 ? "f32" : (t == DType::kF16 ? "f16" : "bf16");
}
// Parses "f32"/"float32", "f16"/"float16", "bf16"/"bfloat16"; false if unknown.
bool parse_dtype(std::string_view name, DType* out);

inline float bf16_to_f32(std::uint16_t h) { return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN.
inline std::uint16_t f32_to_bf16(float f) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

float f16_to_f32(std::uint16_t h);
std::uint16_t f32_to_f16(float f);

// Converts n elements between types (any pair; same type is a copy).
void convert_dtype(const void* src, DType src_type, void* dst, DType dst_type, std::int64_t n);

}  // namespace kun
