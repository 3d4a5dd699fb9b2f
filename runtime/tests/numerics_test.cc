// Numerics against an independent reference (issue 2): the C++ forward pass on a safetensors
// model matches tests/reference/llama_reference.py (PyTorch, float32, its own safetensors parser)
// on the same files: last-position logits within 1e-3 relative error and 64 greedy tokens
// identical, for several configurations (GQA, tied embeddings + qkv bias, llama3 rope scaling,
// bf16 weights; tied bf16: the embedding kept once in the LM head's GEMM layout). A GGUF file of the same weights generates the same tokens. The KV cache is bf16
// (the engine's default) and the reference rounds K/V to bf16 the same way (--kv-dtype bf16,
// round to nearest even after RoPE); one case keeps an f32 cache against the plain f32 reference.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

#include "common/test_support.h"
#include <nlohmann/json.hpp>

#include "kernels/kernels.h"
#include "model/tests/test_util.h"
#include "runtime/tests/test_models.h"

namespace kun::runtime {
namespace {

using model::testing::run_command;

std::string join(const std::vector<std::int32_t>& v) {
  std::ostringstream os;
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
  return os.str();
}

// Last-position logits of `prompt` from our forward pass on one device.
std::vector<float> our_logits(const model::WeightSource& w, const std::vector<std::int32_t>& prompt, DType kv_dtype) {
  const auto& c = w.config();
  DeviceOptions opt;
  opt.weight_dtype = c.dtype;
  opt.kv_dtype = kv_dtype;
  opt.page_bytes = 256 * 1024;
  opt.capacity_bytes = device_param_bytes(c, c.dtype, 0, c.num_layers, opt.page_bytes) +
                       device_workspace_bytes(c, opt) + 64 * opt.page_bytes;
  auto dev = VirtualDevice::create(opt, c);
  KUN_CHECK(dev.ok()) << dev.status().to_string();
  KUN_CHECK_OK((*dev)->load_weights(w, 0, c.num_layers));
  auto pages = (*dev)->give_free_pages_to_kv();
  kv::KvBlockAllocator alloc((*dev)->kv_storage().blocks_per_page());
  KUN_CHECK_OK(alloc.add_pages(pages));
  kv::BlockTable table(opt.kv_block_size, 0, c.num_layers);
  const auto n = static_cast<std::int64_t>(prompt.size());
  KUN_CHECK_OK(table.append_tokens(n, alloc));
  std::vector<std::vector<std::byte*>> ptrs(static_cast<std::size_t>(c.num_layers));
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    for (kv::BlockId b : table.layer_blocks(l)) {
      ptrs[static_cast<std::size_t>(l)].push_back((*dev)->kv_storage().block_data(b));
    }
  }
  auto& fwd = (*dev)->forward();
  std::vector<float> hidden(static_cast<std::size_t>(n * c.hidden_size));
  fwd.embed((*dev)->head_weights(), prompt.data(), n, hidden.data());
  const model::SequenceSlice slice{0, n};
  fwd.run_layers(
      0, c.num_layers, std::span(&slice, 1), hidden.data(), [&](std::int64_t l) { return (*dev)->layer_weights(l); },
      [&](std::int64_t l, std::int64_t, const model::SequenceSlice& s, const float* qkv, float* out) {
        auto& p = ptrs[static_cast<std::size_t>(l)];
        fwd.attend_local(s, qkv, model::LayerKv{p.data(), static_cast<std::int64_t>(p.size())}, out);
      });
  std::vector<float> logits(static_cast<std::size_t>(c.vocab_size));
  const std::int64_t row = n - 1;
  fwd.logits((*dev)->head_weights(), hidden.data(), std::span(&row, 1), logits.data());
  return logits;
}

struct Case {
  std::string preset;
  DType dtype;
  DType kv_dtype = DType::kBF16;
};

std::string case_name(const Case& c) {
  std::ostringstream os;
  for (char ch : c.preset) os << (ch == '-' ? '_' : ch);
  os << '_' << dtype_name(c.dtype) << "_kv_" << dtype_name(c.kv_dtype);
  return os.str();
}

class NumericsTest : public ::testing::TestWithParam<Case> {};

TEST_P(NumericsTest, MatchesPyTorchReference) {
  if (!model::testing::reference_python_has_torch()) KUN_SKIP_OR_FAIL_IN_CI(KUN_REFERENCE_PYTHON << " lacks torch/numpy (scripts/install_deps.sh installs them)");
  const Case tc = GetParam();
  auto config = model::preset_config(tc.preset);
  ASSERT_TRUE(config.ok());
  config->dtype = tc.dtype;
  model::testing::TempDir dir("numerics");
  auto synthetic = model::synthetic_weights(*config, 1234);
  ASSERT_TRUE(model::write_safetensors_dir(*synthetic, tc.dtype, dir.path(), 1 << 20).ok());
  auto weights = model::open_weights(dir.path());
  ASSERT_TRUE(weights.ok()) << weights.status().to_string();

  std::vector<std::int32_t> prompt;
  for (int i = 0; i < 23; ++i) prompt.push_back(static_cast<std::int32_t>(3 + (i * 131) % (config->vocab_size - 3)));
  constexpr int kGenerate = 64;
  std::string out;
  const std::string cmd = std::string(KUN_REFERENCE_PYTHON) + " " + KUN_SOURCE_DIR + "/tests/reference/llama_reference.py --model " +
                          dir.path() + " --tokens " + join(prompt) + " --generate " + std::to_string(kGenerate) +
                          " --threads 1 --kv-dtype " + std::string(dtype_name(tc.kv_dtype)) + " 2>&1";
  ASSERT_EQ(run_command(cmd, &out), 0) << cmd << "\n" << out;
  nlohmann::json ref = nlohmann::json::parse(out);

  // Logits of the last prompt position.
  const std::vector<float> ours = our_logits(**weights, prompt, tc.kv_dtype);
  const auto& theirs = ref["logits_last"];
  ASSERT_EQ(theirs.size(), ours.size());
  double max_diff = 0, max_ref = 0;
  for (std::size_t i = 0; i < ours.size(); ++i) {
    const double r = theirs[i].get<double>();
    max_diff = std::max(max_diff, std::abs(static_cast<double>(ours[i]) - r));
    max_ref = std::max(max_ref, std::abs(r));
  }
  const double rel = max_diff / max_ref;
  std::printf("%s %s kv %s: max |logit diff| %.3g, relative %.3g\n", tc.preset.c_str(),
              std::string(dtype_name(tc.dtype)).c_str(), std::string(dtype_name(tc.kv_dtype)).c_str(), max_diff, rel);
  // f32 activations (exact FMAs): the reference's precision. bf16 activations (the bf16 and amx
  // GEMMs, what bf16 engines compute): about 4e-3 to 9e-3 on the bf16 models here, so 2e-2; the
  // greedy tokens below must still match.
  const bool f32_activations = kernels::active_gemm_activations() == kernels::GemmActivations::kF32 ||
                               tc.dtype != DType::kBF16;
  EXPECT_LT(rel, f32_activations ? 1e-3 : 2e-2)
      << "GEMM activations " << kernels::gemm_activations_name(kernels::active_gemm_activations());

  // 64 greedy tokens through the engine (paged KV, decode steps).
  ManualClock clock;
  testing::InstanceShape shape;
  shape.kv_dtype = tc.kv_dtype;
  auto inst = testing::make_instance(**weights, shape, &clock);
  engine::RequestSpec spec;
  spec.prompt_tokens = prompt;
  spec.max_tokens = kGenerate;
  spec.ignore_eos = true;
  const auto tokens = testing::run_alone(*inst, spec);
  std::vector<std::int32_t> expected;
  for (const auto& t : ref["tokens"]) expected.push_back(t.get<std::int32_t>());
  EXPECT_EQ(tokens, expected);

  // The same weights as GGUF generate the same tokens.
  const std::string gguf = dir.file("model.gguf");
  ASSERT_TRUE(model::write_gguf(*synthetic, tc.dtype, gguf).ok());
  auto gguf_weights = model::open_weights(gguf);
  ASSERT_TRUE(gguf_weights.ok()) << gguf_weights.status().to_string();
  auto gguf_inst = testing::make_instance(**gguf_weights, shape, &clock);
  EXPECT_EQ(testing::run_alone(*gguf_inst, spec), expected) << "GGUF";
}

INSTANTIATE_TEST_SUITE_P(Configs, NumericsTest,
                         ::testing::Values(Case{"tiny", DType::kF32}, Case{"tiny-qwen2", DType::kF32},
                                           Case{"tiny-llama3", DType::kF32}, Case{"tiny", DType::kBF16},
                                           Case{"tiny-qwen2", DType::kBF16},
                                           Case{"tiny-llama3", DType::kF16}, Case{"tiny", DType::kF32, DType::kF32}),
                         [](const ::testing::TestParamInfo<Case>& param_info) { return case_name(param_info.param); });

}  // namespace
}  // namespace kun::runtime
