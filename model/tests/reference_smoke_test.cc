// Proves that tests/reference/llama_reference.py (the independent PyTorch reference the forward
// pass is checked against) runs on our safetensors output and agrees with our config maths.
#include <cmath>
#include <cstdio>
#include <set>
#include <string>

#include <gtest/gtest.h>

#include "common/test_support.h"
#include <nlohmann/json.hpp>

#include "model/tests/test_util.h"
#include "model/weight_source.h"

namespace kun::model {
namespace {

using testing::TempDir;

using testing::run_command;

std::string reference_script() { return std::string(KUN_SOURCE_DIR) + "/tests/reference/llama_reference.py"; }

nlohmann::json run_reference(const std::string& dir, const std::string& extra) {
  std::string out;
  const std::string cmd = std::string(KUN_REFERENCE_PYTHON) + " " + reference_script() + " --model " + dir +
                          " --tokens 1,17,300,42,9,1000,5 --threads 1 " + extra + " 2>&1";
  const int rc = run_command(cmd, &out);
  EXPECT_EQ(rc, 0) << cmd << "\n" << out;
  try {
    return nlohmann::json::parse(out);
  } catch (const nlohmann::json::exception& e) {
    ADD_FAILURE() << "reference output is not JSON: " << e.what() << "\n" << out;
    return nlohmann::json::object();
  }
}

class ReferenceSmoke : public ::testing::TestWithParam<std::string> {};

TEST_P(ReferenceSmoke, RunsOnSyntheticModel) {
  if (!testing::reference_python_has_torch()) KUN_SKIP_OR_FAIL_IN_CI(KUN_REFERENCE_PYTHON << " lacks torch/numpy");
  auto c = preset_config(GetParam());
  ASSERT_TRUE(c.ok());
  c->num_layers = 2;
  TempDir dir("ref");
  auto src = synthetic_weights(*c, 11);
  ASSERT_TRUE(write_safetensors_dir(*src, DType::kBF16, dir.path(), /*max_shard_bytes=*/1 << 20).ok());

  const std::string npy = dir.file("logits.npy");
  auto r = run_reference(dir.path(), "--generate 8 --inv-freq --check-cache --logits-npy " + npy);
  ASSERT_TRUE(r.contains("logits_last")) << r.dump();
  const auto& logits = r["logits_last"];
  ASSERT_EQ(static_cast<std::int64_t>(logits.size()), c->vocab_size);
  double sum = 0, sq = 0;
  for (const auto& v : logits) {
    const double x = v.get<double>();
    ASSERT_TRUE(std::isfinite(x));
    sum += x;
    sq += x * x;
  }
  const double mean = sum / static_cast<double>(logits.size());
  const double stddev = std::sqrt(sq / static_cast<double>(logits.size()) - mean * mean);
  std::printf("%s: logit std %.2f\n", GetParam().c_str(), stddev);
  EXPECT_GT(stddev, 1.0);  // a real spread, so greedy argmax is not a near tie
  EXPECT_LT(stddev, 20.0);
  ASSERT_EQ(r["tokens"].size(), 8u);
  for (const auto& t : r["tokens"]) {
    EXPECT_GE(t.get<std::int64_t>(), 0);
    EXPECT_LT(t.get<std::int64_t>(), c->vocab_size);
  }
  for (const auto& m : r["margins"]) EXPECT_GT(m.get<double>(), 1e-4);
  // The reference's RoPE frequencies agree with ModelConfig::rope_inv_freq (llama3 scaling too).
  const auto inv = c->rope_inv_freq();
  ASSERT_EQ(r["inv_freq"].size(), inv.size());
  for (std::size_t i = 0; i < inv.size(); ++i) {
    EXPECT_NEAR(r["inv_freq"][i].get<double>(), inv[i], 1e-6 * inv[i]) << i;
  }
  EXPECT_TRUE(std::filesystem::exists(npy));

  // KV-cached decoding and full recomputation give the same greedy tokens.
  EXPECT_EQ(r["cache_consistent"], true);
  std::printf("%s: greedy tokens %s\n", GetParam().c_str(), r["tokens"].dump().c_str());
  // The synthetic model reacts to its input: greedy output is not one token repeated.
  std::set<std::int64_t> distinct;
  for (const auto& t : r["tokens"]) distinct.insert(t.get<std::int64_t>());
  EXPECT_GE(distinct.size(), 3u) << r["tokens"].dump();
}

INSTANTIATE_TEST_SUITE_P(Presets, ReferenceSmoke, ::testing::Values("tiny", "tiny-qwen2", "tiny-llama3"),
                         [](const auto& param_info) {
                           std::string n = param_info.param;
                           for (char& ch : n) {
                             if (ch == '-') ch = '_';
                           }
                           return n;
                         });

}  // namespace
}  // namespace kun::model
