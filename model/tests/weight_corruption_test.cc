// Bad input never crashes and always yields a Status naming the file (and the tensor where one
// is involved). Runs under ASan/UBSan in CI.
#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
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

// A header length one byte short still parses (the header ends in padding spaces) but shifts
// every tensor by one byte: the data section then has a trailing byte the tensors do not cover.
TEST_F(SafetensorsCorruption, HeaderLengthOneByteShortShiftsEveryTensor) {
  ASSERT_EQ(bytes_[8 + header_len_ - 1], ' ') << "the writer pads the header with spaces";
  std::string b = bytes_;
  const std::uint64_t short_len = header_len_ - 1;
  std::memcpy(b.data(), &short_len, 8);
  std::string path;
  Status s = open_with(b, &path);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.to_string();
  EXPECT_TRUE(contains(s.message(), path)) << s.to_string();
  EXPECT_TRUE(contains(s.message(), "1 trailing bytes after tensor '")) << s.to_string();
  // One byte long: the header swallows the first data byte.
  const std::uint64_t long_len = header_len_ + 1;
  std::memcpy(b.data(), &long_len, 8);
  s = open_with(b, &path);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.to_string();
}

TEST_F(SafetensorsCorruption, TensorsMustTileTheDataSection) {
  struct Case {
    std::string header;
    std::size_t data;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      // A gap between two tensors.
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})",
       20, {"tensor 'b' starts at data offset 12", "tensor 'a' ends at 8", "gap of 4 bytes"}},
      // The first tensor does not start at 0.
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12,
       {"tensor 'w' starts at data offset 4", "start of the data section"}},
      // Trailing bytes after the last tensor.
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 11, {"3 trailing bytes after tensor 'w'"}},
      // Only metadata, yet data bytes.
      {R"({"__metadata__": {"format": "pt"}})", 4, {"4 trailing bytes", "start of the data section"}},
      // A zero-size tensor inside another one.
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}})",
       8, {"tensor 'z'", "overlaps tensor 'a'"}},
  };
  for (const auto& c : cases) {
    std::string path;
    Status s = open_with(raw_safetensors(c.header, c.data), &path);
    ASSERT_FALSE(s.ok()) << c.header;
    EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.to_string();
    EXPECT_TRUE(contains(s.message(), path)) << s.to_string();
    for (const auto& n : c.needles) EXPECT_TRUE(contains(s.message(), n)) << n << " in " << s.to_string();
  }
  // Exact tiling in any header order, with a zero-size tensor at a boundary, is fine.
  std::vector<SafetensorsTensor> tensors;
  std::map<std::string, std::string> metadata;
  const std::string ok = raw_safetensors(
      R"({"b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}, "z": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
      12);
  Status s = SafetensorsFile::parse("mem", reinterpret_cast<const std::uint8_t*>(ok.data()), ok.size(), &tensors, &metadata);
  EXPECT_TRUE(s.ok()) << s.to_string();
  EXPECT_EQ(tensors.size(), 3u);
}

// config.json says fewer layers than the file holds: the extra layer's tensors are unused.
TEST_F(SafetensorsCorruption, LayerCountMustMatchTheTensors) {
  ModelConfig fewer = config_;
  fewer.num_layers = 1;
  TempDir d("layers");
  write_dir(d.path(), config_, synthetic_specs(*src_));
  write_all(d.file("config.json"), to_hf_config_json(fewer));
  auto r = open_weights(d.path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(r.status().message(), d.file("model.safetensors"))) << r.status().to_string();
  EXPECT_TRUE(contains(r.status().message(), "model.layers.1.")) << r.status().to_string();
  EXPECT_TRUE(contains(r.status().message(), "belongs to layer 1 but the config has 1 layers")) << r.status().to_string();
  // More layers in the config than in the file: the first missing tensor is named.
  ModelConfig more = config_;
  more.num_layers = 3;
  write_all(d.file("config.json"), to_hf_config_json(more));
  r = open_weights(d.path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(contains(r.status().message(), "model.layers.2.input_layernorm.weight")) << r.status().to_string();
}

TEST_F(SafetensorsCorruption, UnknownTensorIsAnError) {
  auto specs = synthetic_specs(*src_);
  TensorWriteSpec extra;
  extra.name = "model.vision_tower.proj.weight";
  extra.dtype = DType::kF32;
  extra.shape = {4};
  extra.fill = [](void* dst, std::int64_t bytes) {
    std::memset(dst, 0, static_cast<std::size_t>(bytes));
    return ok_status();
  };
  specs.push_back(extra);
  TempDir d("extra");
  write_dir(d.path(), config_, specs);
  auto r = open_weights(d.path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(r.status().message(), "model.vision_tower.proj.weight")) << r.status().to_string();
  EXPECT_TRUE(contains(r.status().message(), "not used")) << r.status().to_string();
  // A saved rotary buffer is not a weight and is tolerated.
  specs.back().name = "model.layers.0.self_attn.rotary_emb.inv_freq";
  TempDir d2("inv_freq");
  write_dir(d2.path(), config_, specs);
  auto ok = open_weights(d2.path());
  EXPECT_TRUE(ok.ok()) << ok.status().to_string();
}

// Writes the model with one tensor's element `at` replaced by `value` (in `dtype`).
std::vector<TensorWriteSpec> specs_with_value(const WeightSource& src, const std::string& victim, std::int64_t at,
                                              float value) {
  auto specs = synthetic_specs(src);
  for (auto& s : specs) {
    if (s.name != victim) continue;
    auto inner = s.fill;
    const DType dt = s.dtype;
    s.fill = [inner, at, value, dt](void* dst, std::int64_t bytes) {
      KUN_RETURN_IF_ERROR(inner(dst, bytes));
      convert_dtype(&value, DType::kF32, static_cast<std::uint8_t*>(dst) + at * dtype_bytes(dt), dt, 1);
      return ok_status();
    };
  }
  return specs;
}

TEST_F(SafetensorsCorruption, NonFiniteWeightsAreReported) {
  const std::string victim = layer_tensor_name(1, "self_attn.o_proj.weight");
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    TempDir d("nan");
    write_dir(d.path(), config_, specs_with_value(*src_, victim, 77, bad));
    auto r = open_weights(d.path());
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
    EXPECT_TRUE(contains(r.status().message(), victim)) << r.status().to_string();
    EXPECT_TRUE(contains(r.status().message(), "element 77 of")) << r.status().to_string();
    EXPECT_TRUE(contains(r.status().message(), d.file("model.safetensors"))) << r.status().to_string();
    WeightCheckOptions allow;
    allow.allow_non_finite = true;
    auto loaded = open_weights(d.path(), allow);
    ASSERT_TRUE(loaded.ok()) << loaded.status().to_string();
    const auto values = testing::read_f32(**loaded, victim);
    ASSERT_GT(values.size(), 77u);
    EXPECT_FALSE(std::isfinite(values[77]));
  }
}

TEST(NonFiniteScan, EveryDtypeAndMisalignedData) {
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    const std::int64_t n = 10000;
    const std::int64_t esz = dtype_bytes(dt);
    std::vector<float> values(static_cast<std::size_t>(n), 1.5f);
    // Converted into an aligned buffer, then copied one byte off alignment (as in a file).
    std::vector<std::uint8_t> aligned(static_cast<std::size_t>(n * esz));
    std::vector<std::uint8_t> buf(aligned.size() + 1);
    auto stage = [&] {
      convert_dtype(values.data(), DType::kF32, aligned.data(), dt, n);
      std::memcpy(buf.data() + 1, aligned.data(), aligned.size());
    };
    stage();
    EXPECT_EQ(first_non_finite(buf.data() + 1, dt, n), -1);
    values[9000] = std::numeric_limits<float>::quiet_NaN();
    stage();
    EXPECT_EQ(first_non_finite(buf.data() + 1, dt, n), 9000);
    values[4096] = std::numeric_limits<float>::infinity();
    stage();
    EXPECT_EQ(first_non_finite(buf.data() + 1, dt, n), 4096);
  }
}

// A FIFO where a weight file, config.json or a .gguf file should be is refused at once.
TEST_F(SafetensorsCorruption, FifoPathsFailWithoutBlocking) {
  const auto started = std::chrono::steady_clock::now();
  {
    TempDir d("fifo_weights");
    fs::copy_file(good_.file("config.json"), d.file("config.json"));
    ASSERT_EQ(::mkfifo(d.file("model.safetensors").c_str(), 0600), 0);
    auto r = open_weights(d.path());
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(contains(r.status().message(), "not a regular file")) << r.status().to_string();
    EXPECT_TRUE(contains(r.status().message(), d.file("model.safetensors"))) << r.status().to_string();
  }
  {
    TempDir d("fifo_config");
    fs::copy_file(file_, d.file("model.safetensors"));
    ASSERT_EQ(::mkfifo(d.file("config.json").c_str(), 0600), 0);
    auto r = open_weights(d.path());
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(contains(r.status().message(), "not a regular file")) << r.status().to_string();
    EXPECT_TRUE(contains(r.status().message(), "config.json")) << r.status().to_string();
  }
  {
    TempDir d("fifo_gguf");
    ASSERT_EQ(::mkfifo(d.file("m.gguf").c_str(), 0600), 0);
    auto r = open_weights(d.file("m.gguf"));
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(contains(r.status().message(), "not a regular file")) << r.status().to_string();
    auto g = GgufFile::open(d.file("m.gguf"));
    ASSERT_FALSE(g.ok());
    EXPECT_TRUE(contains(g.status().message(), "not a regular file")) << g.status().to_string();
  }
  auto dev = open_weights("/dev/null");
  ASSERT_FALSE(dev.ok());
  EXPECT_TRUE(contains(dev.status().message(), "not a regular file")) << dev.status().to_string();
  // Without O_NONBLOCK the first open would wait for a writer forever (ctest's timeout).
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(5));
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


TEST_F(GgufCorruption, BlockCountMustMatchTheTensors) {
  std::unique_ptr<GgufFile> keep;
  const std::string dst = dir_.file("layers.gguf");
  ASSERT_TRUE(rewrite_gguf(path_, dst, [](auto& kv) {
    for (auto& [k, v] : kv) {
      if (k == "llama.block_count") v = GgufValue::u32(1);
    }
  }, nullptr, &keep).ok());
  auto r = open_weights(dst);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().to_string();
  EXPECT_TRUE(contains(r.status().message(), dst)) << r.status().to_string();
  EXPECT_TRUE(contains(r.status().message(), "belongs to layer 1 but the config has 1 layers")) << r.status().to_string();
  // A tensor with a name no model uses.
  ASSERT_TRUE(rewrite_gguf(path_, dst, nullptr, [](auto& t) {
    TensorWriteSpec s;
    s.name = "mm.projector.weight";
    s.dtype = DType::kF32;
    s.shape = {8};
    s.fill = [](void* out, std::int64_t bytes) {
      std::memset(out, 0, static_cast<std::size_t>(bytes));
      return ok_status();
    };
    t.push_back(s);
  }, &keep).ok());
  r = open_weights(dst);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(contains(r.status().message(), "tensor 'mm.projector.weight' is not used")) << r.status().to_string();
}

TEST_F(GgufCorruption, NonFiniteWeightsAreReported) {
  std::unique_ptr<GgufFile> keep;
  const std::string dst = dir_.file("nan.gguf");
  ASSERT_TRUE(rewrite_gguf(path_, dst, nullptr, [](auto& t) {
    for (auto& s : t) {
      if (s.name != "blk.0.ffn_down.weight") continue;
      auto inner = s.fill;
      const DType dt = s.dtype;
      s.fill = [inner, dt](void* out, std::int64_t bytes) {
        KUN_RETURN_IF_ERROR(inner(out, bytes));
        const float nan = std::numeric_limits<float>::quiet_NaN();
        convert_dtype(&nan, DType::kF32, static_cast<std::uint8_t*>(out) + 5 * dtype_bytes(dt), dt, 1);
        return ok_status();
      };
    }
  }, &keep).ok());
  auto r = open_weights(dst);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(contains(r.status().message(), "model.layers.0.mlp.down_proj.weight")) << r.status().to_string();
  EXPECT_TRUE(contains(r.status().message(), "element 5 of")) << r.status().to_string();
  WeightCheckOptions allow;
  allow.allow_non_finite = true;
  EXPECT_TRUE(open_weights(dst, allow).ok());
}

TEST_F(GgufCorruption, TrailingBytesAndGapsAreErrors) {
  std::string path;
  Status s = open_bytes(bytes_ + std::string(64, '\0'), &path);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_TRUE(contains(s.message(), "64 trailing bytes after tensor '")) << s.to_string();
  // Move the last tensor (by offset) one alignment unit further: a gap, and it runs past the end
  // unless the file grows, so grow it.
  auto f = GgufFile::open(path_);
  ASSERT_TRUE(f.ok());
  const GgufTensor* last = &(*f)->tensors().front();
  for (const auto& t : (*f)->tensors()) {
    if (t.data_begin > last->data_begin) last = &t;
  }
  std::string b = bytes_ + std::string(32, '\0');
  // The length-prefixed name, so "output.weight" does not match inside "attn_output.weight".
  std::string needle(8, '\0');
  const std::uint64_t name_len = last->name.size();
  std::memcpy(needle.data(), &name_len, 8);
  needle += last->name;
  const auto at = b.find(needle);
  ASSERT_NE(at, std::string::npos);
  const std::size_t off_pos = at + needle.size() + 4 + last->dims.size() * 8 + 4;
  std::uint64_t off = 0;
  std::memcpy(&off, b.data() + off_pos, 8);
  ASSERT_EQ(off, last->data_begin - data_start_) << last->name;
  off += 32;
  std::memcpy(b.data() + off_pos, &off, 8);
  s = open_bytes(b, &path);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(contains(s.message(), "tensor '" + last->name + "' starts at data offset")) << s.to_string();
  EXPECT_TRUE(contains(s.message(), "gap of 32 bytes")) << s.to_string();
}

}  // namespace
}  // namespace kun::model
