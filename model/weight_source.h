// Where a model's weights come from: a HuggingFace safetensors directory, a GGUF file, or a
// synthetic generator. Every source exposes tensors under their HuggingFace names
// (model.layers.3.self_attn.q_proj.weight) in HuggingFace layout, whatever the file holds.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "model/config.h"

namespace kun::model {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;  // HF order: [out, in] for projections
  std::int64_t num_elements() const;
};

// The tensors a config requires, in a fixed order (embedding, layers 0..L-1, norm, lm_head).
// Each layer's tensors are: input_layernorm, q/k/v/o_proj (+ q/k/v biases when attention_bias),
// post_attention_layernorm, gate/up/down_proj. lm_head.weight is absent when embeddings are tied.
std::vector<TensorInfo> expected_tensors(const ModelConfig& config);
std::string layer_tensor_name(std::int64_t layer, std::string_view suffix);

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual const ModelConfig& config() const = 0;
  // Human-readable origin for error messages ("/models/x (safetensors)").
  virtual std::string describe() const = 0;
  virtual bool has_tensor(std::string_view name) const = 0;
  // Shape and stored dtype; NOT_FOUND naming the tensor and file if absent.
  virtual StatusOr<TensorInfo> tensor_info(std::string_view name) const = 0;
  // Reads a whole tensor converted to dst_dtype into dst (dst_bytes must equal its size in
  // dst_dtype). Errors name the file and the tensor.
  virtual Status read_tensor(std::string_view name, DType dst_dtype, void* dst,
                             std::int64_t dst_bytes) const = 0;
  // The file that holds a tensor (for error messages); describe() unless a source knows better.
  virtual std::string tensor_origin(std::string_view /*name*/) const { return describe(); }
};

// Checks that `source` holds every tensor expected_tensors(source.config()) names, with that
// shape and a supported dtype. Errors name the file and the tensor.
Status validate_weights(const WeightSource& source);

// Opens a model: a directory with config.json + *.safetensors (optionally sharded with
// model.safetensors.index.json), or a .gguf file. Validates that every expected tensor is
// present with the right shape.
StatusOr<std::unique_ptr<WeightSource>> open_weights(const std::string& path);
// Synthetic weights from a seed (vLLM's --load-format dummy): deterministic for (config, seed).
std::unique_ptr<WeightSource> synthetic_weights(const ModelConfig& config, std::uint64_t seed);

// Writers (kunserve gen-model): write every tensor of `source` in the real formats.
Status write_safetensors_dir(const WeightSource& source, DType dtype, const std::string& dir_path,
                             std::int64_t max_shard_bytes = 0 /* 0: one file */);
Status write_gguf(const WeightSource& source, DType dtype, const std::string& file_path);

}  // namespace kun::model
