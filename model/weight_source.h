// Where a model's weights come from: a HuggingFace safetensors directory, a GGUF file, or a
// synthetic generator. Every source exposes tensors under their HuggingFace names
// (model.layers.3.self_attn.q_proj.weight) in HuggingFace layout, whatever the file holds.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
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
  // Every tensor the source holds, under the names tensor_info accepts (HF names where the
  // format maps them, the file's own name otherwise). validate_weights reports the ones the
  // config does not use.
  virtual std::vector<std::string> tensor_names() const = 0;
  // A tensor's bytes as stored, when the source holds them in memory (mapped files); nullopt for
  // generated weights. Used to scan for NaN / Inf without converting.
  struct StoredTensor {
    const std::uint8_t* data = nullptr;
    DType dtype = DType::kF32;
    std::int64_t num_elements = 0;
  };
  virtual std::optional<StoredTensor> stored_tensor(std::string_view /*name*/) const { return std::nullopt; }
};

// What open_weights checks beyond structure.
struct WeightCheckOptions {
  // NaN / Inf in a weight is an error naming the tensor unless this is set.
  bool allow_non_finite = false;
};

// Checks that `source` holds every tensor expected_tensors(source.config()) names, with that
// shape and a supported dtype, and no tensor the config does not use (a layer past
// num_hidden_layers, an unknown name), and (unless options.allow_non_finite) that no stored
// weight is NaN or Inf. Errors name the file and the tensor.
Status validate_weights(const WeightSource& source, const WeightCheckOptions& options = {});
// The first non-finite element of `n` elements of `dtype` at `data` (possibly misaligned), or -1.
std::int64_t first_non_finite(const std::uint8_t* data, DType dtype, std::int64_t n);
// Reads a small text file (config.json, an index): only a regular file is opened, and it is
// opened non-blocking so a FIFO or device path fails at once instead of hanging.
StatusOr<std::string> read_regular_text_file(const std::string& path);

// Opens a model: a directory with config.json + *.safetensors (optionally sharded with
// model.safetensors.index.json), or a .gguf file. Validates the tensors (validate_weights).
// Only regular files are opened: a FIFO or device path is an error, never a hang.
StatusOr<std::unique_ptr<WeightSource>> open_weights(const std::string& path, const WeightCheckOptions& options = {});
// Synthetic weights from a seed (vLLM's --load-format dummy): deterministic for (config, seed).
std::unique_ptr<WeightSource> synthetic_weights(const ModelConfig& config, std::uint64_t seed);

// Writers (kunserve gen-model): write every tensor of `source` in the real formats.
Status write_safetensors_dir(const WeightSource& source, DType dtype, const std::string& dir_path,
                             std::int64_t max_shard_bytes = 0 /* 0: one file */);
Status write_gguf(const WeightSource& source, DType dtype, const std::string& file_path);

}  // namespace kun::model
