#include "model/weight_source.h"

#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "model/gguf.h"
#include "model/safetensors.h"

namespace kun::model {
namespace {

namespace fs = std::filesystem;

std::string shape_string(const std::vector<std::int64_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

Status write_text_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return not_found(tmp + ": cannot create");
    out << text;
    if (!out) return data_loss(tmp + ": write failed");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return data_loss(path + ": rename failed: " + ec.message());
  return ok_status();
}

TensorWriteSpec spec_for(const WeightSource& source, const TensorInfo& info, DType dtype) {
  TensorWriteSpec s;
  s.name = info.name;
  s.dtype = dtype;
  s.shape = info.shape;
  const std::string name = info.name;
  s.fill = [&source, name, dtype](void* dst, std::int64_t bytes) { return source.read_tensor(name, dtype, dst, bytes); };
  return s;
}

}  // namespace

std::int64_t TensorInfo::num_elements() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string layer_tensor_name(std::int64_t layer, std::string_view suffix) {
  std::string s = "model.layers." + std::to_string(layer) + ".";
  s += suffix;
  return s;
}

std::vector<TensorInfo> expected_tensors(const ModelConfig& c) {
  std::vector<TensorInfo> out;
  const DType t = c.dtype;
  const std::int64_t h = c.hidden_size;
  out.push_back({"model.embed_tokens.weight", t, {c.vocab_size, h}});
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    out.push_back({layer_tensor_name(l, "input_layernorm.weight"), t, {h}});
    out.push_back({layer_tensor_name(l, "self_attn.q_proj.weight"), t, {c.q_dim(), h}});
    out.push_back({layer_tensor_name(l, "self_attn.k_proj.weight"), t, {c.kv_dim(), h}});
    out.push_back({layer_tensor_name(l, "self_attn.v_proj.weight"), t, {c.kv_dim(), h}});
    if (c.attention_bias) {
      out.push_back({layer_tensor_name(l, "self_attn.q_proj.bias"), t, {c.q_dim()}});
      out.push_back({layer_tensor_name(l, "self_attn.k_proj.bias"), t, {c.kv_dim()}});
      out.push_back({layer_tensor_name(l, "self_attn.v_proj.bias"), t, {c.kv_dim()}});
    }
    out.push_back({layer_tensor_name(l, "self_attn.o_proj.weight"), t, {h, c.q_dim()}});
    out.push_back({layer_tensor_name(l, "post_attention_layernorm.weight"), t, {h}});
    out.push_back({layer_tensor_name(l, "mlp.gate_proj.weight"), t, {c.intermediate_size, h}});
    out.push_back({layer_tensor_name(l, "mlp.up_proj.weight"), t, {c.intermediate_size, h}});
    out.push_back({layer_tensor_name(l, "mlp.down_proj.weight"), t, {h, c.intermediate_size}});
  }
  out.push_back({"model.norm.weight", t, {h}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", t, {c.vocab_size, h}});
  return out;
}

Status validate_weights(const WeightSource& source) {
  for (const TensorInfo& want : expected_tensors(source.config())) {
    auto info = source.tensor_info(want.name);
    if (!info.ok()) {
      if (info.status().code() == StatusCode::kNotFound) {
        return not_found(info.status().message() + " (expected shape " + shape_string(want.shape) + ")");
      }
      return info.status();
    }
    if (info->shape != want.shape) {
      return invalid_argument(source.tensor_origin(want.name) + ": tensor '" + want.name + "' has shape " +
                              shape_string(info->shape) + " but the config expects " + shape_string(want.shape));
    }
  }
  return ok_status();
}

StatusOr<std::unique_ptr<WeightSource>> open_weights(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return open_safetensors_dir(path);
  if (path.ends_with(".gguf")) return open_gguf_weights(path);
  if (!fs::exists(path, ec)) return not_found(path + ": no such file or directory");
  return unimplemented(path + ": unknown model format (expected a safetensors directory or a .gguf file)");
}

Status write_safetensors_dir(const WeightSource& source, DType dtype, const std::string& dir_path,
                             std::int64_t max_shard_bytes) {
  std::error_code ec;
  fs::create_directories(dir_path, ec);
  if (ec) return not_found(dir_path + ": cannot create directory: " + ec.message());
  // Remove what an earlier write left, so the directory describes exactly one model.
  for (const auto& entry : fs::directory_iterator(dir_path, ec)) {
    const std::string fname = entry.path().filename().string();
    if ((fname.starts_with("model") && fname.ends_with(".safetensors")) || fname == "model.safetensors.index.json") {
      fs::remove(entry.path(), ec);
    }
  }
  ModelConfig config = source.config();
  config.dtype = dtype;
  KUN_RETURN_IF_ERROR(config.validate().with_context(source.describe()));

  const auto infos = expected_tensors(config);
  std::vector<std::vector<TensorWriteSpec>> shards(1);
  std::int64_t shard_bytes = 0;
  for (const auto& info : infos) {
    TensorWriteSpec spec = spec_for(source, info, dtype);
    if (max_shard_bytes > 0 && shard_bytes > 0 && shard_bytes + spec.num_bytes() > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shard_bytes += spec.num_bytes();
    shards.back().push_back(std::move(spec));
  }
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  if (shards.size() == 1) {
    KUN_RETURN_IF_ERROR(write_safetensors_file((fs::path(dir_path) / "model.safetensors").string(), shards[0], metadata));
  } else {
    nlohmann::json index;
    nlohmann::json weight_map = nlohmann::json::object();
    std::int64_t total = 0;
    char name[64];
    for (std::size_t s = 0; s < shards.size(); ++s) {
      std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
      KUN_RETURN_IF_ERROR(write_safetensors_file((fs::path(dir_path) / name).string(), shards[s], metadata));
      for (const auto& t : shards[s]) {
        weight_map[t.name] = name;
        total += t.num_bytes();
      }
    }
    index["metadata"] = {{"total_size", total}};
    index["weight_map"] = weight_map;
    KUN_RETURN_IF_ERROR(write_text_file((fs::path(dir_path) / "model.safetensors.index.json").string(), index.dump(2)));
  }
  return write_text_file((fs::path(dir_path) / "config.json").string(), to_hf_config_json(config));
}

Status write_gguf(const WeightSource& source, DType dtype, const std::string& file_path) {
  return write_gguf_model(source, dtype, file_path);
}

}  // namespace kun::model
