#include "kv/kv_geometry.h"

#include <string>

namespace kun::kv {

Status KvGeometry::validate() const {
  if (block_size_tokens <= 0 || num_kv_heads <= 0 || head_dim <= 0) {
    return invalid_argument("kv geometry: block_size_tokens " + std::to_string(block_size_tokens) +
                            ", num_kv_heads " + std::to_string(num_kv_heads) + ", head_dim " +
                            std::to_string(head_dim) + " must all be positive");
  }
  if (dtype != DType::kBF16 && dtype != DType::kF32) {
    return invalid_argument("kv geometry: KV cache dtype " + std::string(dtype_name(dtype)) +
                            " is not supported (bf16 or f32)");
  }
  return ok_status();
}

Status KvGeometry::validate_for_page(std::int64_t page_bytes) const {
  KUN_RETURN_IF_ERROR(validate());
  if (blocks_per_page(page_bytes) < 1) {
    return invalid_argument("kv geometry: a layer block of " + std::to_string(layer_block_bytes()) +
                            " bytes does not fit in a page of " + std::to_string(page_bytes) + " bytes");
  }
  return ok_status();
}

}  // namespace kun::kv
