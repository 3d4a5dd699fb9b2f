#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "model/gguf.h"
#include "model/safetensors.h"
#include "model/tests/test_util.h"
#include "model/weight_source.h"

namespace kun::model {
namespace {

using testing::expect_same_weights;
using testing::read_f32;
using testing::TempDir;

ModelConfig preset(const std::string& name, DType dtype = DType::kBF16) {
  auto c = preset_config(name);
  KUN_CHECK(c.ok());
  c->dtype = dtype;
  return *c;
}

// A small config so round trips of every variant stay fast.
ModelConfig small(const std::string& name, DType dtype) {
  ModelConfig c = preset(name, dtype);
  c.num_layers = 2;
  c.vocab_size = 512;
  return c;
}

TEST(ExpectedTensorsTest, NamesAndShapes) {
  ModelConfig c = preset("tiny-qwen2");
  const auto t = expected_tensors(c);
  EXPECT_EQ(t.front().name, "model.embed_tokens.weight");
  EXPECT_EQ(t.back().name, "model.norm.weight");  // tied: no lm_head
  std::int64_t total = 0;
  for (const auto& x : t) total += x.num_elements();
  EXPECT_EQ(total, c.total_param_count());
  EXPECT_EQ(layer_tensor_name(3, "self_attn.q_proj.weight"), "model.layers.3.self_attn.q_proj.weight");
  ModelConfig l = preset("llama-350m");
  const auto tl = expected_tensors(l);
  EXPECT_EQ(tl.back().name, "lm_head.weight");
  total = 0;
  for (const auto& x : tl) total += x.num_elements();
  EXPECT_EQ(total, l.total_param_count());
  EXPECT_EQ(static_cast<std::int64_t>(tl.size()), 1 + 9 * l.num_layers + 2);
}

TEST(SyntheticTest, DeterministicAndOrderIndependent) {
  ModelConfig c = preset("tiny");
  auto a = synthetic_weights(c, 7);
  auto b = synthetic_weights(c, 7);
  auto other = synthetic_weights(c, 8);
  const std::string q = layer_tensor_name(1, "self_attn.q_proj.weight");
  const auto first = read_f32(*a, q);
  // Reading other tensors first does not change it.
  read_f32(*b, "model.embed_tokens.weight");
  read_f32(*b, layer_tensor_name(0, "mlp.up_proj.weight"));
  EXPECT_EQ(read_f32(*b, q), first);
  EXPECT_NE(read_f32(*other, q), first);
  EXPECT_NE(read_f32(*a, layer_tensor_name(2, "self_attn.q_proj.weight")), first);
}

TEST(SyntheticTest, ValueScales) {
  ModelConfig c = preset("tiny");
  auto s = synthetic_weights(c, 1);
  auto stats = [&](const std::string& name) {
    const auto v = read_f32(*s, name);
    double sum = 0, sq = 0;
    for (float x : v) {
      sum += x;
      sq += static_cast<double>(x) * x;
    }
    const double mean = sum / static_cast<double>(v.size());
    return std::pair<double, double>(mean, std::sqrt(sq / static_cast<double>(v.size()) - mean * mean));
  };
  auto [em, es] = stats("model.embed_tokens.weight");
  EXPECT_NEAR(em, 0.0, 0.02);
  EXPECT_NEAR(es, 1.0, 0.02);
  auto [qm, qs] = stats(layer_tensor_name(0, "self_attn.q_proj.weight"));
  EXPECT_NEAR(qm, 0.0, 0.01);
  EXPECT_NEAR(qs, 1.0 / 16.0, 0.003);  // 1/sqrt(hidden=256)
  auto [dm, ds] = stats(layer_tensor_name(0, "mlp.down_proj.weight"));
  EXPECT_NEAR(ds, 1.0 / std::sqrt(688.0), 0.003);
  auto [nm, ns] = stats(layer_tensor_name(0, "input_layernorm.weight"));
  EXPECT_NEAR(nm, 1.0, 0.02);
  EXPECT_LT(ns, 0.1);
  auto [lm, ls] = stats("lm_head.weight");
  EXPECT_NEAR(ls * 16.0, 5.0, 0.2);  // logit std ~5 for unit-rms hidden states
}

// Values are rounded once to the config dtype: an f32 read of a bf16 model is bf16-exact.
TEST(SyntheticTest, ValuesExactInConfigDtype) {
  for (DType t : {DType::kBF16, DType::kF16}) {
    auto s = synthetic_weights(preset("tiny", t), 3);
    const auto v = read_f32(*s, layer_tensor_name(0, "mlp.gate_proj.weight"));
    for (float x : v) {
      const float r = t == DType::kBF16 ? bf16_to_f32(f32_to_bf16(x)) : f16_to_f32(f32_to_f16(x));
      ASSERT_EQ(r, x);
    }
    // And reading in the config dtype gives the same bits.
    std::vector<std::uint16_t> h(v.size());
    ASSERT_TRUE(s->read_tensor(layer_tensor_name(0, "mlp.gate_proj.weight"), t, h.data(),
                               static_cast<std::int64_t>(h.size() * 2))
                    .ok());
    for (std::size_t i = 0; i < v.size(); ++i) {
      ASSERT_EQ(t == DType::kBF16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]), v[i]);
    }
  }
}

TEST(SyntheticTest, Llama350mMaterialisesQuickly) {
  ModelConfig c = preset("llama-350m");
  auto s = synthetic_weights(c, 1);
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::uint16_t> buf;
  for (const auto& t : expected_tensors(c)) {
    buf.resize(static_cast<std::size_t>(t.num_elements()));
    ASSERT_TRUE(s->read_tensor(t.name, DType::kBF16, buf.data(), t.num_elements() * 2).ok());
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("llama-350m synthetic materialisation: %.2f s for %lld params\n", secs,
              static_cast<long long>(c.total_param_count()));
#if defined(__SANITIZE_ADDRESS__)
  (void)secs;
#else
  EXPECT_LT(secs, 60.0);  // loose: CI machines are shared; the figure is printed
#endif
}

TEST(SyntheticTest, ReadErrors) {
  auto s = synthetic_weights(preset("tiny"), 1);
  float x[4];
  auto st = s->read_tensor("model.norm.weight", DType::kF32, x, sizeof(x));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("model.norm.weight"), std::string::npos);
  EXPECT_EQ(s->tensor_info("nope").status().code(), StatusCode::kNotFound);
}

struct RoundTripCase {
  std::string preset;
  DType model_dtype;
  DType file_dtype;
};

class SafetensorsRoundTrip : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(SafetensorsRoundTrip, SingleAndSharded) {
  const auto& p = GetParam();
  ModelConfig c = small(p.preset, p.model_dtype);
  auto src = synthetic_weights(c, 42);
  for (std::int64_t shard : {std::int64_t{0}, std::int64_t{300000}}) {
    TempDir dir("st");
    ASSERT_TRUE(write_safetensors_dir(*src, p.file_dtype, dir.path(), shard).ok());
    const bool sharded = std::filesystem::exists(dir.file("model.safetensors.index.json"));
    EXPECT_EQ(sharded, shard > 0);
    auto back = open_weights(dir.path());
    ASSERT_TRUE(back.ok()) << back.status().to_string();
    const ModelConfig& bc = (*back)->config();
    EXPECT_EQ(bc.dtype, p.file_dtype);
    EXPECT_EQ(bc.architecture, c.architecture);
    EXPECT_EQ(bc.tie_word_embeddings, c.tie_word_embeddings);
    EXPECT_EQ(bc.attention_bias, c.attention_bias);
    EXPECT_EQ(bc.rope_inv_freq(), c.rope_inv_freq());
    auto info = (*back)->tensor_info("model.embed_tokens.weight");
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->dtype, p.file_dtype);
    // Lossless whenever the file dtype can hold the model dtype's values.
    const bool lossless = p.file_dtype == p.model_dtype || p.file_dtype == DType::kF32;
    if (lossless) {
      expect_same_weights(*src, **back);
    } else {
      const auto a = read_f32(*src, layer_tensor_name(1, "mlp.up_proj.weight"));
      const auto b = read_f32(**back, layer_tensor_name(1, "mlp.up_proj.weight"));
      ASSERT_EQ(a.size(), b.size());
      for (std::size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-2 * std::fabs(a[i]) + 1e-4);
    }
  }
}

class GgufRoundTrip : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(GgufRoundTrip, ReadsBackInHfLayout) {
  const auto& p = GetParam();
  ModelConfig c = small(p.preset, p.model_dtype);
  auto src = synthetic_weights(c, 9);
  TempDir dir("gguf");
  const std::string path = dir.file("model.gguf");
  ASSERT_TRUE(write_gguf(*src, p.file_dtype, path).ok());
  auto back = open_weights(path);
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  const ModelConfig& bc = (*back)->config();
  EXPECT_EQ(bc.architecture, c.architecture == "qwen2" ? "qwen2" : "llama");
  EXPECT_EQ(bc.vocab_size, c.vocab_size);
  EXPECT_EQ(bc.num_kv_heads, c.num_kv_heads);
  EXPECT_EQ(bc.head_dim, c.head_dim);
  EXPECT_EQ(bc.tie_word_embeddings, c.tie_word_embeddings);
  EXPECT_EQ(bc.attention_bias, c.attention_bias);
  EXPECT_EQ(bc.rms_norm_eps, c.rms_norm_eps);
  EXPECT_EQ(bc.rope_theta, c.rope_theta);
  EXPECT_EQ(bc.rope_scaling.type, c.rope_scaling.type);
  EXPECT_EQ(bc.rope_inv_freq(), c.rope_inv_freq());
  EXPECT_EQ(bc.bos_token_id, c.bos_token_id);
  EXPECT_EQ(bc.eos_token_id, c.eos_token_id);
  EXPECT_EQ(bc.dtype, p.file_dtype);
  if (p.file_dtype == p.model_dtype || p.file_dtype == DType::kF32) expect_same_weights(*src, **back);

  // The file itself holds llama.cpp's layout: q/k rows permuted for llama, not for qwen2.
  auto file = GgufFile::open(path);
  ASSERT_TRUE(file.ok());
  const GgufTensor* fq = (*file)->find_tensor("blk.1.attn_q.weight");
  ASSERT_NE(fq, nullptr);
  ASSERT_EQ(fq->dims.size(), 2u);
  EXPECT_EQ(fq->dims[0], static_cast<std::uint64_t>(c.hidden_size));  // reversed dims
  EXPECT_EQ(fq->dims[1], static_cast<std::uint64_t>(c.q_dim()));
  const std::int64_t cols = c.hidden_size;
  std::vector<float> file_q(static_cast<std::size_t>(c.q_dim() * cols));
  convert_tensor_bytes((*file)->tensor_data(*fq), fq->dtype, file_q.data(), DType::kF32,
                       static_cast<std::int64_t>(file_q.size()));
  const auto hf_q = read_f32(*src, layer_tensor_name(1, "self_attn.q_proj.weight"));
  if (p.file_dtype == p.model_dtype || p.file_dtype == DType::kF32) {
    const bool permuted = bc.architecture == "llama";
    for (std::int64_t r = 0; r < c.q_dim(); ++r) {
      const std::int64_t fr = permuted ? gguf_permuted_row(r, c.q_dim(), c.num_heads) : r;
      ASSERT_EQ(file_q[static_cast<std::size_t>(fr * cols)], hf_q[static_cast<std::size_t>(r * cols)]) << r;
    }
    if (permuted) {
      EXPECT_NE(file_q, hf_q);
    }
  }
}

const RoundTripCase kCases[] = {
    {"tiny", DType::kBF16, DType::kBF16},        {"tiny", DType::kBF16, DType::kF32},
    {"tiny", DType::kF16, DType::kF16},          {"tiny", DType::kF32, DType::kF32},
    {"tiny", DType::kF32, DType::kBF16},         {"tiny-qwen2", DType::kBF16, DType::kBF16},
    {"tiny-qwen2", DType::kF16, DType::kF32},    {"tiny-llama3", DType::kBF16, DType::kBF16},
    {"tiny-llama3", DType::kF32, DType::kF16},
};

std::string case_name(const ::testing::TestParamInfo<RoundTripCase>& info) {
  std::string n = info.param.preset + "_" + std::string(dtype_name(info.param.model_dtype)) + "_to_" +
                  std::string(dtype_name(info.param.file_dtype));
  for (char& ch : n) {
    if (ch == '-') ch = '_';
  }
  return n;
}

INSTANTIATE_TEST_SUITE_P(All, SafetensorsRoundTrip, ::testing::ValuesIn(kCases), case_name);
INSTANTIATE_TEST_SUITE_P(All, GgufRoundTrip, ::testing::ValuesIn(kCases), case_name);

TEST(GgufTest, PermutationIsABijection) {
  for (std::int64_t heads : {1, 2, 4, 8}) {
    const std::int64_t rows = heads * 32;
    std::vector<int> seen(static_cast<std::size_t>(rows), 0);
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t f = gguf_permuted_row(r, rows, heads);
      ASSERT_GE(f, 0);
      ASSERT_LT(f, rows);
      EXPECT_EQ(f / 32, r / 32);  // stays within its head
      seen[static_cast<std::size_t>(f)]++;
    }
    for (int s : seen) EXPECT_EQ(s, 1);
  }
  // head_dim 4: HF rows [x0 x1 | y0 y1] -> file rows [x0 y0 x1 y1]
  EXPECT_EQ(gguf_permuted_row(0, 4, 1), 0);
  EXPECT_EQ(gguf_permuted_row(1, 4, 1), 2);
  EXPECT_EQ(gguf_permuted_row(2, 4, 1), 1);
  EXPECT_EQ(gguf_permuted_row(3, 4, 1), 3);
}

TEST(GgufTest, NameMapping) {
  EXPECT_EQ(hf_to_gguf_name("model.layers.12.mlp.down_proj.weight").value(), "blk.12.ffn_down.weight");
  EXPECT_EQ(hf_to_gguf_name("model.layers.0.self_attn.k_proj.bias").value(), "blk.0.attn_k.bias");
  EXPECT_EQ(gguf_to_hf_name("blk.3.attn_output.weight").value(), "model.layers.3.self_attn.o_proj.weight");
  EXPECT_EQ(gguf_to_hf_name("output.weight").value(), "lm_head.weight");
  EXPECT_FALSE(gguf_to_hf_name("rope_freqs.weight").has_value());
  EXPECT_FALSE(hf_to_gguf_name("model.layers.x.mlp.up_proj.weight").has_value());
  for (const auto& t : expected_tensors(preset("tiny-qwen2"))) {
    auto g = hf_to_gguf_name(t.name);
    ASSERT_TRUE(g.has_value()) << t.name;
    EXPECT_EQ(gguf_to_hf_name(*g).value(), t.name);
  }
}

TEST(GgufTest, MetadataAndAlignment) {
  TempDir dir("gguf_meta");
  const std::string path = dir.file("x.gguf");
  std::vector<std::pair<std::string, GgufValue>> kv;
  kv.emplace_back("general.architecture", GgufValue::str("llama"));
  GgufValue arr;
  arr.type = GgufValueType::kArray;
  arr.array_type = GgufValueType::kString;
  arr.array = {GgufValue::str("<s>"), GgufValue::str("</s>"), GgufValue::str("hello")};
  kv.emplace_back("tokenizer.ggml.tokens", arr);
  kv.emplace_back("some.flag", GgufValue::boolean(true));
  kv.emplace_back("some.float", GgufValue::f32(0.5f));
  TensorWriteSpec t;
  t.name = "a";
  t.dtype = DType::kF16;
  t.shape = {3, 5};
  t.fill = [](void* dst, std::int64_t bytes) {
    auto* h = static_cast<std::uint16_t*>(dst);
    for (std::int64_t i = 0; i < bytes / 2; ++i) h[i] = f32_to_f16(static_cast<float>(i));
    return ok_status();
  };
  TensorWriteSpec u = t;
  u.name = "b";
  u.dtype = DType::kF32;
  u.shape = {7};
  u.fill = [](void* dst, std::int64_t bytes) {
    auto* f = static_cast<float*>(dst);
    for (std::int64_t i = 0; i < bytes / 4; ++i) f[i] = -static_cast<float>(i);
    return ok_status();
  };
  ASSERT_TRUE(write_gguf_file(path, kv, {t, u}, 64).ok());
  auto f = GgufFile::open(path);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ((*f)->version(), 3u);
  EXPECT_EQ((*f)->alignment(), 64u);
  EXPECT_EQ((*f)->get_string("general.architecture").value(), "llama");
  const GgufValue* toks = (*f)->find_key("tokenizer.ggml.tokens");
  ASSERT_NE(toks, nullptr);
  ASSERT_EQ(toks->array.size(), 3u);
  EXPECT_EQ(toks->array[2].s, "hello");
  EXPECT_EQ((*f)->get_float("some.float").value(), 0.5);
  EXPECT_EQ((*f)->find_key("some.flag")->i, 1);
  const GgufTensor* b = (*f)->find_tensor("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->data_begin % 64, 0u);
  const GgufTensor* a = (*f)->find_tensor("a");
  EXPECT_EQ(a->shape(), (std::vector<std::int64_t>{3, 5}));
  EXPECT_EQ(a->dims, (std::vector<std::uint64_t>{5, 3}));
  float out[15];
  convert_tensor_bytes((*f)->tensor_data(*a), a->dtype, out, DType::kF32, 15);
  EXPECT_EQ(out[14], 14.0f);
  EXPECT_EQ((*f)->get_int("general.architecture").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*f)->get_int("missing.key").status().code(), StatusCode::kNotFound);
}

// A llama.cpp-style Llama 3.1 file carries rope scaling only as rope_freqs factors.
TEST(GgufTest, RecognisesLlama31RopeFactors) {
  ModelConfig c = small("tiny", DType::kBF16);
  c.head_dim = 128;
  c.num_heads = 2;
  c.num_kv_heads = 1;
  c.rope_theta = 500000.0f;
  c.rope_scaling = RopeScaling{RopeScaling::Type::kLlama3, 8.0f, 1.0f, 4.0f, 8192};
  auto src = synthetic_weights(c, 1);
  TempDir dir("gguf_rope");
  const std::string path = dir.file("m.gguf");
  ASSERT_TRUE(write_gguf(*src, DType::kBF16, path).ok());
  // Rewrite without our exact keys: copy metadata minus kunserve.*, same tensors.
  auto f = GgufFile::open(path);
  ASSERT_TRUE(f.ok());
  std::vector<std::pair<std::string, GgufValue>> kv;
  for (const auto& [k, v] : (*f)->metadata()) {
    if (!k.starts_with("kunserve.")) kv.emplace_back(k, v);
  }
  std::vector<TensorWriteSpec> specs;
  for (const auto& t : (*f)->tensors()) {
    TensorWriteSpec s;
    s.name = t.name;
    s.dtype = t.dtype;
    s.shape = t.shape();
    const std::uint8_t* data = (*f)->tensor_data(t);
    s.fill = [data](void* dst, std::int64_t bytes) {
      std::memcpy(dst, data, static_cast<std::size_t>(bytes));
      return ok_status();
    };
    specs.push_back(std::move(s));
  }
  const std::string path2 = dir.file("m2.gguf");
  ASSERT_TRUE(write_gguf_file(path2, kv, specs).ok());
  auto back = open_weights(path2);
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_EQ((*back)->config().rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ((*back)->config().rope_inv_freq(), c.rope_inv_freq());
}

TEST(SafetensorsTest, MetadataAndUnsupportedDtype) {
  TempDir dir("st_meta");
  const std::string path = dir.file("x.safetensors");
  TensorWriteSpec t;
  t.name = "w";
  t.dtype = DType::kBF16;
  t.shape = {2, 3};
  t.fill = [](void* dst, std::int64_t bytes) {
    std::memset(dst, 0, static_cast<std::size_t>(bytes));
    return ok_status();
  };
  ASSERT_TRUE(write_safetensors_file(path, {t}, {{"format", "pt"}}).ok());
  auto f = SafetensorsFile::open(path);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  ASSERT_NE((*f)->find("w"), nullptr);
  EXPECT_EQ((*f)->find("w")->shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ((std::filesystem::file_size(path) - 12) % 8, 0u);  // 8 + N + 12 data bytes with N % 8 == 0
}

TEST(OpenWeightsTest, UnknownPaths) {
  EXPECT_EQ(open_weights("/nonexistent/dir").status().code(), StatusCode::kNotFound);
  TempDir dir("open");
  {
    std::ofstream(dir.file("x.bin")) << "hello";
  }
  auto r = open_weights(dir.file("x.bin"));
  EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(r.status().message().find("x.bin"), std::string::npos);
}

}  // namespace
}  // namespace kun::model
