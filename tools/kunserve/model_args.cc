#include "tools/kunserve/model_args.h"

#include <filesystem>

#include "common/units.h"
#include "kv/kv_geometry.h"
#include "model/config.h"
#include "model/gguf_tokenizer.h"
#include "runtime/virtual_device.h"

namespace kun::tools {

void ModelArgs::add_to(CLI::App* app) {
  app->add_option("--model", model_path, "HF safetensors directory or GGUF file");
  app->add_option("--load-format", load_format, "auto | dummy (synthetic weights from a seed)");
  app->add_option("--preset", preset, "dummy model preset (tiny, tiny-qwen2, tiny-llama3, llama-350m, llama-1b)");
  app->add_option("--seed", seed, "seed of the dummy weights");
  app->add_option("--dtype", dtype, "weight dtype on the device: auto | f32 | f16 | bf16");
  app->add_flag("--allow-non-finite-weights", allow_non_finite_weights,
                "load weights holding NaN / Inf instead of refusing the model");
  app->add_option("--kv-cache-dtype", kv_cache_dtype,
                  "KV cache element type: bf16 (default; half the bytes per token) | f32 (exact K/V, numerics tests)");
}

StatusOr<std::unique_ptr<model::WeightSource>> ModelArgs::open() const {
  if (load_format == "auto" && model_path.empty() && require_model) {
    return invalid_argument(
        "no model given: pass --model PATH (a HF safetensors directory or a .gguf file), or "
        "--load-format dummy [--preset NAME] to serve synthetic random weights");
  }
  if (load_format == "dummy" || (load_format == "auto" && model_path.empty())) {
    KUN_ASSIGN_OR_RETURN(model::ModelConfig config, model::preset_config(preset));
    if (dtype != "auto") {
      DType t;
      if (!parse_dtype(dtype, &t)) return invalid_argument("unknown --dtype '" + dtype + "'");
      config.dtype = t;
    }
    return model::synthetic_weights(config, seed);
  }
  if (load_format != "auto") return invalid_argument("unknown --load-format '" + load_format + "' (auto | dummy)");
  model::WeightCheckOptions checks;
  checks.allow_non_finite = allow_non_finite_weights;
  return model::open_weights(model_path, checks);
}

StatusOr<DType> ModelArgs::device_dtype(const model::ModelConfig& config) const {
  if (dtype == "auto") return config.dtype;
  DType t;
  if (!parse_dtype(dtype, &t)) return invalid_argument("unknown --dtype '" + dtype + "'");
  return t;
}

StatusOr<DType> ModelArgs::kv_dtype() const {
  DType t;
  if (!parse_dtype(kv_cache_dtype, &t) || (t != DType::kBF16 && t != DType::kF32)) {
    return invalid_argument("unknown --kv-cache-dtype '" + kv_cache_dtype + "' (bf16 | f32)");
  }
  return t;
}

namespace {

bool is_gguf_file(const std::string& path) {
  std::error_code ec;
  return std::filesystem::path(path).extension() == ".gguf" && std::filesystem::is_regular_file(path, ec);
}

}  // namespace

StatusOr<std::unique_ptr<model::Tokenizer>> ModelArgs::open_tokenizer(const std::string& explicit_path,
                                                                      std::int64_t model_vocab) const {
  std::unique_ptr<model::Tokenizer> tok;
  std::string source;
  if (!explicit_path.empty()) {
    source = explicit_path;
    if (is_gguf_file(explicit_path)) {
      KUN_ASSIGN_OR_RETURN(tok, model::load_gguf_tokenizer(explicit_path));
    } else {
      KUN_ASSIGN_OR_RETURN(tok, model::load_tokenizer(explicit_path));
    }
  } else if (!model_path.empty() && load_format != "dummy") {
    source = model_path;
    const std::filesystem::path p(model_path);
    std::error_code ec;
    if (is_gguf_file(model_path)) {
      auto from_gguf = model::load_gguf_tokenizer(model_path);
      if (from_gguf.ok()) tok = std::move(from_gguf).value();
      else if (from_gguf.status().code() != StatusCode::kNotFound) return from_gguf.status();
    } else if (std::filesystem::is_directory(p, ec) &&
               (std::filesystem::exists(p / "tokenizer.json", ec) || std::filesystem::exists(p / "tokenizer.model", ec))) {
      KUN_ASSIGN_OR_RETURN(tok, model::load_tokenizer(model_path));
    }
  }
  if (!tok) return model::synthetic_tokenizer(model_vocab);
  if (tok->vocab_size() > model_vocab) {
    return invalid_argument(source + ": the tokenizer has " + std::to_string(tok->vocab_size()) +
                            " ids but the model only " + std::to_string(model_vocab));
  }
  return tok;
}

std::string ModelArgs::display_name() const {
  if (!model_path.empty() && load_format != "dummy") return model_path;
  return "dummy-" + preset;
}

std::int64_t capacity_for(const model::ModelConfig& config, DType dtype, DType kv_dtype, std::int64_t kv_tokens,
                          std::int64_t block_size, std::int64_t page_bytes) {
  kv::KvGeometry g;
  g.dtype = kv_dtype;
  g.block_size_tokens = block_size;
  g.num_kv_heads = config.num_kv_heads;
  g.head_dim = config.head_dim;
  const std::int64_t blocks = g.blocks_for_tokens(kv_tokens) * config.num_layers;
  const std::int64_t per_page = g.blocks_per_page(page_bytes);
  const std::int64_t kv_bytes = ceil_div(blocks, per_page) * page_bytes;
  const std::int64_t params = runtime::device_param_bytes(config, dtype, 0, config.num_layers, page_bytes);
  return round_up(params + kv_bytes + kv_bytes / 10 + page_bytes, page_bytes);
}

}  // namespace kun::tools
