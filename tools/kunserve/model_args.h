// Command-line model selection shared by the kunserve subcommands: a path (HF safetensors
// directory or GGUF file) or `--load-format dummy --preset P --seed S`.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "common/dtype.h"
#include "common/status.h"
#include "model/tokenizer.h"
#include "model/weight_source.h"

namespace kun::tools {

struct ModelArgs {
  std::string model_path;
  std::string load_format = "auto";  // auto | dummy
  std::string preset = "tiny";
  std::uint64_t seed = 0;
  std::string dtype = "auto";  // weight dtype on the device: auto (as stored) | f32 | f16 | bf16
  bool allow_non_finite_weights = false;  // load NaN / Inf weights instead of refusing them
  // serve / generate: no --model and no --load-format dummy is an error (a random-weight model
  // served by accident answers nonsense). Subcommands that default to a dummy model (bench
  // --in-process) clear it.
  bool require_model = true;
  std::string kv_cache_dtype = "bf16";  // KV cache element type: bf16 | f32
  void add_to(CLI::App* app);
  // The model's weights, and the dtype its weights take on the device.
  StatusOr<std::unique_ptr<model::WeightSource>> open() const;
  StatusOr<DType> device_dtype(const model::ModelConfig& config) const;
  // The KV cache's element type (--kv-cache-dtype); kInvalidArgument unless bf16 or f32.
  StatusOr<DType> kv_dtype() const;
  std::string display_name() const;
  // The tokenizer to serve with: `explicit_path` (tokenizer.json / tokenizer.model / a .gguf
  // file's embedded one) when given; else the one the model carries (a GGUF file's
  // tokenizer.ggml.*, a directory's tokenizer.json / tokenizer.model); else a synthetic vocabulary
  // of `model_vocab` ids. kInvalidArgument when the tokenizer has more ids than the model.
  StatusOr<std::unique_ptr<model::Tokenizer>> open_tokenizer(const std::string& explicit_path,
                                                             std::int64_t model_vocab) const;
};

// Device capacity that fits the parameters plus `kv_tokens` tokens of KV (in kv_dtype) on every
// layer, with 10 % slack, rounded up to whole pages.
std::int64_t capacity_for(const model::ModelConfig& config, DType dtype, DType kv_dtype, std::int64_t kv_tokens,
                          std::int64_t block_size, std::int64_t page_bytes);

}  // namespace kun::tools
