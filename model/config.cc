#include "model/config.h"

#include <cmath>
#include <numbers>
#include <sstream>

#include <nlohmann/json.hpp>

namespace kun::model {
namespace {

using Json = nlohmann::json;

constexpr std::int64_t kMaxDim = std::int64_t{1} << 24;

std::string json_type_name(const Json& j) { return std::string(j.type_name()); }

// Typed field readers: an absent key keeps the default; a present key of the wrong type is an
// error naming the field.
Status read_int(const Json& j, const char* key, std::int64_t* out, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return invalid_argument(std::string("config.json: missing required field '") + key + "'");
    return ok_status();
  }
  if (it->is_number_integer()) {
    *out = it->get<std::int64_t>();
    return ok_status();
  }
  if (it->is_number_float()) {
    double d = it->get<double>();
    if (std::floor(d) == d && std::fabs(d) < 9e15) {
      *out = static_cast<std::int64_t>(d);
      return ok_status();
    }
  }
  return invalid_argument(std::string("config.json: field '") + key + "' must be an integer, got " +
                          json_type_name(*it) + " " + it->dump());
}

Status read_float(const Json& j, const char* key, float* out, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return invalid_argument(std::string("config.json: missing required field '") + key + "'");
    return ok_status();
  }
  if (!it->is_number()) {
    return invalid_argument(std::string("config.json: field '") + key + "' must be a number, got " +
                            json_type_name(*it) + " " + it->dump());
  }
  *out = static_cast<float>(it->get<double>());
  return ok_status();
}

Status read_bool(const Json& j, const char* key, bool* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return ok_status();
  if (!it->is_boolean()) {
    return invalid_argument(std::string("config.json: field '") + key + "' must be a boolean, got " +
                            json_type_name(*it) + " " + it->dump());
  }
  *out = it->get<bool>();
  return ok_status();
}

// bos/eos ids: an integer, null (-1), or a list (the first id is used).
Status read_token_id(const Json& j, const char* key, std::int64_t* out) {
  auto it = j.find(key);
  if (it == j.end()) return ok_status();
  if (it->is_null()) {
    *out = -1;
    return ok_status();
  }
  if (it->is_number_integer()) {
    *out = it->get<std::int64_t>();
    return ok_status();
  }
  if (it->is_array() && !it->empty() && (*it)[0].is_number_integer()) {
    *out = (*it)[0].get<std::int64_t>();
    return ok_status();
  }
  return invalid_argument(std::string("config.json: field '") + key +
                          "' must be an integer or a list of integers, got " + it->dump());
}

Status parse_rope_scaling(const Json& j, RopeScaling* out) {
  auto it = j.find("rope_scaling");
  if (it == j.end() || it->is_null()) return ok_status();
  if (!it->is_object()) {
    return invalid_argument("config.json: field 'rope_scaling' must be an object or null, got " +
                            json_type_name(*it));
  }
  const Json& rs = *it;
  std::string type;
  for (const char* key : {"rope_type", "type"}) {
    auto t = rs.find(key);
    if (t != rs.end() && !t->is_null()) {
      if (!t->is_string()) {
        return invalid_argument(std::string("config.json: field 'rope_scaling.") + key +
                                "' must be a string, got " + t->dump());
      }
      type = t->get<std::string>();
      break;
    }
  }
  if (type.empty()) return invalid_argument("config.json: 'rope_scaling' has no 'rope_type' (or 'type')");
  if (type == "default") return ok_status();
  RopeScaling r;
  if (type == "linear") {
    r.type = RopeScaling::Type::kLinear;
  } else if (type == "llama3") {
    r.type = RopeScaling::Type::kLlama3;
  } else {
    return unimplemented("config.json: rope_scaling.rope_type '" + type +
                         "' is not supported (supported: linear, llama3)");
  }
  KUN_RETURN_IF_ERROR(read_float(rs, "factor", &r.factor, /*required=*/true)
                          .with_context("in rope_scaling"));
  if (r.type == RopeScaling::Type::kLlama3) {
    KUN_RETURN_IF_ERROR(read_float(rs, "low_freq_factor", &r.low_freq_factor, false));
    KUN_RETURN_IF_ERROR(read_float(rs, "high_freq_factor", &r.high_freq_factor, false));
    KUN_RETURN_IF_ERROR(read_int(rs, "original_max_position_embeddings",
                                 &r.original_max_position_embeddings, false));
  }
  *out = r;
  return ok_status();
}

StatusOr<ModelConfig> parse_hf_config_impl(const Json& j) {
  if (!j.is_object()) return invalid_argument("config.json: top level must be an object, got " + json_type_name(j));
  ModelConfig c;
  std::string arch_name;
  auto archs = j.find("architectures");
  if (archs != j.end() && !archs->is_null()) {
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string()) {
      return invalid_argument("config.json: field 'architectures' must be a non-empty list of strings, got " +
                              archs->dump());
    }
    arch_name = (*archs)[0].get<std::string>();
    if (arch_name == "LlamaForCausalLM") {
      c.architecture = "llama";
    } else if (arch_name == "Qwen2ForCausalLM") {
      c.architecture = "qwen2";
    } else if (arch_name == "MistralForCausalLM") {
      c.architecture = "mistral";
    } else {
      return unimplemented("config.json: unsupported architecture '" + arch_name +
                           "' in field 'architectures' (supported: LlamaForCausalLM, Qwen2ForCausalLM, "
                           "MistralForCausalLM)");
    }
  } else {
    auto mt = j.find("model_type");
    if (mt == j.end() || !mt->is_string()) {
      return invalid_argument("config.json: missing field 'architectures' (and no string 'model_type')");
    }
    std::string t = mt->get<std::string>();
    if (t != "llama" && t != "qwen2" && t != "mistral") {
      return unimplemented("config.json: unsupported model_type '" + t + "' (supported: llama, qwen2, mistral)");
    }
    c.architecture = t;
  }

  KUN_RETURN_IF_ERROR(read_int(j, "vocab_size", &c.vocab_size, true));
  KUN_RETURN_IF_ERROR(read_int(j, "hidden_size", &c.hidden_size, true));
  KUN_RETURN_IF_ERROR(read_int(j, "intermediate_size", &c.intermediate_size, true));
  KUN_RETURN_IF_ERROR(read_int(j, "num_hidden_layers", &c.num_layers, true));
  KUN_RETURN_IF_ERROR(read_int(j, "num_attention_heads", &c.num_heads, true));
  c.num_kv_heads = c.num_heads;
  KUN_RETURN_IF_ERROR(read_int(j, "num_key_value_heads", &c.num_kv_heads, false));
  c.head_dim = c.num_heads > 0 ? c.hidden_size / c.num_heads : 0;
  KUN_RETURN_IF_ERROR(read_int(j, "head_dim", &c.head_dim, false));
  c.max_position_embeddings = 2048;
  KUN_RETURN_IF_ERROR(read_int(j, "max_position_embeddings", &c.max_position_embeddings, false));
  c.rms_norm_eps = 1e-6f;
  KUN_RETURN_IF_ERROR(read_float(j, "rms_norm_eps", &c.rms_norm_eps, false));
  c.rope_theta = 10000.0f;
  KUN_RETURN_IF_ERROR(read_float(j, "rope_theta", &c.rope_theta, false));
  KUN_RETURN_IF_ERROR(parse_rope_scaling(j, &c.rope_scaling));
  c.tie_word_embeddings = false;
  KUN_RETURN_IF_ERROR(read_bool(j, "tie_word_embeddings", &c.tie_word_embeddings));
  c.attention_bias = false;
  KUN_RETURN_IF_ERROR(read_bool(j, "attention_bias", &c.attention_bias));
  if (c.architecture == "qwen2") c.attention_bias = true;  // Qwen2 always has q/k/v biases
  c.dtype = DType::kBF16;
  auto td = j.find("torch_dtype");
  if (td == j.end() || td->is_null()) td = j.find("dtype");  // newer transformers
  if (td != j.end() && !td->is_null()) {
    if (!td->is_string()) return invalid_argument("config.json: field 'torch_dtype' must be a string, got " + td->dump());
    std::string s = td->get<std::string>();
    if (s.starts_with("torch.")) s = s.substr(6);
    if (!parse_dtype(s, &c.dtype)) {
      return unimplemented("config.json: field 'torch_dtype' is '" + s +
                           "' (supported: float32, float16, bfloat16)");
    }
  }
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  KUN_RETURN_IF_ERROR(read_token_id(j, "bos_token_id", &c.bos_token_id));
  KUN_RETURN_IF_ERROR(read_token_id(j, "eos_token_id", &c.eos_token_id));
  auto act = j.find("hidden_act");
  if (act != j.end() && !act->is_null()) {
    if (!act->is_string() || act->get<std::string>() != "silu") {
      return unimplemented("config.json: field 'hidden_act' is " + act->dump() + " (only \"silu\" is supported)");
    }
  }
  KUN_RETURN_IF_ERROR(c.validate().with_context("config.json"));
  return c;
}

}  // namespace

Status ModelConfig::validate() const {
  if (architecture != "llama" && architecture != "qwen2" && architecture != "mistral") {
    return unimplemented("unsupported architecture '" + architecture + "' (supported: llama, qwen2, mistral)");
  }
  auto positive = [](const char* name, std::int64_t v) -> Status {
    if (v <= 0 || v > kMaxDim) {
      return invalid_argument(std::string(name) + " must be in [1, " + std::to_string(kMaxDim) + "], got " +
                              std::to_string(v));
    }
    return ok_status();
  };
  KUN_RETURN_IF_ERROR(positive("vocab_size", vocab_size));
  KUN_RETURN_IF_ERROR(positive("hidden_size", hidden_size));
  KUN_RETURN_IF_ERROR(positive("intermediate_size", intermediate_size));
  KUN_RETURN_IF_ERROR(positive("num_hidden_layers", num_layers));
  KUN_RETURN_IF_ERROR(positive("num_attention_heads", num_heads));
  KUN_RETURN_IF_ERROR(positive("num_key_value_heads", num_kv_heads));
  KUN_RETURN_IF_ERROR(positive("head_dim", head_dim));
  KUN_RETURN_IF_ERROR(positive("max_position_embeddings", max_position_embeddings));
  if (num_layers > 4096) return invalid_argument("num_hidden_layers " + std::to_string(num_layers) + " is too large");
  if (num_heads % num_kv_heads != 0) {
    return invalid_argument("num_attention_heads (" + std::to_string(num_heads) +
                            ") must be a multiple of num_key_value_heads (" + std::to_string(num_kv_heads) + ")");
  }
  if (head_dim % 2 != 0) return invalid_argument("head_dim must be even for RoPE, got " + std::to_string(head_dim));
  if (!(rms_norm_eps > 0.0f) || !std::isfinite(rms_norm_eps)) {
    return invalid_argument("rms_norm_eps must be positive, got " + std::to_string(rms_norm_eps));
  }
  if (!(rope_theta > 1.0f) || !std::isfinite(rope_theta)) {
    return invalid_argument("rope_theta must be > 1, got " + std::to_string(rope_theta));
  }
  if (rope_scaling.type != RopeScaling::Type::kNone) {
    if (!(rope_scaling.factor > 0.0f) || !std::isfinite(rope_scaling.factor)) {
      return invalid_argument("rope_scaling.factor must be positive, got " + std::to_string(rope_scaling.factor));
    }
  }
  if (rope_scaling.type == RopeScaling::Type::kLlama3) {
    if (!(rope_scaling.high_freq_factor > rope_scaling.low_freq_factor) || !(rope_scaling.low_freq_factor > 0.0f)) {
      return invalid_argument("rope_scaling: need 0 < low_freq_factor < high_freq_factor, got " +
                              std::to_string(rope_scaling.low_freq_factor) + " and " +
                              std::to_string(rope_scaling.high_freq_factor));
    }
    if (rope_scaling.original_max_position_embeddings <= 0) {
      return invalid_argument("rope_scaling.original_max_position_embeddings must be positive");
    }
  }
  if (bos_token_id >= vocab_size || eos_token_id >= vocab_size) {
    return invalid_argument("bos_token_id/eos_token_id (" + std::to_string(bos_token_id) + "/" +
                            std::to_string(eos_token_id) + ") outside the vocabulary of " +
                            std::to_string(vocab_size));
  }
  return ok_status();
}

std::vector<float> ModelConfig::rope_inv_freq() const {
  KUN_CHECK(head_dim > 0 && head_dim % 2 == 0) << "head_dim " << head_dim;
  const std::int64_t half = head_dim / 2;
  std::vector<float> out(static_cast<std::size_t>(half));
  const double base = rope_theta;
  for (std::int64_t i = 0; i < half; ++i) {
    double inv = 1.0 / std::pow(base, static_cast<double>(2 * i) / static_cast<double>(head_dim));
    switch (rope_scaling.type) {
      case RopeScaling::Type::kNone:
        break;
      case RopeScaling::Type::kLinear:
        inv /= rope_scaling.factor;
        break;
      case RopeScaling::Type::kLlama3: {
        const double factor = rope_scaling.factor;
        const double low = rope_scaling.low_freq_factor;
        const double high = rope_scaling.high_freq_factor;
        const double old_ctx = static_cast<double>(rope_scaling.original_max_position_embeddings);
        const double low_freq_wavelen = old_ctx / low;
        const double high_freq_wavelen = old_ctx / high;
        const double wavelen = 2.0 * std::numbers::pi / inv;
        if (wavelen > low_freq_wavelen) {
          inv = inv / factor;  // low frequencies: fully scaled
        } else if (wavelen >= high_freq_wavelen) {
          // medium: blend between scaled and unscaled
          const double smooth = (old_ctx / wavelen - low) / (high - low);
          inv = (1.0 - smooth) * inv / factor + smooth * inv;
        }  // high frequencies: unchanged
        break;
      }
    }
    out[static_cast<std::size_t>(i)] = static_cast<float>(inv);
  }
  return out;
}

std::int64_t ModelConfig::layer_param_count() const {
  std::int64_t n = 2 * hidden_size;                       // two RMSNorms
  n += hidden_size * q_dim() + 2 * hidden_size * kv_dim();  // q, k, v
  n += q_dim() * hidden_size;                             // o
  if (attention_bias) n += q_dim() + 2 * kv_dim();
  n += 3 * hidden_size * intermediate_size;  // gate, up, down
  return n;
}

std::int64_t ModelConfig::total_param_count() const {
  std::int64_t n = embedding_param_count() + num_layers * layer_param_count() + hidden_size;
  if (!tie_word_embeddings) n += vocab_size * hidden_size;
  return n;
}

StatusOr<ModelConfig> parse_hf_config(std::string_view json_text) {
  try {
    Json j = Json::parse(json_text.begin(), json_text.end());
    return parse_hf_config_impl(j);
  } catch (const Json::exception& e) {
    return invalid_argument(std::string("config.json: malformed JSON: ") + e.what());
  } catch (const std::exception& e) {
    return internal_error(std::string("config.json: ") + e.what());
  }
}

std::string to_hf_config_json(const ModelConfig& c) {
  Json j = Json::object();
  if (c.architecture == "qwen2") {
    j["architectures"] = {"Qwen2ForCausalLM"};
  } else if (c.architecture == "mistral") {
    j["architectures"] = {"MistralForCausalLM"};
  } else {
    j["architectures"] = {"LlamaForCausalLM"};
  }
  j["model_type"] = c.architecture;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = static_cast<double>(c.rms_norm_eps);
  j["rope_theta"] = static_cast<double>(c.rope_theta);
  switch (c.rope_scaling.type) {
    case RopeScaling::Type::kNone:
      j["rope_scaling"] = nullptr;
      break;
    case RopeScaling::Type::kLinear:
      j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", static_cast<double>(c.rope_scaling.factor)}};
      break;
    case RopeScaling::Type::kLlama3:
      j["rope_scaling"] = {{"rope_type", "llama3"},
                           {"factor", static_cast<double>(c.rope_scaling.factor)},
                           {"low_freq_factor", static_cast<double>(c.rope_scaling.low_freq_factor)},
                           {"high_freq_factor", static_cast<double>(c.rope_scaling.high_freq_factor)},
                           {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
      break;
  }
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["attention_bias"] = c.attention_bias;
  j["hidden_act"] = "silu";
  j["torch_dtype"] = c.dtype == DType::kF32 ? "float32" : (c.dtype == DType::kF16 ? "float16" : "bfloat16");
  if (c.bos_token_id >= 0) {
    j["bos_token_id"] = c.bos_token_id;
  } else {
    j["bos_token_id"] = nullptr;
  }
  if (c.eos_token_id >= 0) {
    j["eos_token_id"] = c.eos_token_id;
  } else {
    j["eos_token_id"] = nullptr;
  }
  return j.dump(2) + "\n";
}

StatusOr<ModelConfig> preset_config(std::string_view name) {
  ModelConfig c;
  c.architecture = "llama";
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.dtype = DType::kBF16;
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  if (name == "tiny" || name == "tiny-qwen2" || name == "tiny-llama3") {
    c.vocab_size = 2048;
    c.hidden_size = 256;
    c.intermediate_size = 688;
    c.num_layers = 4;
    c.num_heads = 8;
    c.num_kv_heads = 4;
    c.head_dim = 32;
    c.max_position_embeddings = 2048;
    if (name == "tiny-qwen2") {
      c.architecture = "qwen2";
      c.attention_bias = true;
      c.tie_word_embeddings = true;
      c.rms_norm_eps = 1e-6f;
      c.rope_theta = 1000000.0f;
    } else if (name == "tiny-llama3") {
      c.num_kv_heads = 2;  // GQA 4:1
      c.rope_theta = 500000.0f;
      c.max_position_embeddings = 8192;
      // Small original context so the scaled band covers frequencies a short prompt exercises.
      c.rope_scaling = RopeScaling{RopeScaling::Type::kLlama3, 8.0f, 1.0f, 4.0f, 256};
    }
  } else if (name == "llama-30m") {
    // About 64 MB of bf16 weights: four copies are far beyond any last-level cache, so decoding
    // reads its weights from DRAM and batching pays off, as on a GPU (the burst demo's model).
    c.vocab_size = 8192;
    c.hidden_size = 512;
    c.intermediate_size = 1408;
    c.num_layers = 8;
    c.num_heads = 8;
    c.num_kv_heads = 4;
    c.head_dim = 64;
    c.max_position_embeddings = 2048;
  } else if (name == "llama-350m") {
    c.vocab_size = 32000;
    c.hidden_size = 1024;
    c.intermediate_size = 2816;
    c.num_layers = 24;
    c.num_heads = 16;
    c.num_kv_heads = 8;
    c.head_dim = 64;
    c.max_position_embeddings = 4096;
  } else if (name == "llama-1b") {
    c.vocab_size = 32000;
    c.hidden_size = 2048;
    c.intermediate_size = 5632;
    c.num_layers = 22;
    c.num_heads = 32;
    c.num_kv_heads = 4;
    c.head_dim = 64;
    c.max_position_embeddings = 2048;
  } else {
    std::ostringstream os;
    os << "unknown model preset '" << name << "' (known:";
    for (const auto& n : preset_names()) os << ' ' << n;
    os << ')';
    return not_found(os.str());
  }
  KUN_CHECK_OK(c.validate());
  return c;
}

std::vector<std::string> preset_names() {
  return {"tiny", "tiny-qwen2", "tiny-llama3", "llama-30m", "llama-350m", "llama-1b"};
}

}  // namespace kun::model
