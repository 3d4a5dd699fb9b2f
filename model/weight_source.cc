#include "model/weight_source.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

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

std::int64_t first_non_finite(const std::uint8_t* data, DType dtype, std::int64_t n) {
  // A float is NaN or Inf exactly when its exponent bits are all ones.
  auto scan = [&](auto word, auto exponent_mask) -> std::int64_t {
    using Word = decltype(word);
    constexpr std::int64_t kChunk = 4096;
    for (std::int64_t i = 0; i < n; i += kChunk) {
      const std::int64_t m = std::min(kChunk, n - i);
      Word buf[kChunk];
      std::memcpy(buf, data + i * static_cast<std::int64_t>(sizeof(Word)), static_cast<std::size_t>(m) * sizeof(Word));
      bool any = false;
      for (std::int64_t j = 0; j < m; ++j) any |= (buf[j] & exponent_mask) == exponent_mask;
      if (!any) continue;
      for (std::int64_t j = 0; j < m; ++j) {
        if ((buf[j] & exponent_mask) == exponent_mask) return i + j;
      }
    }
    return -1;
  };
  switch (dtype) {
    case DType::kF32: return scan(std::uint32_t{}, std::uint32_t{0x7f800000u});
    case DType::kF16: return scan(std::uint16_t{}, std::uint16_t{0x7c00u});
    case DType::kBF16: return scan(std::uint16_t{}, std::uint16_t{0x7f80u});
  }
  return -1;
}

namespace {

// Tensors that checkpoints carry but no model computes from: rotary inverse frequencies (a
// buffer some older exports saved), and a copy of the embedding as lm_head when tied.
bool ignorable_tensor(const ModelConfig& c, const std::string& name) {
  if (name.ends_with(".rotary_emb.inv_freq")) return true;
  return c.tie_word_embeddings && name == "lm_head.weight";
}

std::string unused_tensor_message(const WeightSource& source, const std::string& name) {
  const ModelConfig& c = source.config();
  const std::string prefix = "model.layers.";
  if (name.starts_with(prefix)) {
    std::int64_t layer = -1;
    const auto dot = name.find('.', prefix.size());
    try {
      layer = std::stoll(name.substr(prefix.size(), dot - prefix.size()));
    } catch (const std::exception&) {
      layer = -1;
    }
    if (layer >= c.num_layers) {
      return source.tensor_origin(name) + ": tensor '" + name + "' belongs to layer " + std::to_string(layer) +
             " but the config has " + std::to_string(c.num_layers) +
             " layers (num_hidden_layers / block_count disagrees with the weights)";
    }
  }
  return source.tensor_origin(name) + ": tensor '" + name + "' is not used by a " + c.architecture + " model with " +
         std::to_string(c.num_layers) + " layers (unexpected tensor: wrong config or a different architecture?)";
}

}  // namespace

Status validate_weights(const WeightSource& source, const WeightCheckOptions& options) {
  const auto expected = expected_tensors(source.config());
  std::set<std::string, std::less<>> expected_names;
  for (const TensorInfo& want : expected) {
    expected_names.insert(want.name);
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
  for (const std::string& name : source.tensor_names()) {
    if (expected_names.count(name) == 0 && !ignorable_tensor(source.config(), name)) {
      return invalid_argument(unused_tensor_message(source, name));
    }
  }
  if (!options.allow_non_finite) {
    for (const TensorInfo& want : expected) {
      const auto stored = source.stored_tensor(want.name);
      if (!stored) continue;
      const std::int64_t at = first_non_finite(stored->data, stored->dtype, stored->num_elements);
      if (at >= 0) {
        return data_loss(source.tensor_origin(want.name) + ": tensor '" + want.name + "' holds a non-finite value " +
                         "(NaN or Inf) at element " + std::to_string(at) + " of " +
                         std::to_string(stored->num_elements) +
                         " (corrupt weights; --allow-non-finite-weights loads them anyway)");
      }
    }
  }
  return ok_status();
}

StatusOr<std::string> read_regular_text_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return not_found(path + ": no such file");
    return not_found(path + ": cannot open: " + std::strerror(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_argument(path + ": not a regular file");
  }
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return data_loss(path + ": read error: " + std::strerror(err));
    }
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return out;
}

StatusOr<std::unique_ptr<WeightSource>> open_weights(const std::string& path, const WeightCheckOptions& options) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return open_safetensors_dir(path, options);
  if (!fs::exists(path, ec)) return not_found(path + ": no such file or directory");
  if (!fs::is_regular_file(path, ec)) {
    return invalid_argument(path + ": not a regular file or directory (a FIFO or device cannot hold a model)");
  }
  if (path.ends_with(".gguf")) return open_gguf_weights(path, options);
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
