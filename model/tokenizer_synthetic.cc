// The synthetic vocabulary of dummy models (synthetic_tokenizer in tokenizer.h):
//   id 0 "<s>" (BOS, special), id 1 "</s>" (EOS, special), ids 2..257 the 256 single bytes,
//   ids 258.. printable ASCII pieces from a fixed deterministic sequence: " a".." z", the letter
//   pairs, then pseudo-random words of 3..6 letters with and without a leading space.
// Encoding is greedy longest-match (bytes cover everything), so decode(encode(text)) == text for
// any UTF-8 text. The same vocab_size always gives the same vocabulary.
// synthetic_bpe_tokenizer_files: the same kind of vocabulary as a real byte-level BPE
// tokenizer.json, for the GGUF files gen-model writes.
#include <algorithm>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>

#include "model/chat_template.h"
#include "model/tokenizer.h"
#include "model/tokenizer_unicode.h"

namespace kun::model {
namespace {

constexpr std::int32_t kBosId = 0;
constexpr std::int32_t kEosId = 1;
constexpr std::int32_t kFirstByteId = 2;
constexpr std::int32_t kFirstPieceId = kFirstByteId + 256;
constexpr std::size_t kMaxPieceBytes = 7;

class SyntheticTokenizer final : public Tokenizer {
 public:
  explicit SyntheticTokenizer(std::int64_t vocab_size) {
    KUN_CHECK(vocab_size >= kFirstPieceId)
        << "a synthetic vocabulary needs at least " << kFirstPieceId
        << " ids (2 special + 256 bytes), got " << vocab_size;
    KUN_CHECK(vocab_size <= (std::int64_t{1} << 24)) << "synthetic vocab_size too large: " << vocab_size;
    pieces_.reserve(static_cast<std::size_t>(vocab_size));
    pieces_.push_back("<s>");
    pieces_.push_back("</s>");
    for (int b = 0; b < 256; ++b) pieces_.push_back(std::string(1, static_cast<char>(b)));
    std::unordered_set<std::string> seen;
    auto add = [&](std::string p) {
      if (static_cast<std::int64_t>(pieces_.size()) >= vocab_size) return;
      if (seen.insert(p).second) pieces_.push_back(std::move(p));
    };
    for (char c = 'a'; c <= 'z'; ++c) add(std::string(" ") + c);
    for (char a = 'a'; a <= 'z'; ++a) {
      for (char b = 'a'; b <= 'z'; ++b) add(std::string{a, b});
    }
    std::uint64_t state = 0x9E3779B97F4A7C15ull;
    auto next = [&state]() {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      return static_cast<std::uint32_t>(state >> 33);
    };
    static constexpr char kLetters[] = "etaoinshrdlcumwfgypbvkjxqz";
    while (static_cast<std::int64_t>(pieces_.size()) < vocab_size) {
      std::string p;
      if (next() % 2 == 0) p.push_back(' ');
      const std::size_t len = 3 + next() % 4;
      for (std::size_t i = 0; i < len; ++i) {
        // Skewed towards frequent letters: min of two draws.
        const std::uint32_t r = std::min(next() % 26, next() % 26);
        p.push_back(kLetters[r]);
      }
      add(std::move(p));
    }
    for (std::size_t id = kFirstPieceId; id < pieces_.size(); ++id) {
      index_.emplace(pieces_[id], static_cast<std::int32_t>(id));
    }
    chat_template_.kind = ChatTemplateKind::kChatMl;  // plain-text ChatML markers
  }

  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<std::int32_t> out;
    if (add_special_tokens) out.push_back(kBosId);
    std::size_t pos = 0;
    while (pos < text.size()) {
      std::int32_t id = -1;
      std::size_t len = std::min(kMaxPieceBytes, text.size() - pos);
      for (; len >= 2 && id < 0; --len) {
        auto it = index_.find(std::string(text.substr(pos, len)));
        if (it != index_.end()) {
          id = it->second;
          break;
        }
      }
      if (id < 0) {
        id = kFirstByteId + static_cast<unsigned char>(text[pos]);
        len = 1;
      }
      out.push_back(id);
      pos += len;
    }
    return out;
  }

  std::string decode(std::span<const std::int32_t> ids, bool skip_special_tokens) const override {
    std::string bytes;
    for (std::int32_t id : ids) {
      if (id < 0 || static_cast<std::size_t>(id) >= pieces_.size()) continue;
      if (skip_special_tokens && is_special(id)) continue;
      bytes += pieces_[static_cast<std::size_t>(id)];
    }
    return unicode::repair_utf8(bytes);
  }

  std::int64_t vocab_size() const override { return static_cast<std::int64_t>(pieces_.size()); }
  std::int32_t bos_token_id() const override { return kBosId; }
  std::int32_t eos_token_id() const override { return kEosId; }
  bool is_special(std::int32_t id) const override { return id == kBosId || id == kEosId; }
  StatusOr<std::string> apply_chat_template(const std::vector<ChatMessage>& messages,
                                            bool add_generation_prompt) const override {
    return render_chat_template(chat_template_, messages, add_generation_prompt);
  }

 private:
  std::vector<std::string> pieces_;
  std::unordered_map<std::string, std::int32_t> index_;
  ChatTemplate chat_template_;
};

}  // namespace

std::unique_ptr<Tokenizer> synthetic_tokenizer(std::int64_t vocab_size) {
  return std::make_unique<SyntheticTokenizer>(vocab_size);
}

TokenizerFiles synthetic_bpe_tokenizer_files(std::int64_t vocab_size) {
  using nlohmann::json;
  KUN_CHECK(vocab_size >= kFirstPieceId) << "a synthetic BPE vocabulary needs at least " << kFirstPieceId
                                         << " ids (2 special + 256 bytes), got " << vocab_size;
  KUN_CHECK(vocab_size <= (std::int64_t{1} << 24)) << "synthetic vocab_size too large: " << vocab_size;
  // Pieces as raw bytes; the files hold their ByteLevel texts.
  std::vector<std::string> pieces;
  pieces.reserve(static_cast<std::size_t>(vocab_size));
  for (int b = 0; b < 256; ++b) pieces.push_back(std::string(1, static_cast<char>(b)));
  std::unordered_set<std::string> seen(pieces.begin(), pieces.end());
  std::vector<std::pair<std::string, std::string>> merges;
  const auto room = [&] { return static_cast<std::int64_t>(pieces.size()) + 2 < vocab_size; };
  // A merge of two existing pieces: BPE needs both parts in the vocabulary before the result.
  const auto merge = [&](const std::string& left, const std::string& right) {
    if (!room()) return;
    std::string joined = left + right;
    if (!seen.insert(joined).second) return;
    merges.emplace_back(left, right);
    pieces.push_back(std::move(joined));
  };
  for (char c = 'a'; c <= 'z'; ++c) merge(" ", std::string(1, c));
  for (char a = 'a'; a <= 'z'; ++a) {
    for (char b = 'a'; b <= 'z'; ++b) merge(std::string(1, a), std::string(1, b));
  }
  // Longer pieces: an earlier piece of two or more bytes, extended by a letter or a letter pair
  // drawn with the same frequency skew as the greedy vocabulary, up to kMaxPieceBytes.
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  const auto next = [&state]() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<std::uint32_t>(state >> 33);
  };
  static constexpr char kLetters[] = "etaoinshrdlcumwfgypbvkjxqz";
  const std::size_t first_multi = 256;
  while (room()) {
    const std::size_t pick = first_multi + next() % (pieces.size() - first_multi);
    const std::string& left = pieces[pick];
    std::string right(1, kLetters[std::min(next() % 26, next() % 26)]);
    if (next() % 3 == 0) right.push_back(kLetters[std::min(next() % 26, next() % 26)]);
    if (left.size() + right.size() > kMaxPieceBytes) continue;
    merge(std::string(left), right);
  }

  json vocab = json::object();
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    vocab[byte_level_text(pieces[i])] = static_cast<std::int64_t>(i) + kFirstByteId;
  }
  json merge_list = json::array();
  for (const auto& [l, r] : merges) merge_list.push_back(json::array({byte_level_text(l), byte_level_text(r)}));
  const auto special = [](std::int32_t id, const char* text) {
    return json{{"id", id}, {"content", text}, {"single_word", false}, {"lstrip", false},
                {"rstrip", false}, {"normalized", false}, {"special", true}};
  };
  const json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  json tokenizer = {
      {"version", "1.0"},
      {"added_tokens", json::array({special(kBosId, "<s>"), special(kEosId, "</s>")})},
      {"normalizer", nullptr},
      {"pre_tokenizer", byte_level},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", json::array({json{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                json{{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
        {"pair", json::array({json{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                              json{{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                              json{{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", json::array({kBosId})}, {"tokens", json::array({"<s>"})}}}}}}},
      {"decoder", byte_level},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
        {"vocab", std::move(vocab)}, {"merges", std::move(merge_list)}}},
  };
  const json config = {
      {"bos_token", "<s>"},
      {"eos_token", "</s>"},
      {"add_bos_token", true},
      {"add_eos_token", false},
      {"chat_template",
       "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
       "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"},
  };
  return TokenizerFiles{tokenizer.dump(), config.dump()};
}

}  // namespace kun::model
