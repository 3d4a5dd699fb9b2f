// Model configuration of the Llama family (Llama 2/3, Qwen2/2.5, Mistral) and named presets.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace kun::model {

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;   // llama3 only
  float high_freq_factor = 4.0f;  // llama3 only
  std::int64_t original_max_position_embeddings = 8192;  // llama3 only
};

struct ModelConfig {
  std::string architecture = "llama";  // "llama" | "qwen2" | "mistral"
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;  // hidden_size / num_heads unless the config says otherwise
  std::int64_t max_position_embeddings = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v projections carry a bias (Qwen2)
  DType dtype = DType::kBF16;   // weight dtype as stored
  std::int64_t bos_token_id = 1;
  std::int64_t eos_token_id = 2;

  // Checks that the numbers describe a model this runtime can run.
  Status validate() const;
  // head_dim/2 inverse frequencies with rope scaling applied.
  std::vector<float> rope_inv_freq() const;
  std::int64_t q_dim() const { return num_heads * head_dim; }
  std::int64_t kv_dim() const { return num_kv_heads * head_dim; }
  // Parameter counts (elements).
  std::int64_t layer_param_count() const;
  std::int64_t embedding_param_count() const { return vocab_size * hidden_size; }
  std::int64_t total_param_count() const;
  // KV bytes of one token in one layer: K and V in the KV cache's element type (bf16 by default,
  // 2 bytes; f32, 4 bytes). kv::KvGeometry::bytes_per_token_per_layer is the same figure.
  std::int64_t kv_bytes_per_token_per_layer(DType kv_dtype) const { return 2 * kv_dim() * dtype_bytes(kv_dtype); }
};

// Reads a HuggingFace config.json (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM).
StatusOr<ModelConfig> parse_hf_config(std::string_view json_text);
// Writes a config.json that parse_hf_config (and transformers) read back to the same config.
std::string to_hf_config_json(const ModelConfig& config);

// Named presets for synthetic models: "tiny", "llama-350m", "llama-1b", and test variants
// "tiny-qwen2" (qkv bias, tied embeddings), "tiny-llama3" (llama3 rope scaling, GQA).
StatusOr<ModelConfig> preset_config(std::string_view name);
std::vector<std::string> preset_names();

}  // namespace kun::model
