// Writes the model-format seed files of the fuzz corpora (fuzz/corpus/{gguf,safetensors,
// hf_config}): the smallest valid llama / qwen2 / llama3-rope models in each format, so the
// fuzzers start from inputs that pass every check. Run by hand: make_seeds OUT_DIR.
#include <cstdio>
#include <filesystem>
#include <string>

#include "model/config.h"
#include "model/gguf.h"
#include "model/safetensors.h"
#include "model/weight_source.h"

namespace {

namespace fs = std::filesystem;
using kun::model::ModelConfig;

ModelConfig smallest(const std::string& arch) {
  ModelConfig c;
  c.architecture = arch;
  c.vocab_size = 8;
  c.hidden_size = 8;
  c.intermediate_size = 8;
  c.num_layers = 1;
  c.num_heads = 2;
  c.num_kv_heads = 1;
  c.head_dim = 4;
  c.max_position_embeddings = 64;
  c.attention_bias = arch == "qwen2";
  c.tie_word_embeddings = arch == "qwen2";
  c.dtype = kun::DType::kF16;
  if (arch == "llama3") {
    c.architecture = "llama";
    c.rope_scaling.type = kun::model::RopeScaling::Type::kLlama3;
    c.rope_scaling.factor = 8.0f;
    c.rope_scaling.original_max_position_embeddings = 32;
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds OUT_DIR\n");
    return 2;
  }
  const fs::path out = argv[1];
  for (const char* sub : {"gguf", "safetensors", "hf_config"}) fs::create_directories(out / sub);
  for (const std::string arch : {"llama", "qwen2", "llama3"}) {
    const ModelConfig c = smallest(arch);
    if (auto s = c.validate(); !s.ok()) {
      std::fprintf(stderr, "%s: %s\n", arch.c_str(), s.to_string().c_str());
      return 1;
    }
    auto src = kun::model::synthetic_weights(c, 1);
    const fs::path tmp = out / ("tmp_" + arch);
    if (auto s = kun::model::write_safetensors_dir(*src, kun::DType::kF16, tmp.string()); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.to_string().c_str());
      return 1;
    }
    fs::copy_file(tmp / "model.safetensors", out / "safetensors" / (arch + ".safetensors"),
                  fs::copy_options::overwrite_existing);
    fs::copy_file(tmp / "config.json", out / "hf_config" / (arch + ".json"), fs::copy_options::overwrite_existing);
    fs::remove_all(tmp);
    if (auto s = kun::model::write_gguf(*src, kun::DType::kF16, (out / "gguf" / (arch + ".gguf")).string()); !s.ok()) {
      std::fprintf(stderr, "%s\n", s.to_string().c_str());
      return 1;
    }
  }
  return 0;
}
