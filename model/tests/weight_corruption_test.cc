// Bad input never crashes and always yields a Status naming the file (and the tensor where one
// is involved). Runs under ASan/UBSan in CI.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include <gtest/gtest.h>

#include "model/gguf.h"
#include "model/safetensors.h"
#include "model/tests/test_util.h"
#include "model/weight_source.h"

namespace kun::model {
namespace {

using testing::TempDir;
namespace fs = std::filesystem;

ModelConfig small_config(const std::string& arch = "llama") {
  ModelConfig c;
  c.architecture = arch;
  c.vocab_size = 128;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 256;
  c.attention_bias = arch == "qwen2";
  c.dtype = DType::kBF16;
  KUN_CHECK_OK(c.validate());
  return c;
}

std::string read_all(const std::string& path) {
  std::string out(static_cast<std::size_t>(fs::file_size(path)), '\0');
  std::FILE* f = std::fopen(path.c_str(), "rb");
  KUN_CHECK(f != nullptr) << path;
  const std::size_t got = std::fread(out.data(), 1, out.size(), f);
  std::fclose(f);
  KUN_CHECK_EQ(got, out.size());
  return out;
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

bool contains(const std::string& hay, const std::string& needle) { return hay.find(needle) != std::string::npos; }

// Writes config.json and one safetensors file holding the given tensors (synthetic values).
void write_dir(const std::string& dir, const ModelConfig& c, const std::vector<TensorWriteSpec>& tensors) {
  fs::create_directories(dir);
  write_all((fs::path(dir) / "config.json").string(), to_hf_config_json(c));
  ASSERT_TRUE(write_safetensors_file((fs::path(dir) / "model.safetensors").string(), tensors).ok());
}

std::vector<TensorWriteSpec> synthetic_specs(const WeightSource& src) {
  std::vector<TensorWriteSpec> out;
  for (const auto& t : expected_tensors(src.config())) {
    TensorWriteSpec s;
    s.name = t.name;
    s.dtype = t.dtype;
    s.shape = t.shape;
    const std::string name = t.name;
    const DType dt = t.dtype;
    s.fill = [&src, name, dt](void* dst, std::int64_t bytes) { return src.read_tensor(name, dt, dst, bytes); };
    out.push_back(std::move(s));
  }
  return out;
}

// A safetensors file from a raw header string and `data_bytes` zero bytes of data.
std::string raw_safetensors(const std::string& header, std::size_t data_bytes) {
  std::string out(8, '\0');
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += header;
  out.append(data_bytes, '\0');
  return out;
}

class SafetensorsCorruption : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = small_config();
    src_ = synthetic_weights(config_, 5);
    ASSERT_TRUE(write_safetensors_dir(*src_, DType::kBF16, good_.path()).ok());
    file_ = good_.file("model.safetensors");
    bytes_ = read_all(file_);
    std::memcpy(&header_len_, bytes_.data(), 8);
  }

  // Opens a copy of the good directory whose model.safetensors holds `bytes`.
  Status open_with(const std::string& bytes, std::string* file_path) {
    if (!fs::exists(bad_.file("config.json"))) fs::copy_file(good_.file("config.json"), bad_.file("config.json"));
    *file_path = bad_.file("model.safetensors");
    write_all(*file_path, bytes);
    auto r = open_weights(bad_.path());
    return r.ok() ? ok_status() : r.status();
  }

  ModelConfig config_;
  std::unique_ptr<WeightSource> src_;
  TempDir good_{"good"};
  TempDir bad_{"bad"};
  std::string file_;
  std::string bytes_;
  std::uint64_t header_len_ = 0;
};

TEST_F(SafetensorsCorruption, TruncatedAtManyOffsets) {
  std::vector<std::size_t> cuts = {0, 1, 4, 7, 8, 9, 8 + header_len_ / 2, 8 + header_len_ - 1, 8 + header_len_,
                                   8 + header_len_ + 1, bytes_.size() - 1};
  for (std::size_t i = 1; i < 48; ++i) cuts.push_back(bytes_.size() * i / 48);
  for (std::size_t cut : cuts) {
    std::string path;
    Status s = open_with(bytes_.substr(0, cut), &path);
    ASSERT_FALSE(s.ok()) << "cut at " << cut;
    EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.to_string();
    EXPECT_TRUE(contains(s.message(), path)) << s.to_string();
    if (cut > 8 + header_len_) {
      // Inside the data section: the first tensor that no longer fits is named.
      EXPECT_TRUE(contains(s.message(), "tensor '")) << s.to_string();
    }
  }
}

TEST_F(SafetensorsCorruption, FlippedHeaderBytesNeverCrash) {
  int failures = 0;
  for (std::size_t pos = 0; pos < 8 + header_len_; pos += (pos < 64 ? 1 : 7)) {
    for (unsigned char mask : {0x01, 0x20}) {
      std::string b = bytes_;
      b[pos] = static_cast<char>(static_cast<unsigned char>(b[pos]) ^ mask);
      std::string path;
      Status s = open_with(b, &path);
      if (!s.ok()) {
        ++failures;
        // The file, or for a missing tensor the model directory, is named.
        EXPECT_TRUE(contains(s.message(), bad_.path())) << "pos " << pos << ": " << s.to_string();
      }
    }
  }
  EXPECT_GT(failures, 100);
}

TEST_F(SafetensorsCorruption, HeaderLengthPastEof) {
  std::string b = bytes_;
  const std::uint64_t huge = bytes_.size();  // past the end by 8
  std::memcpy(b.data(), &huge, 8);
  std::string path;
  Status s = open_with(b, &path);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_TRUE(contains(s.message(), "past the end")) << s.to_string();
  const std::uint64_t giant = ~std::uint64_t{0};
  std::memcpy(b.data(), &giant, 8);
  s = open_with(b, &path);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_TRUE(contains(s.message(), path)) << s.to_string();
}

TEST_F(SafetensorsCorruption, CraftedHeaders) {
  struct Case {
    std::string header;
    std::size_t data;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {"{not json", 0, "not valid JSON"},
      {"[1,2]", 0, "not a JSON object"},
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
       12, "overlaps"},
      {R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8, "tensor 'w'"},
      {R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})", 16, "does not match dtype"},
      {R"({"w": {"dtype": "Q7", "shape": [3], "data_offsets": [0, 3]}})", 3, "unknown dtype 'Q7'"},
      {R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4, "tensor 'w'"},
      {R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", 8, "reversed"},
      {R"({"w": {"dtype": "F32", "shape": [1]}})", 4, "data_offsets"},
      {R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"x": 1}})", 4, "__metadata__"},
      {R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 4]}})", 4, "too large"},
      {R"({"w": 5})", 0, "tensor 'w'"},
  };
  for (const auto& c : cases) {
    std::string path;
    Status s = open_with(raw_safetensors(c.header, c.data), &path);
    ASSERT_FALSE(s.ok()) << c.header;
    EXPECT_TRUE(contains(s.message(), c.needle)) << s.to_string();
    EXPECT_TRUE(contains(s.message(), path)) << s.to_string();
  }
}

TEST_F(SafetensorsCorruption, MissingTensorWrongShapeUnsupportedDtype) {
  const std::string missing = layer_tensor_name(1, "mlp.up_proj.weight");
  {
    auto specs = synthetic_specs(*src_);
    std::erase_if(specs, [&](const TensorWriteSpec& s) { return s.name == missing; });
    TempDir d("missing");
    write_dir(d.path(), config_, specs);
    auto r = open_weights(d.path());
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
    EXPECT_TRUE(contains(r.status().message(), missing)) << r.status().to_string();
    EXPECT_TRUE(contains(r.status().message(), d.path())) << r.status().to_string();
  }
  {
    // config.json says a bigger FFN than the file holds.
    ModelConfig other = config_;
    other.intermediate_size = 128;
    TempDir d("shape");
    write_dir(d.path(), config_, synthetic_specs(*src_));
    write_all(d.file("config.json"), to_hf_config_json(other));
    auto r = open_weights(d.path());
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(contains(r.status().message(), d.file("model.safetensors"))) << r.status().to_string();
    EXPECT_TRUE(contains(r.status().message(), "model.layers.0.mlp.gate_proj.weight")) << r.status().to_string();
    EXPECT_TRUE(contains(r.status().message(), "[128, 64]")) << r.status().to_string();
  }
  {
    // A known but unsupported dtype (I16) on an expected tensor.
    std::string header = R"({"model.embed_tokens.weight": {"dtype": "I16", "shape": [128, 64], "data_offsets": [0, 16384]}})";
    TempDir d("dtype");
    write_all(d.file("config.json"), to_hf_config_json(config_));
    write_all(d.file("model.safetensors"), raw_safetensors(header, 16384));
    auto r = open_weights(d.path());
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented);
    EXPECT_TRUE(contains(r.status().message(), "I16")) << r.status().to_string();
    EXPECT_TRUE(contains(r.status().message(), "model.embed_tokens.weight")) << r.status().to_string();
    EXPECT_TRUE(contains(r.status().message(), d.file("model.safetensors"))) << r.status().to_string();
  }
}

TEST_F(SafetensorsCorruption, ConfigProblems) {
  TempDir d("cfg");
  write_dir(d.path(), config_, synthetic_specs(*src_));
  write_all(d.file("config.json"), R"({"architectures": ["FalconForCausalLM"]})");
  auto r = open_weights(d.path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented);
  EXPECT_TRUE(contains(r.status().message(), d.file("config.json"))) << r.status().to_string();
  EXPECT_TRUE(contains(r.status().message(), "FalconForCausalLM")) << r.status().to_string();
  write_all(d.file("config.json"), "{\"architectures\": [\"LlamaForCausalLM\"], ");
  r = open_weights(d.path());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(contains(r.status().message(), d.file("config.json"))) << r.status().to_string();
  fs::remove(d.file("config.json"));
  r = open_weights(d.path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(contains(r.status().message(), "config.json")) << r.status().to_string();
}

TEST_F(SafetensorsCorruption, ShardedIndexProblems) {
  TempDir d("sharded");
  ASSERT_TRUE(write_safetensors_dir(*src_, DType::kBF16, d.path(), 20000).ok());
  ASSERT_TRUE(open_weights(d.path()).ok());
  const std::string index = read_all(d.file("model.safetensors.index.json"));
  // A shard the index names is gone.
  std::vector<std::string> shards;
  for (const auto& e : fs::directory_iterator(d.path())) {
    if (e.path().extension() == ".safetensors") shards.push_back(e.path().string());
  }
  ASSERT_GT(shards.size(), 2u);
  std::sort(shards.begin(), shards.end());
  const std::string moved = shards[1] + ".moved";
  fs::rename(shards[1], moved);
  auto r = open_weights(d.path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(contains(r.status().message(), shards[1])) << r.status().to_string();
  fs::rename(moved, shards[1]);
  // The index maps a tensor to a shard that does not hold it.
  std::string bad = index;
  const std::string key = "\"model.embed_tokens.weight\": \"";
  const auto at = bad.find(key);
  ASSERT_NE(at, std::string::npos);
  const std::string first_shard = fs::path(shards[0]).filename().string();
  const std::string last_shard = fs::path(shards.back()).filename().string();
  bad.replace(at + key.size(), first_shard.size(), last_shard);
  write_all(d.file("model.safetensors.index.json"), bad);
  r = open_weights(d.path());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(contains(r.status().message(), "model.embed_tokens.weight")) << r.status().to_string();
  EXPECT_TRUE(contains(r.status().message(), last_shard)) << r.status().to_string();
  // Broken index JSON.
  write_all(d.file("model.safetensors.index.json"), "{\"weight_map\": ");
  r = open_weights(d.path());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(contains(r.status().message(), "model.safetensors.index.json")) << r.status().to_string();
}

// ---------------------------------------------------------------------------------------------
// GGUF

// Re-writes `src` (a GGUF file) with edited metadata / tensor list.
Status rewrite_gguf(const std::string& src, const std::string& dst,
                    const std::function<void(std::vector<std::pair<std::string, GgufValue>>&)>& edit_kv,
                    const std::function<void(std::vector<TensorWriteSpec>&)>& edit_tensors,
                    std::unique_ptr<GgufFile>* keep_alive) {
  auto f = GgufFile::open(src);
  if (!f.ok()) return f.status();
  std::vector<std::pair<std::string, GgufValue>> kv((*f)->metadata().begin(), (*f)->metadata().end());
  std::vector<TensorWriteSpec> specs;
  for (const auto& t : (*f)->tensors()) {
    TensorWriteSpec s;
    s.name = t.name;
    s.dtype = t.dtype;
    s.shape = t.shape();
    const std::uint8_t* data = (*f)->tensor_data(t);
    s.fill = [data](void* out, std::int64_t bytes) {
      std::memcpy(out, data, static_cast<std::size_t>(bytes));
      return ok_status();
    };
    specs.push_back(std::move(s));
  }
  if (edit_kv) edit_kv(kv);
  if (edit_tensors) edit_tensors(specs);
  *keep_alive = std::move(f).value();
  return write_gguf_file(dst, kv, specs);
}

class GgufCorruption : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = small_config();
    src_ = synthetic_weights(config_, 6);
    path_ = dir_.file("good.gguf");
    ASSERT_TRUE(write_gguf(*src_, DType::kBF16, path_).ok());
    bytes_ = read_all(path_);
    auto f = GgufFile::open(path_);
    ASSERT_TRUE(f.ok()) << f.status().to_string();
    data_start_ = (*f)->tensors().front().data_begin;
  }

  Status open_bytes(const std::string& bytes, std::string* path) {
    *path = dir_.file("bad.gguf");
    write_all(*path, bytes);
    auto r = open_weights(*path);
    return r.ok() ? ok_status() : r.status();
  }

  ModelConfig config_;
  std::unique_ptr<WeightSource> src_;
  TempDir dir_{"gguf_bad"};
  std::string path_;
  std::string bytes_;
  std::uint64_t data_start_ = 0;
};

TEST_F(GgufCorruption, TruncatedAtManyOffsets) {
  std::vector<std::size_t> cuts = {0, 3, 4, 8, 16, 23, 24, 100, data_start_ - 1, data_start_, data_start_ + 1,
                                   bytes_.size() - 1};
  for (std::size_t i = 1; i < 64; ++i) cuts.push_back(bytes_.size() * i / 64);
  for (std::size_t i = 1; i < 64; ++i) cuts.push_back(data_start_ * i / 64);
  for (std::size_t cut : cuts) {
    std::string path;
    Status s = open_bytes(bytes_.substr(0, cut), &path);
    ASSERT_FALSE(s.ok()) << "cut at " << cut;
    EXPECT_TRUE(contains(s.message(), path)) << s.to_string();
    if (cut > data_start_) {
      EXPECT_TRUE(contains(s.message(), "tensor '")) << s.to_string();
    }
  }
}

TEST_F(GgufCorruption, FlippedBytesNeverCrash) {
  int failures = 0;
  for (std::size_t pos = 0; pos < data_start_; pos += (pos < 128 ? 1 : 7)) {
    for (unsigned char mask : {0x01, 0x80}) {
      std::string b = bytes_;
      b[pos] = static_cast<char>(static_cast<unsigned char>(b[pos]) ^ mask);
      std::string path;
      Status s = open_bytes(b, &path);
      if (!s.ok()) {
        ++failures;
        EXPECT_TRUE(contains(s.message(), path)) << "pos " << pos << ": " << s.to_string();
      }
    }
  }
  EXPECT_GT(failures, 100);
}

TEST_F(GgufCorruption, HeaderProblems) {
  std::string path;
  std::string b = bytes_;
  b[0] = 'X';
  Status s = open_bytes(b, &path);
  EXPECT_TRUE(contains(s.message(), "bad magic")) << s.to_string();
  b = bytes_;
  b[4] = 7;  // version 7
  s = open_bytes(b, &path);
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented);
  EXPECT_TRUE(contains(s.message(), "version 7")) << s.to_string();
  b = bytes_;
  for (int i = 8; i < 16; ++i) b[static_cast<std::size_t>(i)] = '\xff';  // tensor count
  s = open_bytes(b, &path);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  b = bytes_;
  for (int i = 16; i < 24; ++i) b[static_cast<std::size_t>(i)] = '\x7f';  // kv count
  s = open_bytes(b, &path);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_TRUE(contains(s.message(), path));
}

TEST_F(GgufCorruption, ModelProblems) {
  std::unique_ptr<GgufFile> keep;
  const std::string dst = dir_.file("edited.gguf");
  auto expect_error = [&](StatusCode code, std::vector<std::string> needles) {
    auto r = open_weights(dst);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), code) << r.status().to_string();
    needles.push_back(dst);
    for (const auto& n : needles) EXPECT_TRUE(contains(r.status().message(), n)) << r.status().to_string();
  };
  // Unsupported architecture.
  ASSERT_TRUE(rewrite_gguf(path_, dst, [](auto& kv) {
    for (auto& [k, v] : kv) {
      if (k == "general.architecture") v = GgufValue::str("falcon");
    }
  }, nullptr, &keep).ok());
  expect_error(StatusCode::kUnimplemented, {"falcon", "general.architecture"});
  // Missing metadata key.
  ASSERT_TRUE(rewrite_gguf(path_, dst, [](auto& kv) {
    std::erase_if(kv, [](const auto& p) { return p.first == "llama.block_count"; });
  }, nullptr, &keep).ok());
  expect_error(StatusCode::kNotFound, {"llama.block_count"});
  // Wrong key type.
  ASSERT_TRUE(rewrite_gguf(path_, dst, [](auto& kv) {
    for (auto& [k, v] : kv) {
      if (k == "llama.embedding_length") v = GgufValue::str("64");
    }
  }, nullptr, &keep).ok());
  expect_error(StatusCode::kInvalidArgument, {"llama.embedding_length"});
  // Missing tensor.
  ASSERT_TRUE(rewrite_gguf(path_, dst, nullptr, [](auto& t) {
    std::erase_if(t, [](const TensorWriteSpec& s) { return s.name == "blk.1.ffn_up.weight"; });
  }, &keep).ok());
  expect_error(StatusCode::kNotFound, {"model.layers.1.mlp.up_proj.weight", "blk.1.ffn_up.weight"});
  // Wrong shape.
  ASSERT_TRUE(rewrite_gguf(path_, dst, nullptr, [](auto& t) {
    for (auto& s : t) {
      if (s.name == "blk.0.attn_v.weight") s.shape = {16, 64};  // config expects [32, 64]
    }
  }, &keep).ok());
  expect_error(StatusCode::kInvalidArgument, {"model.layers.0.self_attn.v_proj.weight", "[16, 64]", "[32, 64]"});
  // Unsupported ggml type: patch the type field of one tensor info to Q4_0.
  {
    std::string b = bytes_;
    const std::string name = "blk.0.ffn_gate.weight";
    auto at = b.find(name);
    ASSERT_NE(at, std::string::npos);
    const std::size_t type_pos = at + name.size() + 4 + 2 * 8;
    std::uint32_t type = 0;
    std::memcpy(&type, b.data() + type_pos, 4);
    ASSERT_EQ(type, kGgmlTypeBF16);
    type = 2;
    std::memcpy(b.data() + type_pos, &type, 4);
    write_all(dst, b);
    expect_error(StatusCode::kUnimplemented, {"blk.0.ffn_gate.weight", "Q4_0"});
  }
  // Misaligned offset: patch the first tensor's offset to 1.
  {
    std::string b = bytes_;
    const std::string name = "blk.0.ffn_gate.weight";
    auto at = b.find(name);
    const std::size_t off_pos = at + name.size() + 4 + 2 * 8 + 4;
    std::uint64_t off = 0;
    std::memcpy(&off, b.data() + off_pos, 8);
    off += 2;
    std::memcpy(b.data() + off_pos, &off, 8);
    write_all(dst, b);
    expect_error(StatusCode::kDataLoss, {"blk.0.ffn_gate.weight", "alignment"});
    // Overlap: point it at the previous tensor's data.
    off = 0;
    std::memcpy(b.data() + off_pos, &off, 8);
    write_all(dst, b);
    expect_error(StatusCode::kDataLoss, {"overlaps"});
  }
}

}  // namespace
}  // namespace kun::model
