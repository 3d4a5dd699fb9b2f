// Unit tests of the tokenizers on small hand-written vocabularies.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "model/chat_template.h"
#include "model/tests/tokenizer_test_util.h"
#include "model/tokenizer.h"
#include "model/tokenizer_nfc.h"
#include "model/tokenizer_regex.h"
#include "model/tokenizer_unicode.h"

namespace kun::model {
namespace {

using Ids = std::vector<std::int32_t>;

std::vector<std::string> split_with(const TokenizerRegex& re, std::string_view text) {
  const auto cps = unicode::decode_utf8(text);
  std::vector<std::string> out;
  for (auto [b, e] : re.find_all(cps)) {
    out.push_back(unicode::encode_utf8({cps.begin() + static_cast<std::ptrdiff_t>(b),
                                        cps.begin() + static_cast<std::ptrdiff_t>(e)}));
  }
  return out;
}

constexpr std::string_view kLlama3Pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

TEST(TokenizerUnicode, Categories) {
  EXPECT_TRUE(unicode::is_letter(U'a'));
  EXPECT_TRUE(unicode::is_letter(U'é'));
  EXPECT_TRUE(unicode::is_letter(U'中'));
  EXPECT_TRUE(unicode::is_letter(U'ب'));
  EXPECT_FALSE(unicode::is_letter(U'1'));
  EXPECT_FALSE(unicode::is_letter(U'😀'));
  EXPECT_TRUE(unicode::is_number(U'٣'));
  EXPECT_TRUE(unicode::is_number(U'½'));
  EXPECT_TRUE(unicode::is_number(U'Ⅷ'));
  EXPECT_EQ(unicode::general_category(U'\u0301'), unicode::Category::kMn);
  EXPECT_TRUE(unicode::is_white_space(U'\u3000'));
  EXPECT_FALSE(unicode::is_white_space(U'\u200b'));
}

TEST(TokenizerUnicode, RepairUtf8) {
  EXPECT_EQ(unicode::repair_utf8("abc"), "abc");
  EXPECT_EQ(unicode::repair_utf8("a\xF0\x9F"), "a\xEF\xBF\xBD");          // cut emoji: one U+FFFD
  EXPECT_EQ(unicode::repair_utf8("\xC3\x28"), "\xEF\xBF\xBD(");             // bad continuation
  EXPECT_EQ(unicode::repair_utf8("\x80\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // stray continuations
  EXPECT_EQ(unicode::repair_utf8("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_TRUE(unicode::is_valid_utf8("\xEF\xBF\xBD"));
}

TEST(TokenizerUnicode, Nfc) {
  EXPECT_EQ(unicode::nfc("e\xCC\x81"), "\xC3\xA9");                   // e + acute -> é
  EXPECT_EQ(unicode::nfc("\xE1\x84\x80\xE1\x85\xA1"), "\xEA\xB0\x80");  // Hangul L+V -> 가
  EXPECT_EQ(unicode::nfc("a\xCC\xA3\xCC\x87"), "\xE1\xBA\xA1\xCC\x87");  // reorder + compose: ạ̇
  EXPECT_EQ(unicode::nfc("\xE2\x84\xAB"), "\xC3\x85");                // Angstrom sign -> Å
  EXPECT_EQ(unicode::nfc("plain ascii"), "plain ascii");
}

TEST(TokenizerRegex, Llama3Pattern) {
  auto re = TokenizerRegex::compile(kLlama3Pattern);
  ASSERT_TRUE(re.ok()) << re.status().to_string();
  using V = std::vector<std::string>;
  EXPECT_EQ(split_with(*re, "Hello world"), (V{"Hello", " world"}));
  EXPECT_EQ(split_with(*re, "I'm HE'LL"), (V{"I", "'m", " HE", "'LL"}));
  EXPECT_EQ(split_with(*re, "1234567"), (V{"123", "456", "7"}));
  EXPECT_EQ(split_with(*re, "a  b"), (V{"a", " ", " b"}));
  EXPECT_EQ(split_with(*re, "a\n\n  b"), (V{"a", "\n\n", " ", " b"}));
  EXPECT_EQ(split_with(*re, "x = (y);\n"), (V{"x", " =", " (", "y", ");\n"}));
  EXPECT_EQ(split_with(*re, "end  "), (V{"end", "  "}));
  EXPECT_EQ(split_with(*re, "中文text"), (V{"中文text"}));
}

TEST(TokenizerRegex, Features) {
  auto re = TokenizerRegex::compile("(?i:ab)+|[^a-c\\d]{2,3}?|x(?=y)|\\x{1F600}");
  ASSERT_TRUE(re.ok()) << re.status().to_string();
  using V = std::vector<std::string>;
  EXPECT_EQ(split_with(*re, "aBAbc"), (V{"aBAb"}));
  EXPECT_EQ(split_with(*re, "zzzz"), (V{"zz", "zz"}));
  auto look = TokenizerRegex::compile("x(?=y)|a(?!b)");
  ASSERT_TRUE(look.ok());
  EXPECT_EQ(split_with(*look, "xyxabac"), (V{"x", "a"}));
  EXPECT_EQ(split_with(*re, "\xF0\x9F\x98\x80"), (V{"\xF0\x9F\x98\x80"}));
  EXPECT_FALSE(TokenizerRegex::compile("(ab").ok());
  EXPECT_FALSE(TokenizerRegex::compile("[a-").ok());
  EXPECT_FALSE(TokenizerRegex::compile("\\p{Bogus}").ok());
  EXPECT_FALSE(TokenizerRegex::compile("(a*)*").ok());
}

// A tiny byte-level BPE vocabulary: letters h e l o, 'Ġ' (space), merges up to "hello".
std::string byte_level_json(bool ignore_merges = false) {
  return R"({
    "added_tokens": [
      {"id": 100, "content": "<|bos|>", "special": true},
      {"id": 101, "content": "<|eos|>", "special": true},
      {"id": 102, "content": "<tool>", "special": false}
    ],
    "normalizer": null,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": " ?\\p{L}+|\\p{N}|\\s+|[^\\s\\p{L}\\p{N}]+"},
       "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]},
    "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [100], "tokens": ["<|bos|>"]}}},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "ignore_merges": )" +
         std::string(ignore_merges ? "true" : "false") + R"(,
      "vocab": {"h": 0, "e": 1, "l": 2, "o": 3, "Ġ": 4, "he": 5, "ll": 6, "hell": 7, "hello": 8,
                "Ġhello": 9, "ð": 10, "Ł": 11, "ĺ": 12, "Ģ": 13, "1": 14, "lo": 15, "!": 16},
      "merges": ["h e", "l l", "he ll", "hell o", "Ġ hello", ["l", "o"]]}
  })";
}

std::unique_ptr<Tokenizer> must_load(std::string_view json, std::string_view config = "") {
  auto t = load_tokenizer_from_json(json, config, "test/tokenizer.json");
  EXPECT_TRUE(t.ok()) << t.status().to_string();
  return t.ok() ? std::move(t).value() : nullptr;
}

TEST(TokenizerByteLevel, MergesSpecialTokensAndDecode) {
  auto t = must_load(byte_level_json());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->encode("hello hello", false), (Ids{8, 9}));
  EXPECT_EQ(t->encode("hello", true), (Ids{100, 8}));
  EXPECT_EQ(t->encode("hlo", false), (Ids{0, 15}));
  // Added tokens are matched before BPE, inside words too.
  EXPECT_EQ(t->encode("hello<|eos|>hello<tool>1", false), (Ids{8, 101, 8, 102, 14}));
  // U+1F600 is F0 9F 98 80: not all bytes are in the vocab, the missing ones are dropped.
  EXPECT_EQ(t->decode(Ids{8, 101, 9, 102}, false), "hello<|eos|> hello<tool>");
  EXPECT_EQ(t->decode(Ids{100, 8, 101, 9, 102}, true), "hello hello<tool>");
  EXPECT_TRUE(t->is_special(100));
  EXPECT_FALSE(t->is_special(102));
  EXPECT_EQ(t->vocab_size(), 103);
  EXPECT_EQ(t->bos_token_id(), -1);  // no config and no known BOS name
  // Ids outside the vocabulary decode to nothing.
  EXPECT_EQ(t->decode(Ids{8, 5000, -3}, false), "hello");
}

TEST(TokenizerByteLevel, IgnoreMerges) {
  auto t = must_load(byte_level_json(true));
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->encode("hello hello", false), (Ids{8, 9}));
}

TEST(TokenizerByteLevel, CutCharactersBecomeReplacement) {
  auto t = must_load(byte_level_json());
  ASSERT_NE(t, nullptr);
  // 'ð' 'Ł' stand for bytes F0 9F: half of an emoji.
  EXPECT_EQ(t->decode(Ids{0, 10, 11}, false), "h\xEF\xBF\xBD");
}

// SentencePiece-style BPE: Prepend/Replace normalizer, byte fallback, Llama 2 decoders.
std::string sentencepiece_json() {
  std::string vocab = R"("<unk>": 0, "<s>": 1, "</s>": 2)";
  for (int b = 0; b < 256; ++b) {
    char name[16];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab += ", \"" + std::string(name) + "\": " + std::to_string(3 + b);
  }
  vocab += R"(, "▁": 259, "a": 260, "b": 261, "▁a": 262, "ab": 263, "▁ab": 264, "c": 265)";
  return R"({
    "added_tokens": [
      {"id": 0, "content": "<unk>", "special": true},
      {"id": 1, "content": "<s>", "special": true},
      {"id": 2, "content": "</s>", "special": true}],
    "normalizer": {"type": "Sequence", "normalizers": [
      {"type": "Prepend", "prepend": "▁"},
      {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
    "pre_tokenizer": null,
    "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    "decoder": {"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
      {"type": "ByteFallback"}, {"type": "Fuse"},
      {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true, "byte_fallback": true,
      "vocab": {)" + vocab + R"(},
      "merges": ["▁ a", "a b", "▁a b"]}
  })";
}

// Qwen2-style: NFC normalizer, Split with Qwen2's pattern (single digits), ByteLevel.
TEST(TokenizerByteLevel, Qwen2StyleNfcAndDigits) {
  const std::string json = R"({
    "added_tokens": [{"id": 20, "content": "<|im_start|>", "special": true},
                     {"id": 21, "content": "<|im_end|>", "special": true},
                     {"id": 22, "content": "<|endoftext|>", "special": true}],
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
       "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
    "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
    "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
    "model": {"type": "BPE", "vocab": {"1": 0, "2": 1, "Ã": 2, "©": 3, "Ã©": 4, "Ġ": 5, "12": 6},
              "merges": ["Ã ©", "1 2"]}
  })";
  auto t = must_load(json);
  ASSERT_NE(t, nullptr);
  // Digits are split one by one before BPE, so the "1 2" merge never applies across them.
  EXPECT_EQ(t->encode("12", false), (Ids{0, 1}));
  // e + U+0301 is composed to é (C3 A9 -> "Ã©") before tokenization.
  EXPECT_EQ(t->encode("e\xCC\x81", false), Ids{4});
  EXPECT_EQ(t->encode("\xC3\xA9 1", false), (Ids{4, 5, 0}));
  // U+212B -> U+00C5 (C3 85): "Ã" is in the vocabulary, the symbol of byte 85 is not.
  EXPECT_EQ(t->encode("\xE2\x84\xAB", false), Ids{2});
  EXPECT_EQ(t->decode(Ids{4, 5, 0}, false), "\xC3\xA9 1");
  EXPECT_EQ(t->eos_token_id(), 22);
  auto chat = t->apply_chat_template({{"user", "hi"}}, true);
  ASSERT_TRUE(chat.ok());
  EXPECT_EQ(*chat, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(TokenizerSentencePiece, ByteFallbackAndDecoders) {
  auto t = must_load(sentencepiece_json(), R"({"bos_token": "<s>", "eos_token": "</s>"})");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->bos_token_id(), 1);
  EXPECT_EQ(t->eos_token_id(), 2);
  EXPECT_EQ(t->encode("ab", true), (Ids{1, 264}));
  // "ab é" -> "▁ab▁é": é is not in the vocab, so its bytes C3 A9 come as <0xC3><0xA9>.
  EXPECT_EQ(t->encode("ab é", false), (Ids{264, 259, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(t->decode(t->encode("ab é", false), false), "ab é");
  EXPECT_EQ(t->decode(Ids{1, 264, 2}, false), "<s> ab</s>");
  EXPECT_EQ(t->decode(Ids{1, 264, 2}, true), "ab");
  EXPECT_EQ(t->decode(Ids{264, 3 + 0xC3}, false), "ab\xEF\xBF\xBD");
  // Special tokens in text split the input; every piece gets the prefix again (HF legacy).
  EXPECT_EQ(t->encode("ab</s>ab", false), (Ids{264, 2, 264}));
}

TEST(TokenizerSentencePiece, ModelFileMatchesJson) {
  std::vector<testing::SpPieceSpec> pieces = {{"<unk>", 0, 2}, {"<s>", 0, 3}, {"</s>", 0, 3}};
  for (int b = 0; b < 256; ++b) {
    char name[16];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    pieces.push_back({name, 0, 6});
  }
  // Scores decrease with the id, as in Llama's model: merges in id order.
  const char* normal[] = {"▁", "a", "b", "▁a", "ab", "▁ab", "c"};
  for (int i = 0; i < 7; ++i) {
    pieces.push_back({normal[i], -static_cast<float>(i), 1});
  }
  auto sp = load_sentencepiece_model(testing::make_sentencepiece_model(pieces), "", "test/tokenizer.model");
  ASSERT_TRUE(sp.ok()) << sp.status().to_string();
  auto js = must_load(sentencepiece_json());
  ASSERT_NE(js, nullptr);
  for (std::string text : {"ab", "ab é", "abab  c", " a b ab", "ab</s>ab", "🙂 x", ""}) {
    EXPECT_EQ((*sp)->encode(text, false), js->encode(text, false)) << text;
    EXPECT_EQ((*sp)->decode((*sp)->encode(text, false), false), js->decode(js->encode(text, false), false));
  }
  EXPECT_EQ((*sp)->encode("ab", true), (Ids{1, 264}));
  EXPECT_FALSE(load_sentencepiece_model("\x0a\xff", "", "bad.model").ok());
}

TEST(TokenizerLoad, MalformedJsonNamesFileAndField) {
  auto r = load_tokenizer_from_json("{not json", "", "dir/tokenizer.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("dir/tokenizer.json"), std::string::npos);
  r = load_tokenizer_from_json(R"({"model": {"type": "BPE", "vocab": [], "merges": []}})", "",
                               "dir/tokenizer.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.vocab"), std::string::npos) << r.status().to_string();
  r = load_tokenizer_from_json(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})", "",
                               "dir/tokenizer.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.merges[0]"), std::string::npos) << r.status().to_string();
  r = load_tokenizer_from_json(
      R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a"}}})",
      "", "dir/tokenizer.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("pre_tokenizer.pattern"), std::string::npos) << r.status().to_string();
  r = load_tokenizer_from_json(R"({"model": {"type": "Unigram", "vocab": []}})", "", "x.json");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented);
  r = load_tokenizer_from_json(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                                   "added_tokens": [{"id": "x", "content": "y"}]})", "", "x.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("added_tokens[0].id"), std::string::npos);
  EXPECT_EQ(load_tokenizer("/nonexistent/dir").status().code(), StatusCode::kNotFound);
}

TEST(TokenizerLoad, FromDirectoryWithConfig) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("kun_tokenizer_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << sentencepiece_json();
  std::ofstream(dir / "tokenizer_config.json")
      << R"({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "chat_template": "{% if messages[0]['role'] == 'system' %}<<SYS>>{% endif %}[INST]"})";
  auto t = load_tokenizer(dir.string());
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  auto chat = (*t)->apply_chat_template({{"user", "hi"}}, true);
  ASSERT_TRUE(chat.ok());
  EXPECT_EQ(*chat, "<s>[INST] hi [/INST]");
  std::filesystem::remove_all(dir);
}

// A FIFO (or device) where tokenizer.json should be is refused at once: opening it for reading
// would otherwise wait for a writer forever.
TEST(TokenizerLoad, RefusesAFifoInsteadOfBlocking) {
  const auto dir = std::filesystem::temp_directory_path() / ("kun_tokenizer_fifo_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  ASSERT_EQ(::mkfifo((dir / "tokenizer.json").c_str(), 0600), 0);
  auto t = load_tokenizer(dir.string());
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("not a regular file"), std::string::npos) << t.status().to_string();
  t = load_tokenizer((dir / "tokenizer.json").string());
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("not a regular file"), std::string::npos) << t.status().to_string();
  std::filesystem::remove_all(dir);
}

TEST(ChatTemplate, Families) {
  ChatTemplate llama3{ChatTemplateKind::kLlama3, "<|begin_of_text|>", "<|eot_id|>", ""};
  auto r = render_chat_template(llama3, {{"system", "Be brief."}, {"user", " Hi \n"}}, true);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  ChatTemplate chatml{ChatTemplateKind::kChatMl, "", "<|im_end|>", "You are a helpful assistant."};
  r = render_chat_template(chatml, {{"user", "Hi"}}, true);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  ChatTemplate llama2{ChatTemplateKind::kLlama2, "<s>", "</s>", ""};
  r = render_chat_template(llama2, {{"system", "S"}, {"user", "U1"}, {"assistant", "A1"}, {"user", "U2"}},
                           true);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]");
  EXPECT_EQ(render_chat_template(llama2, {{"user", "a"}, {"user", "b"}}, true).status().code(),
            StatusCode::kInvalidArgument);
  auto bad = render_chat_template(llama3, {{"wizard", "x"}}, true);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("messages[0].role"), std::string::npos);
  EXPECT_FALSE(render_chat_template(ChatTemplate{}, {{"user", "x"}}, true).ok());
  EXPECT_EQ(detect_chat_template_kind("{{ '<|im_start|>' + message['role'] }}"), ChatTemplateKind::kChatMl);
  EXPECT_EQ(detect_chat_template_kind("<|start_header_id|>"), ChatTemplateKind::kLlama3);
  EXPECT_EQ(detect_chat_template_kind("[INST] <<SYS>>"), ChatTemplateKind::kLlama2);
}

// The byte-level BPE vocabulary gen-model embeds in GGUF files: a real tokenizer.json of exactly
// the asked size that our loader reads, deterministic, merges that shorten English-like text, BOS
// added, every byte string round-tripping.
TEST(SyntheticBpe, IsARealDeterministicByteLevelBpe) {
  for (std::int64_t vocab : {std::int64_t{258}, std::int64_t{1000}, std::int64_t{32000}}) {
    const TokenizerFiles a = synthetic_bpe_tokenizer_files(vocab);
    EXPECT_EQ(a.tokenizer_json, synthetic_bpe_tokenizer_files(vocab).tokenizer_json);
    auto tok = load_tokenizer_from_json(a.tokenizer_json, a.tokenizer_config_json, "synthetic");
    ASSERT_TRUE(tok.ok()) << tok.status().to_string();
    EXPECT_EQ((*tok)->vocab_size(), vocab);
    EXPECT_EQ((*tok)->bos_token_id(), 0);
    EXPECT_EQ((*tok)->eos_token_id(), 1);
    std::mt19937 rng(static_cast<unsigned>(vocab));
    for (int trial = 0; trial < 50; ++trial) {
      std::string text;
      const int len = static_cast<int>(rng() % 40);
      for (int i = 0; i < len; ++i) text.push_back(static_cast<char>(rng() % 2 ? 'a' + rng() % 26 : rng() % 256));
      const auto ids = (*tok)->encode(text, true);
      ASSERT_FALSE(ids.empty());
      EXPECT_EQ(ids.front(), 0);
      for (auto id : ids) EXPECT_LT(id, vocab);
      // Byte-level: the bytes come back exactly (invalid UTF-8 included, before repair).
      if (unicode::repair_utf8(text) == text) {
        EXPECT_EQ((*tok)->decode(ids, true), text);
      }
    }
    if (vocab == 32000) {
      const std::string english = "the quick brown fox jumps over the lazy dog";
      EXPECT_LT((*tok)->encode(english, false).size(), english.size() * 2 / 3);
      auto chat = (*tok)->apply_chat_template({{"user", "hi"}}, true);
      ASSERT_TRUE(chat.ok());
      EXPECT_NE(chat->find("<|im_start|>assistant"), std::string::npos);
    }
  }
}

TEST(Synthetic, RoundTripAndDeterminism) {
  auto a = synthetic_tokenizer(32000);
  auto b = synthetic_tokenizer(32000);
  EXPECT_EQ(a->vocab_size(), 32000);
  EXPECT_EQ(a->bos_token_id(), 0);
  EXPECT_EQ(a->eos_token_id(), 1);
  std::mt19937 rng(7);
  for (std::string text : {std::string("the quick brown fox"), std::string("héllo 👩‍👩‍👧 <s> \t\n"),
                           std::string()}) {
    const auto ids = a->encode(text, true);
    EXPECT_EQ(ids, b->encode(text, true));
    EXPECT_EQ(ids.front(), 0);
    EXPECT_EQ(a->decode(ids, true), text);
    for (auto id : ids) EXPECT_LT(id, 32000);
  }
  EXPECT_LT(a->encode("the quick brown fox jumps", false).size(), 20u);
  // Random ids decode to valid UTF-8, and the detokenizer agrees with decode.
  Ids ids;
  for (int i = 0; i < 500; ++i) ids.push_back(static_cast<std::int32_t>(rng() % 32000));
  IncrementalDetokenizer detok(*a, true);
  std::string streamed;
  for (auto id : ids) {
    const std::string piece = detok.push(id);
    EXPECT_TRUE(unicode::is_valid_utf8(piece));
    streamed += piece;
  }
  streamed += detok.flush();
  EXPECT_EQ(streamed, a->decode(ids, true));
  EXPECT_TRUE(a->apply_chat_template({{"user", "hi"}}, true).ok());
}

TEST(IncrementalDetokenizer, NeverSplitsCharacters) {
  auto t = must_load(sentencepiece_json());
  ASSERT_NE(t, nullptr);
  // "ab😀ab é" through byte fallback: the emoji is four byte tokens.
  const Ids ids = t->encode("ab\xF0\x9F\x98\x80" "ab é ab ab ab ab ab ab ab ab ab ab ab ab", true);
  for (bool skip : {false, true}) {
    IncrementalDetokenizer detok(*t, skip);
    std::string streamed;
    for (auto id : ids) {
      const std::string piece = detok.push(id);
      EXPECT_TRUE(unicode::is_valid_utf8(piece)) << piece;
      EXPECT_EQ(piece.find("\xEF\xBF\xBD"), std::string::npos);
      streamed += piece;
    }
    streamed += detok.flush();
    EXPECT_EQ(streamed, t->decode(ids, skip));
  }
  // A sequence that ends inside a character: the flush emits U+FFFD, as decode does.
  IncrementalDetokenizer detok(*t, false);
  std::string s = detok.push(264);
  s += detok.push(3 + 0xF0);
  EXPECT_EQ(s, "ab");
  s += detok.flush();
  EXPECT_EQ(s, t->decode(Ids{264, 3 + 0xF0}, false));
}

}  // namespace
}  // namespace kun::model
