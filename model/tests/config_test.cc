#include "model/config.h"

#include <cmath>
#include <numbers>

#include <gtest/gtest.h>

namespace kun::model {
namespace {

constexpr const char* kLlama2 = R"({
  "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
  "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
  "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": null, "tie_word_embeddings": false, "torch_dtype": "float16",
  "transformers_version": "4.31.0.dev0", "use_cache": true, "vocab_size": 32000})";

constexpr const char* kLlama3 = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "vocab_size": 128256})";

constexpr const char* kQwen2 = R"({
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
  "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
  "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
  "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})";

constexpr const char* kMistral = R"({
  "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 32000})";

TEST(ConfigTest, ParsesLlama2) {
  auto c = parse_hf_config(kLlama2);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->architecture, "llama");
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->num_kv_heads, 32);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->dtype, DType::kF16);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_FLOAT_EQ(c->rope_theta, 10000.0f);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->tie_word_embeddings);
  // Llama 2 7B has 6.74B parameters.
  EXPECT_EQ(c->total_param_count(), 6738415616);
}

TEST(ConfigTest, ParsesLlama3WithRopeScaling) {
  auto c = parse_hf_config(kLlama3);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_FLOAT_EQ(c->rope_scaling.factor, 8.0f);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(c->eos_token_id, 128001);
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->dtype, DType::kBF16);
  // Llama 3.1 8B has 8.03B parameters.
  EXPECT_EQ(c->total_param_count(), 8030261248);
}

TEST(ConfigTest, ParsesQwen2) {
  auto c = parse_hf_config(kQwen2);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->architecture, "qwen2");
  EXPECT_TRUE(c->attention_bias);  // implied by the architecture
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-6f);
  // Qwen2.5-0.5B has 494M parameters.
  EXPECT_EQ(c->total_param_count(), 494032768);
}

TEST(ConfigTest, ParsesMistral) {
  auto c = parse_hf_config(kMistral);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->architecture, "mistral");
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->intermediate_size, 14336);
}

TEST(ConfigTest, RoundTripsThroughJson) {
  for (const auto& name : preset_names()) {
    auto p = preset_config(name);
    ASSERT_TRUE(p.ok());
    auto back = parse_hf_config(to_hf_config_json(*p));
    ASSERT_TRUE(back.ok()) << name << ": " << back.status().to_string();
    EXPECT_EQ(back->architecture, p->architecture);
    EXPECT_EQ(back->vocab_size, p->vocab_size);
    EXPECT_EQ(back->hidden_size, p->hidden_size);
    EXPECT_EQ(back->intermediate_size, p->intermediate_size);
    EXPECT_EQ(back->num_layers, p->num_layers);
    EXPECT_EQ(back->num_heads, p->num_heads);
    EXPECT_EQ(back->num_kv_heads, p->num_kv_heads);
    EXPECT_EQ(back->head_dim, p->head_dim);
    EXPECT_EQ(back->max_position_embeddings, p->max_position_embeddings);
    EXPECT_EQ(back->rms_norm_eps, p->rms_norm_eps);
    EXPECT_EQ(back->rope_theta, p->rope_theta);
    EXPECT_EQ(back->rope_scaling.type, p->rope_scaling.type);
    EXPECT_EQ(back->rope_scaling.factor, p->rope_scaling.factor);
    EXPECT_EQ(back->rope_scaling.original_max_position_embeddings,
              p->rope_scaling.original_max_position_embeddings);
    EXPECT_EQ(back->tie_word_embeddings, p->tie_word_embeddings);
    EXPECT_EQ(back->attention_bias, p->attention_bias);
    EXPECT_EQ(back->dtype, p->dtype);
    EXPECT_EQ(back->bos_token_id, p->bos_token_id);
    EXPECT_EQ(back->eos_token_id, p->eos_token_id);
    EXPECT_EQ(back->rope_inv_freq(), p->rope_inv_freq());
  }
}

TEST(ConfigTest, PresetSizes) {
  auto tiny = preset_config("tiny");
  ASSERT_TRUE(tiny.ok());
  EXPECT_LT(tiny->total_param_count(), 10'000'000);
  EXPECT_GT(tiny->total_param_count(), 1'000'000);
  auto m350 = preset_config("llama-350m");
  ASSERT_TRUE(m350.ok());
  EXPECT_EQ(m350->hidden_size, 1024);
  EXPECT_EQ(m350->num_layers, 24);
  EXPECT_NEAR(static_cast<double>(m350->total_param_count()), 3.5e8, 0.5e8);
  auto b1 = preset_config("llama-1b");
  ASSERT_TRUE(b1.ok());
  EXPECT_EQ(b1->total_param_count(), 1100048384);  // TinyLlama-1.1B
  auto q = preset_config("tiny-qwen2");
  ASSERT_TRUE(q.ok());
  EXPECT_TRUE(q->attention_bias);
  EXPECT_TRUE(q->tie_word_embeddings);
  auto l3 = preset_config("tiny-llama3");
  ASSERT_TRUE(l3.ok());
  EXPECT_EQ(l3->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(l3->num_heads / l3->num_kv_heads, 4);
  EXPECT_EQ(l3->rope_theta, 500000.0f);
  auto bad = preset_config("gpt-5");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("gpt-5"), std::string::npos);
}

// Llama 3.1 rope: high frequencies unchanged, low frequencies divided by the factor, the band
// between smoothly interpolated (transformers' _compute_llama3_parameters).
TEST(ConfigTest, Llama3RopeInvFreq) {
  auto c = parse_hf_config(kLlama3);
  ASSERT_TRUE(c.ok());
  const auto inv = c->rope_inv_freq();
  ASSERT_EQ(inv.size(), 64u);
  int low = 0, mid = 0, high = 0;
  for (std::size_t i = 0; i < inv.size(); ++i) {
    const double base = 1.0 / std::pow(500000.0, 2.0 * static_cast<double>(i) / 128.0);
    const double wavelen = 2 * std::numbers::pi / base;
    double expect;
    if (wavelen < 8192.0 / 4.0) {
      expect = base;
      ++high;
    } else if (wavelen > 8192.0) {
      expect = base / 8.0;
      ++low;
    } else {
      const double smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
      expect = (1 - smooth) * base / 8.0 + smooth * base;
      ++mid;
    }
    EXPECT_NEAR(inv[i], expect, 1e-6 * expect) << i;
  }
  EXPECT_GT(low, 0);
  EXPECT_GT(mid, 0);
  EXPECT_GT(high, 0);
}

TEST(ConfigTest, LinearRopeScaling) {
  auto c = preset_config("tiny");
  ASSERT_TRUE(c.ok());
  const auto plain = c->rope_inv_freq();
  c->rope_scaling.type = RopeScaling::Type::kLinear;
  c->rope_scaling.factor = 4.0f;
  const auto scaled = c->rope_inv_freq();
  for (std::size_t i = 0; i < plain.size(); ++i) EXPECT_FLOAT_EQ(scaled[i], plain[i] / 4.0f);
  EXPECT_FLOAT_EQ(plain[0], 1.0f);
}

TEST(ConfigTest, ErrorsNameTheField) {
  struct Case {
    std::string json;
    std::string needle;
    StatusCode code;
  };
  const std::vector<Case> cases = {
      {R"({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10})", "GPT2LMHeadModel", StatusCode::kUnimplemented},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": "32000", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4})",
       "vocab_size", StatusCode::kInvalidArgument},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
           "intermediate_size": 128, "num_attention_heads": 4})",
       "num_hidden_layers", StatusCode::kInvalidArgument},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 3})",
       "num_key_value_heads", StatusCode::kInvalidArgument},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})",
       "yarn", StatusCode::kUnimplemented},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "torch_dtype": "int8"})",
       "torch_dtype", StatusCode::kUnimplemented},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "tie_word_embeddings": "yes"})",
       "tie_word_embeddings", StatusCode::kInvalidArgument},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "rms_norm_eps": "small"})",
       "rms_norm_eps", StatusCode::kInvalidArgument},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "hidden_act": "gelu"})",
       "hidden_act", StatusCode::kUnimplemented},
      {R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,)", "malformed JSON",
       StatusCode::kInvalidArgument},
      {R"([1, 2, 3])", "object", StatusCode::kInvalidArgument},
      {R"({"architectures": 7})", "architectures", StatusCode::kInvalidArgument},
  };
  for (const auto& c : cases) {
    auto r = parse_hf_config(c.json);
    ASSERT_FALSE(r.ok()) << c.json;
    EXPECT_EQ(r.status().code(), c.code) << r.status().to_string();
    EXPECT_NE(r.status().message().find(c.needle), std::string::npos) << r.status().to_string();
  }
}

TEST(ConfigTest, ValidateRejectsBadNumbers) {
  auto c = preset_config("tiny");
  ASSERT_TRUE(c.ok());
  ModelConfig bad = *c;
  bad.head_dim = 33;
  EXPECT_FALSE(bad.validate().ok());
  bad = *c;
  bad.hidden_size = 0;
  EXPECT_FALSE(bad.validate().ok());
  bad = *c;
  bad.architecture = "gpt2";
  EXPECT_EQ(bad.validate().code(), StatusCode::kUnimplemented);
  bad = *c;
  bad.eos_token_id = bad.vocab_size;
  EXPECT_FALSE(bad.validate().ok());
}

}  // namespace
}  // namespace kun::model
