// HuggingFace tokenizer.json tokenizers (BPE model with the normalizers, pre-tokenizers,
// post-processors and decoders the Llama / Qwen / Mistral families use), the SentencePiece
// tokenizer.model reader, and the incremental detokenizer. See model/TOKENIZER.md.
//
// A loaded tokenizer is immutable: encode/decode may run concurrently from any thread.
#include "model/tokenizer.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <queue>
#include <sstream>
#include <tuple>
#include <unordered_map>
#include <utility>

#include <nlohmann/json.hpp>

#include "model/chat_template.h"
#include "model/tokenizer_nfc.h"
#include "model/tokenizer_regex.h"
#include "model/tokenizer_unicode.h"

namespace kun::model {
namespace {

using json = nlohmann::json;

constexpr std::string_view kMetaspaceMark = "\xE2\x96\x81";  // U+2581 '▁'
constexpr std::string_view kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// ---------------------------------------------------------------------------------------------
// GPT-2 byte <-> printable code point table (the ByteLevel pre-tokenizer and decoder).
struct ByteLevelTable {
  std::array<std::string, 256> byte_to_text;  // UTF-8 of the code point standing for each byte
  std::unordered_map<char32_t, unsigned char> char_to_byte;
  ByteLevelTable() {
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const char32_t cp = printable ? static_cast<char32_t>(b) : next++;
      unicode::append_utf8(byte_to_text[static_cast<std::size_t>(b)], cp);
      char_to_byte[cp] = static_cast<unsigned char>(b);
    }
  }
};
const ByteLevelTable& byte_level_table() {
  static const ByteLevelTable table;
  return table;
}

std::string byte_level_encode(std::string_view text) {
  const auto& t = byte_level_table();
  std::string out;
  out.reserve(text.size() * 2);
  for (char c : text) out += t.byte_to_text[static_cast<unsigned char>(c)];
  return out;
}

std::string byte_level_decode(std::string_view text) {
  const auto& t = byte_level_table();
  std::string out;
  out.reserve(text.size());
  std::size_t pos = 0;
  while (pos < text.size()) {
    const std::size_t start = pos;
    const char32_t cp = unicode::decode_one(text, pos);
    auto it = t.char_to_byte.find(cp);
    if (it != t.char_to_byte.end()) {
      out.push_back(static_cast<char>(it->second));
    } else {
      out.append(text.substr(start, pos - start));  // not a byte symbol: keep as is
    }
  }
  return out;
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  std::size_t pos = 0;
  for (;;) {
    const std::size_t hit = s.find(from, pos);
    if (hit == std::string::npos) break;
    out.append(s, pos, hit - pos);
    out.append(to);
    pos = hit + from.size();
  }
  if (pos == 0) return;
  out.append(s, pos, std::string::npos);
  s = std::move(out);
}

// Parses "<0xNN>" into the byte value.
std::optional<unsigned char> parse_byte_token(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return std::nullopt;
  int v = 0;
  for (int i = 3; i < 5; ++i) {
    const char c = piece[static_cast<std::size_t>(i)];
    int d = -1;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    if (d < 0) return std::nullopt;
    v = v * 16 + d;
  }
  return static_cast<unsigned char>(v);
}

// ---------------------------------------------------------------------------------------------
// Pipeline configuration.

struct AddedToken {
  std::int32_t id = -1;
  std::string content;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
};

struct NormalizerStep {
  enum class Kind { kPrepend, kReplace, kReplaceRegex, kNfc, kLowercase, kStrip } kind;
  std::string a;  // prepend text / replace pattern
  std::string b;  // replace content
  std::shared_ptr<TokenizerRegex> regex;
  bool left = false, right = false;
};

struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel, kMetaspace, kDigits, kWhitespaceSplit } kind;
  std::shared_ptr<TokenizerRegex> regex;  // kSplit (string patterns are compiled as literals)
  enum class Behavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext } behavior =
      Behavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // kByteLevel
  bool use_regex = true;          // kByteLevel
  std::string replacement;        // kMetaspace
  enum class Prepend { kAlways, kFirst, kNever } prepend = Prepend::kAlways;
  bool split = true;              // kMetaspace
  bool individual_digits = false;  // kDigits
};

struct DecoderStep {
  enum class Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
  std::string a, b;  // kReplace: pattern, content; kStrip: content; kMetaspace: replacement
  int start = 0, stop = 0;
  bool prepend = true;  // kMetaspace: strip the leading space of the first token
};

struct Piece {
  std::string text;
  bool at_start = false;  // begins at offset 0 of the encoded text
};

// ---------------------------------------------------------------------------------------------

class HfTokenizer final : public Tokenizer {
 public:
  // Model.
  std::unordered_map<std::string, std::int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<std::uint64_t, std::pair<std::int32_t, std::int32_t>> merges_;  // rank, id
  bool byte_fallback_ = false;
  std::array<std::int32_t, 256> byte_ids_{};
  std::int32_t unk_id_ = -1;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  // Pipeline.
  std::vector<AddedToken> added_;
  std::vector<bool> special_;  // by id
  std::vector<NormalizerStep> normalizers_;
  std::vector<PreTokenizerStep> pre_tokenizers_;
  std::vector<DecoderStep> decoders_;
  std::vector<std::int32_t> prefix_ids_, suffix_ids_;  // added by add_special_tokens
  std::int32_t bos_id_ = -1, eos_id_ = -1;
  ChatTemplate chat_template_;

  static std::uint64_t pair_key(std::int32_t a, std::int32_t b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) |
           static_cast<std::uint32_t>(b);
  }

  std::int32_t find_id(std::string_view token) const {
    for (const auto& t : added_) if (t.content == token) return t.id;
    auto it = vocab_.find(std::string(token));
    return it == vocab_.end() ? -1 : it->second;
  }

  void set_token(std::int32_t id, const std::string& text) {
    KUN_CHECK(id >= 0);
    if (static_cast<std::size_t>(id) >= id_to_token_.size()) {
      id_to_token_.resize(static_cast<std::size_t>(id) + 1);
      special_.resize(static_cast<std::size_t>(id) + 1, false);
    }
    id_to_token_[static_cast<std::size_t>(id)] = text;
  }

  void finish_setup() {
    special_.resize(id_to_token_.size(), false);
    for (const auto& t : added_) {
      set_token(t.id, t.content);
      special_[static_cast<std::size_t>(t.id)] = t.special;
    }
    byte_ids_.fill(-1);
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      auto it = vocab_.find(name);
      if (it != vocab_.end()) byte_ids_[static_cast<std::size_t>(b)] = it->second;
    }
    // Longest first, so that the first hit at a position is the longest one.
    std::stable_sort(added_.begin(), added_.end(), [](const AddedToken& x, const AddedToken& y) {
      return x.content.size() > y.content.size();
    });
  }

  // --- encoding ------------------------------------------------------------------------------

  std::string normalize(std::string text) const {
    for (const auto& n : normalizers_) {
      switch (n.kind) {
        case NormalizerStep::Kind::kPrepend:
          if (!text.empty()) text = n.a + text;
          break;
        case NormalizerStep::Kind::kReplace:
          replace_all(text, n.a, n.b);
          break;
        case NormalizerStep::Kind::kReplaceRegex: {
          const auto cps = unicode::decode_utf8(text);
          std::string out;
          std::size_t last = 0;
          for (auto [b, e] : n.regex->find_all(cps)) {
            out += unicode::encode_utf8({cps.begin() + static_cast<std::ptrdiff_t>(last),
                                         cps.begin() + static_cast<std::ptrdiff_t>(b)});
            out += n.b;
            last = e;
          }
          out += unicode::encode_utf8({cps.begin() + static_cast<std::ptrdiff_t>(last), cps.end()});
          text = std::move(out);
          break;
        }
        case NormalizerStep::Kind::kNfc:
          text = nfc(text);
          break;
        case NormalizerStep::Kind::kLowercase:
          for (char& c : text) if (c >= 'A' && c <= 'Z') c = static_cast<char>(c + ('a' - 'A'));
          break;
        case NormalizerStep::Kind::kStrip: {
          std::size_t b = 0, e = text.size();
          if (n.left) while (b < e && std::isspace(static_cast<unsigned char>(text[b]))) ++b;
          if (n.right) while (e > b && std::isspace(static_cast<unsigned char>(text[e - 1]))) --e;
          text = text.substr(b, e - b);
          break;
        }
      }
    }
    return text;
  }

  static std::string nfc(const std::string& text);

  static void split_by_regex(const Piece& piece, const PreTokenizerStep& step,
                             std::vector<Piece>& out) {
    const auto cps = unicode::decode_utf8(piece.text);
    auto matches = step.regex->find_all(cps);
    // (begin, end, is_match) segments covering the text.
    std::vector<std::tuple<std::size_t, std::size_t, bool>> segs;
    std::size_t last = 0;
    for (auto [b, e] : matches) {
      if (b > last) segs.emplace_back(last, b, false);
      segs.emplace_back(b, e, true);
      last = e;
    }
    if (last < cps.size()) segs.emplace_back(last, cps.size(), false);
    using B = PreTokenizerStep::Behavior;
    std::vector<std::pair<std::size_t, std::size_t>> ranges;
    for (std::size_t i = 0; i < segs.size(); ++i) {
      auto [b, e, is_match] = segs[i];
      const bool delim = is_match != step.invert;
      switch (step.behavior) {
        case B::kIsolated: ranges.emplace_back(b, e); break;
        case B::kRemoved: if (!delim) ranges.emplace_back(b, e); break;
        case B::kMergedWithPrevious:
          if (delim && !ranges.empty() && ranges.back().second == b) ranges.back().second = e;
          else ranges.emplace_back(b, e);
          break;
        case B::kMergedWithNext:
          if (!ranges.empty() && ranges.back().second == b && i > 0 &&
              (std::get<2>(segs[i - 1]) != step.invert)) {
            ranges.back().second = e;
          } else {
            ranges.emplace_back(b, e);
          }
          break;
      }
    }
    for (auto [b, e] : ranges) {
      if (e <= b) continue;
      out.push_back(Piece{unicode::encode_utf8({cps.begin() + static_cast<std::ptrdiff_t>(b),
                                                cps.begin() + static_cast<std::ptrdiff_t>(e)}),
                          piece.at_start && b == 0});
    }
  }

  std::vector<Piece> pre_tokenize(Piece whole) const {
    std::vector<Piece> pieces;
    pieces.push_back(std::move(whole));
    for (const auto& step : pre_tokenizers_) {
      std::vector<Piece> next;
      for (auto& p : pieces) {
        switch (step.kind) {
          case PreTokenizerStep::Kind::kSplit:
          case PreTokenizerStep::Kind::kDigits:
          case PreTokenizerStep::Kind::kWhitespaceSplit:
            split_by_regex(p, step, next);
            break;
          case PreTokenizerStep::Kind::kByteLevel: {
            Piece q = p;
            if (step.add_prefix_space && (q.text.empty() || q.text[0] != ' ')) {
              q.text = " " + q.text;
            }
            std::vector<Piece> parts;
            if (step.use_regex) split_by_regex(q, step, parts);
            else parts.push_back(std::move(q));
            for (auto& part : parts) next.push_back(Piece{byte_level_encode(part.text), part.at_start});
            break;
          }
          case PreTokenizerStep::Kind::kMetaspace: {
            Piece q = p;
            replace_all(q.text, " ", step.replacement);
            const bool prepend =
                step.prepend == PreTokenizerStep::Prepend::kAlways ||
                (step.prepend == PreTokenizerStep::Prepend::kFirst && q.at_start);
            if (prepend && q.text.compare(0, step.replacement.size(), step.replacement) != 0) {
              q.text = step.replacement + q.text;
            }
            if (!step.split) {
              next.push_back(std::move(q));
              break;
            }
            // Split before every replacement character, which stays with what follows it.
            std::size_t start = 0;
            for (;;) {
              const std::size_t hit = q.text.find(step.replacement, start + 1);
              if (hit == std::string::npos || start >= q.text.size()) break;
              next.push_back(Piece{q.text.substr(start, hit - start), q.at_start && start == 0});
              start = hit;
            }
            if (start < q.text.size()) {
              next.push_back(Piece{q.text.substr(start), q.at_start && start == 0});
            }
            break;
          }
        }
      }
      pieces = std::move(next);
    }
    return pieces;
  }

  void bpe_word(std::string_view word, std::vector<std::int32_t>& out) const {
    if (word.empty()) return;
    if (ignore_merges_) {
      auto it = vocab_.find(std::string(word));
      if (it != vocab_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    std::vector<std::int32_t> ids;
    std::size_t pos = 0;
    bool last_unk = false;
    while (pos < word.size()) {
      const std::size_t start = pos;
      unicode::decode_one(word, pos);
      const std::string ch(word.substr(start, pos - start));
      auto it = vocab_.find(ch);
      if (it != vocab_.end()) {
        ids.push_back(it->second);
        last_unk = false;
        continue;
      }
      if (byte_fallback_) {
        bool all = true;
        for (char c : ch) all = all && byte_ids_[static_cast<unsigned char>(c)] >= 0;
        if (all) {
          for (char c : ch) ids.push_back(byte_ids_[static_cast<unsigned char>(c)]);
          last_unk = false;
          continue;
        }
      }
      if (unk_id_ >= 0 && !(fuse_unk_ && last_unk)) ids.push_back(unk_id_);
      last_unk = unk_id_ >= 0;
    }
    if (ids.size() > 1 && !merges_.empty()) merge(ids);
    out.insert(out.end(), ids.begin(), ids.end());
  }

  void merge(std::vector<std::int32_t>& ids) const {
    const int n = static_cast<int>(ids.size());
    std::vector<int> prev(static_cast<std::size_t>(n)), next(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      prev[static_cast<std::size_t>(i)] = i - 1;
      next[static_cast<std::size_t>(i)] = i + 1 < n ? i + 1 : -1;
    }
    struct Cand {
      std::int32_t rank;
      int left;
      std::int32_t left_id, right_id;
      bool operator>(const Cand& o) const {
        return rank != o.rank ? rank > o.rank : left > o.left;
      }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](int left) {
      if (left < 0) return;
      const int right = next[static_cast<std::size_t>(left)];
      if (right < 0) return;
      const auto a = ids[static_cast<std::size_t>(left)], b = ids[static_cast<std::size_t>(right)];
      auto it = merges_.find(pair_key(a, b));
      if (it != merges_.end()) heap.push(Cand{it->second.first, left, a, b});
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    std::vector<bool> dead(static_cast<std::size_t>(n), false);
    while (!heap.empty()) {
      const Cand c = heap.top();
      heap.pop();
      const auto l = static_cast<std::size_t>(c.left);
      if (dead[l] || ids[l] != c.left_id) continue;
      const int r = next[l];
      if (r < 0 || ids[static_cast<std::size_t>(r)] != c.right_id) continue;
      ids[l] = merges_.at(pair_key(c.left_id, c.right_id)).second;
      dead[static_cast<std::size_t>(r)] = true;
      next[l] = next[static_cast<std::size_t>(r)];
      if (next[l] >= 0) prev[static_cast<std::size_t>(next[l])] = c.left;
      push(prev[l]);
      push(c.left);
    }
    std::vector<std::int32_t> merged;
    for (int i = 0; i >= 0; i = next[static_cast<std::size_t>(i)]) {
      merged.push_back(ids[static_cast<std::size_t>(i)]);
    }
    ids = std::move(merged);
  }

  static bool is_word_char(char32_t cp) {
    return cp == '_' || unicode::is_letter(cp) || unicode::is_number(cp);
  }

  // Splits text at added tokens: (text segment, -1) or ("", token id).
  struct Segment {
    std::size_t begin, end;
    std::int32_t id;  // -1: plain text [begin, end)
  };
  std::vector<Segment> split_added(std::string_view text) const {
    std::vector<Segment> segs;
    std::size_t plain_begin = 0;
    std::size_t pos = 0;
    while (pos < text.size()) {
      const AddedToken* hit = nullptr;
      for (const auto& t : added_) {
        if (t.content.empty() || text.compare(pos, t.content.size(), t.content) != 0) continue;
        if (t.single_word) {
          std::size_t p = pos;
          bool ok = true;
          if (pos > 0) {
            std::size_t q = pos - 1;
            while (q > 0 && (static_cast<unsigned char>(text[q]) & 0xC0) == 0x80) --q;
            std::size_t tmp = q;
            ok = !is_word_char(unicode::decode_one(text, tmp));
          }
          p = pos + t.content.size();
          if (ok && p < text.size()) {
            std::size_t tmp = p;
            ok = !is_word_char(unicode::decode_one(text, tmp));
          }
          if (!ok) continue;
        }
        hit = &t;
        break;
      }
      if (hit == nullptr) {
        std::size_t p = pos;
        unicode::decode_one(text, p);
        pos = p;
        continue;
      }
      std::size_t b = pos, e = pos + hit->content.size();
      if (hit->lstrip) {
        while (b > plain_begin && unicode::is_white_space(static_cast<unsigned char>(text[b - 1]))) --b;
      }
      if (hit->rstrip) {
        while (e < text.size() && unicode::is_white_space(static_cast<unsigned char>(text[e]))) ++e;
      }
      if (b > plain_begin) segs.push_back(Segment{plain_begin, b, -1});
      segs.push_back(Segment{b, e, hit->id});
      plain_begin = pos = e;
    }
    if (plain_begin < text.size()) segs.push_back(Segment{plain_begin, text.size(), -1});
    return segs;
  }

  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<std::int32_t> out;
    if (add_special_tokens) out = prefix_ids_;
    for (const auto& seg : split_added(text)) {
      if (seg.id >= 0) {
        out.push_back(seg.id);
        continue;
      }
      Piece whole{normalize(std::string(text.substr(seg.begin, seg.end - seg.begin))),
                  seg.begin == 0};
      for (const auto& p : pre_tokenize(std::move(whole))) bpe_word(p.text, out);
    }
    if (add_special_tokens) out.insert(out.end(), suffix_ids_.begin(), suffix_ids_.end());
    return out;
  }

  // --- decoding ------------------------------------------------------------------------------

  // Raw bytes of the decoded text (may be ill-formed UTF-8 when cut inside a character).
  std::string decode_bytes(std::span<const std::int32_t> ids, bool skip_special_tokens) const {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (std::int32_t id : ids) {
      if (id < 0 || static_cast<std::size_t>(id) >= id_to_token_.size()) continue;
      if (skip_special_tokens && special_[static_cast<std::size_t>(id)]) continue;
      tokens.push_back(id_to_token_[static_cast<std::size_t>(id)]);
    }
    for (const auto& d : decoders_) {
      switch (d.kind) {
        case DecoderStep::Kind::kByteLevel: {
          std::string all;
          for (const auto& t : tokens) all += t;
          tokens.assign(1, byte_level_decode(all));
          break;
        }
        case DecoderStep::Kind::kReplace:
          for (auto& t : tokens) replace_all(t, d.a, d.b);
          break;
        case DecoderStep::Kind::kByteFallback: {
          std::vector<std::string> next;
          std::string bytes;
          bool in_bytes = false;
          for (auto& t : tokens) {
            auto b = parse_byte_token(t);
            if (b) {
              if (!in_bytes) bytes.clear();
              bytes.push_back(static_cast<char>(*b));
              in_bytes = true;
              continue;
            }
            if (in_bytes) next.push_back(bytes);
            in_bytes = false;
            next.push_back(std::move(t));
          }
          if (in_bytes) next.push_back(bytes);
          tokens = std::move(next);
          break;
        }
        case DecoderStep::Kind::kFuse: {
          std::string all;
          for (const auto& t : tokens) all += t;
          tokens.assign(1, std::move(all));
          break;
        }
        case DecoderStep::Kind::kStrip:
          for (auto& t : tokens) {
            int s = d.start;
            std::size_t b = 0, e = t.size();
            while (s-- > 0 && b < e && t.compare(b, d.a.size(), d.a) == 0) b += d.a.size();
            int r = d.stop;
            while (r-- > 0 && e >= b + d.a.size() && t.compare(e - d.a.size(), d.a.size(), d.a) == 0) {
              e -= d.a.size();
            }
            t = t.substr(b, e - b);
          }
          break;
        case DecoderStep::Kind::kMetaspace:
          for (std::size_t i = 0; i < tokens.size(); ++i) {
            replace_all(tokens[i], d.a, " ");
            if (i == 0 && d.prepend && !tokens[i].empty() && tokens[i][0] == ' ') {
              tokens[i].erase(0, 1);
            }
          }
          break;
      }
    }
    std::string out;
    for (const auto& t : tokens) out += t;
    return out;
  }

  std::string decode(std::span<const std::int32_t> ids, bool skip_special_tokens) const override {
    return unicode::repair_utf8(decode_bytes(ids, skip_special_tokens));
  }

  std::int64_t vocab_size() const override {
    return static_cast<std::int64_t>(id_to_token_.size());
  }
  std::int32_t bos_token_id() const override { return bos_id_; }
  std::int32_t eos_token_id() const override { return eos_id_; }
  bool is_special(std::int32_t id) const override {
    return id >= 0 && static_cast<std::size_t>(id) < special_.size() &&
           special_[static_cast<std::size_t>(id)];
  }
  StatusOr<std::string> apply_chat_template(const std::vector<ChatMessage>& messages,
                                            bool add_generation_prompt) const override {
    return render_chat_template(chat_template_, messages, add_generation_prompt);
  }
};

// ---------------------------------------------------------------------------------------------
// tokenizer.json parsing. Every error names the file and the field.

class JsonReader {
 public:
  explicit JsonReader(std::string source) : source_(std::move(source)) {}

  Status error(std::string_view field, std::string_view what) const {
    return invalid_argument(source_ + ": field '" + std::string(field) + "': " + std::string(what));
  }
  Status unsupported(std::string_view field, std::string_view what) const {
    return unimplemented(source_ + ": field '" + std::string(field) + "': " + std::string(what));
  }

  StatusOr<std::string> string_field(const json& j, const char* key, std::string_view path) const {
    auto it = j.find(key);
    if (it == j.end() || !it->is_string()) return error(path, "expected a string");
    return it->get<std::string>();
  }
  static bool bool_or(const json& j, const char* key, bool fallback) {
    auto it = j.find(key);
    return it != j.end() && it->is_boolean() ? it->get<bool>() : fallback;
  }
  static std::string string_or(const json& j, const char* key, std::string fallback) {
    auto it = j.find(key);
    return it != j.end() && it->is_string() ? it->get<std::string>() : fallback;
  }
  static int int_or(const json& j, const char* key, int fallback) {
    auto it = j.find(key);
    return it != j.end() && it->is_number_integer() ? it->get<int>() : fallback;
  }

  // A "pattern": {"String": s} or {"Regex": r}. Compiles the regex form, or a literal for
  // string patterns when `compile_literal`.
  Status pattern(const json& j, std::string_view path, std::string* literal,
                 std::shared_ptr<TokenizerRegex>* regex, bool compile_literal) const {
    auto it = j.find("pattern");
    if (it == j.end() || !it->is_object()) return error(path, "expected a pattern object");
    if (auto s = it->find("String"); s != it->end() && s->is_string()) {
      *literal = s->get<std::string>();
      if (compile_literal) {
        std::string escaped;
        for (char c : *literal) {
          if (std::strchr("\\^$.|?*+()[]{}", c) != nullptr && c != '\0') escaped.push_back('\\');
          escaped.push_back(c);
        }
        auto re = TokenizerRegex::compile(escaped);
        if (!re.ok()) return error(path, re.status().message());
        *regex = std::make_shared<TokenizerRegex>(std::move(re).value());
      }
      return ok_status();
    }
    if (auto r = it->find("Regex"); r != it->end() && r->is_string()) {
      auto re = TokenizerRegex::compile(r->get<std::string>());
      if (!re.ok()) return error(path, re.status().message());
      *regex = std::make_shared<TokenizerRegex>(std::move(re).value());
      return ok_status();
    }
    return error(path, "pattern needs a String or Regex");
  }

  Status normalizer(const json& j, std::string path, HfTokenizer& t) const {
    if (j.is_null()) return ok_status();
    if (!j.is_object()) return error(path, "expected an object");
    KUN_ASSIGN_OR_RETURN(std::string type, string_field(j, "type", path + ".type"));
    NormalizerStep step{};
    if (type == "Sequence") {
      auto it = j.find("normalizers");
      if (it == j.end() || !it->is_array()) return error(path + ".normalizers", "expected an array");
      for (std::size_t i = 0; i < it->size(); ++i) {
        KUN_RETURN_IF_ERROR(normalizer((*it)[i], path + ".normalizers[" + std::to_string(i) + "]", t));
      }
      return ok_status();
    } else if (type == "Prepend") {
      step.kind = NormalizerStep::Kind::kPrepend;
      KUN_ASSIGN_OR_RETURN(step.a, string_field(j, "prepend", path + ".prepend"));
    } else if (type == "Replace") {
      KUN_RETURN_IF_ERROR(pattern(j, path + ".pattern", &step.a, &step.regex, false));
      step.kind = step.regex ? NormalizerStep::Kind::kReplaceRegex : NormalizerStep::Kind::kReplace;
      KUN_ASSIGN_OR_RETURN(step.b, string_field(j, "content", path + ".content"));
    } else if (type == "NFC") {
      step.kind = NormalizerStep::Kind::kNfc;
    } else if (type == "Lowercase") {
      step.kind = NormalizerStep::Kind::kLowercase;
    } else if (type == "Strip") {
      step.kind = NormalizerStep::Kind::kStrip;
      step.left = bool_or(j, "strip_left", true);
      step.right = bool_or(j, "strip_right", true);
    } else {
      return unsupported(path + ".type", "normalizer '" + type + "' is not supported");
    }
    t.normalizers_.push_back(std::move(step));
    return ok_status();
  }

  Status pre_tokenizer(const json& j, std::string path, HfTokenizer& t) const {
    if (j.is_null()) return ok_status();
    if (!j.is_object()) return error(path, "expected an object");
    KUN_ASSIGN_OR_RETURN(std::string type, string_field(j, "type", path + ".type"));
    PreTokenizerStep step{};
    if (type == "Sequence") {
      auto it = j.find("pretokenizers");
      if (it == j.end() || !it->is_array()) return error(path + ".pretokenizers", "expected an array");
      for (std::size_t i = 0; i < it->size(); ++i) {
        KUN_RETURN_IF_ERROR(
            pre_tokenizer((*it)[i], path + ".pretokenizers[" + std::to_string(i) + "]", t));
      }
      return ok_status();
    } else if (type == "Split") {
      step.kind = PreTokenizerStep::Kind::kSplit;
      std::string literal;
      KUN_RETURN_IF_ERROR(pattern(j, path + ".pattern", &literal, &step.regex, true));
      const std::string behavior = string_or(j, "behavior", "Isolated");
      using B = PreTokenizerStep::Behavior;
      if (behavior == "Isolated") step.behavior = B::kIsolated;
      else if (behavior == "Removed") step.behavior = B::kRemoved;
      else if (behavior == "MergedWithPrevious") step.behavior = B::kMergedWithPrevious;
      else if (behavior == "MergedWithNext") step.behavior = B::kMergedWithNext;
      else return unsupported(path + ".behavior", "split behavior '" + behavior + "' is not supported");
      step.invert = bool_or(j, "invert", false);
    } else if (type == "ByteLevel") {
      step.kind = PreTokenizerStep::Kind::kByteLevel;
      step.add_prefix_space = bool_or(j, "add_prefix_space", true);
      step.use_regex = bool_or(j, "use_regex", true);
      if (step.use_regex) {
        auto re = TokenizerRegex::compile(kGpt2Pattern);
        KUN_CHECK(re.ok()) << re.status().to_string();
        step.regex = std::make_shared<TokenizerRegex>(std::move(re).value());
      }
    } else if (type == "Metaspace") {
      step.kind = PreTokenizerStep::Kind::kMetaspace;
      step.replacement = string_or(j, "replacement", std::string(kMetaspaceMark));
      const std::string scheme =
          string_or(j, "prepend_scheme", bool_or(j, "add_prefix_space", true) ? "always" : "never");
      if (scheme == "always") step.prepend = PreTokenizerStep::Prepend::kAlways;
      else if (scheme == "first") step.prepend = PreTokenizerStep::Prepend::kFirst;
      else if (scheme == "never") step.prepend = PreTokenizerStep::Prepend::kNever;
      else return error(path + ".prepend_scheme", "unknown scheme '" + scheme + "'");
      step.split = bool_or(j, "split", true);
    } else if (type == "Digits") {
      step.kind = PreTokenizerStep::Kind::kDigits;
      step.individual_digits = bool_or(j, "individual_digits", false);
      auto re = TokenizerRegex::compile(step.individual_digits ? "\\p{N}" : "\\p{N}+");
      KUN_CHECK(re.ok());
      step.regex = std::make_shared<TokenizerRegex>(std::move(re).value());
    } else if (type == "WhitespaceSplit") {
      step.kind = PreTokenizerStep::Kind::kWhitespaceSplit;
      auto re = TokenizerRegex::compile("\\s+");
      KUN_CHECK(re.ok());
      step.regex = std::make_shared<TokenizerRegex>(std::move(re).value());
      step.behavior = PreTokenizerStep::Behavior::kRemoved;
    } else {
      return unsupported(path + ".type", "pre-tokenizer '" + type + "' is not supported");
    }
    t.pre_tokenizers_.push_back(std::move(step));
    return ok_status();
  }

  Status decoder(const json& j, std::string path, HfTokenizer& t) const {
    if (j.is_null()) return ok_status();
    if (!j.is_object()) return error(path, "expected an object");
    KUN_ASSIGN_OR_RETURN(std::string type, string_field(j, "type", path + ".type"));
    DecoderStep step{};
    if (type == "Sequence") {
      auto it = j.find("decoders");
      if (it == j.end() || !it->is_array()) return error(path + ".decoders", "expected an array");
      for (std::size_t i = 0; i < it->size(); ++i) {
        KUN_RETURN_IF_ERROR(decoder((*it)[i], path + ".decoders[" + std::to_string(i) + "]", t));
      }
      return ok_status();
    } else if (type == "ByteLevel") {
      step.kind = DecoderStep::Kind::kByteLevel;
    } else if (type == "Replace") {
      step.kind = DecoderStep::Kind::kReplace;
      std::shared_ptr<TokenizerRegex> regex;
      KUN_RETURN_IF_ERROR(pattern(j, path + ".pattern", &step.a, &regex, false));
      if (regex) return unsupported(path + ".pattern", "regex Replace decoders are not supported");
      KUN_ASSIGN_OR_RETURN(step.b, string_field(j, "content", path + ".content"));
    } else if (type == "ByteFallback") {
      step.kind = DecoderStep::Kind::kByteFallback;
    } else if (type == "Fuse") {
      step.kind = DecoderStep::Kind::kFuse;
    } else if (type == "Strip") {
      step.kind = DecoderStep::Kind::kStrip;
      KUN_ASSIGN_OR_RETURN(step.a, string_field(j, "content", path + ".content"));
      step.start = int_or(j, "start", 0);
      step.stop = int_or(j, "stop", 0);
    } else if (type == "Metaspace") {
      step.kind = DecoderStep::Kind::kMetaspace;
      step.a = string_or(j, "replacement", std::string(kMetaspaceMark));
      const std::string scheme =
          string_or(j, "prepend_scheme", bool_or(j, "add_prefix_space", true) ? "always" : "never");
      step.prepend = scheme != "never";
    } else {
      return unsupported(path + ".type", "decoder '" + type + "' is not supported");
    }
    t.decoders_.push_back(std::move(step));
    return ok_status();
  }

  Status post_processor(const json& j, std::string path, HfTokenizer& t, bool* handled) const {
    if (j.is_null()) return ok_status();
    if (!j.is_object()) return error(path, "expected an object");
    KUN_ASSIGN_OR_RETURN(std::string type, string_field(j, "type", path + ".type"));
    if (type == "ByteLevel") return ok_status();  // offsets only
    if (type == "Sequence") {
      auto it = j.find("processors");
      if (it == j.end() || !it->is_array()) return error(path + ".processors", "expected an array");
      for (std::size_t i = 0; i < it->size(); ++i) {
        KUN_RETURN_IF_ERROR(post_processor((*it)[i], path + ".processors[" + std::to_string(i) + "]",
                                           t, handled));
      }
      return ok_status();
    }
    if (type != "TemplateProcessing") {
      return unsupported(path + ".type", "post-processor '" + type + "' is not supported");
    }
    *handled = true;
    auto single = j.find("single");
    if (single == j.end() || !single->is_array()) return error(path + ".single", "expected an array");
    auto specials = j.find("special_tokens");
    bool seen_sequence = false;
    for (std::size_t i = 0; i < single->size(); ++i) {
      const json& item = (*single)[i];
      const std::string ipath = path + ".single[" + std::to_string(i) + "]";
      if (item.contains("Sequence")) {
        seen_sequence = true;
        continue;
      }
      auto st = item.find("SpecialToken");
      if (st == item.end() || !st->is_object()) return error(ipath, "expected Sequence or SpecialToken");
      KUN_ASSIGN_OR_RETURN(std::string name, string_field(*st, "id", ipath + ".SpecialToken.id"));
      std::vector<std::int32_t> ids;
      if (specials != j.end() && specials->is_object() && specials->contains(name)) {
        const json& entry = (*specials)[name];
        auto idsj = entry.find("ids");
        if (idsj == entry.end() || !idsj->is_array()) {
          return error(path + ".special_tokens." + name + ".ids", "expected an array");
        }
        for (const auto& v : *idsj) {
          if (!v.is_number_integer()) return error(path + ".special_tokens." + name + ".ids", "expected integers");
          ids.push_back(v.get<std::int32_t>());
        }
      } else {
        const std::int32_t id = t.find_id(name);
        if (id < 0) return error(ipath, "unknown special token '" + name + "'");
        ids.push_back(id);
      }
      auto& dst = seen_sequence ? t.suffix_ids_ : t.prefix_ids_;
      dst.insert(dst.end(), ids.begin(), ids.end());
    }
    return ok_status();
  }

  Status model(const json& j, HfTokenizer& t) const {
    if (!j.is_object()) return error("model", "expected an object");
    const std::string type = string_or(j, "type", "BPE");
    if (type != "BPE") return unsupported("model.type", "model '" + type + "' is not supported (BPE only)");
    auto vocab = j.find("vocab");
    if (vocab == j.end() || !vocab->is_object()) return error("model.vocab", "expected an object");
    t.vocab_.reserve(vocab->size());
    for (auto it = vocab->begin(); it != vocab->end(); ++it) {
      if (!it.value().is_number_integer() || it.value().get<std::int64_t>() < 0 ||
          it.value().get<std::int64_t>() > (1 << 30)) {
        return error("model.vocab." + it.key(), "expected a non-negative integer id");
      }
      const auto id = it.value().get<std::int32_t>();
      t.vocab_.emplace(it.key(), id);
      t.set_token(id, it.key());
    }
    if (auto s = j.find("continuing_subword_prefix"); s != j.end() && s->is_string() && !s->get<std::string>().empty()) {
      return unsupported("model.continuing_subword_prefix", "not supported");
    }
    if (auto s = j.find("end_of_word_suffix"); s != j.end() && s->is_string() && !s->get<std::string>().empty()) {
      return unsupported("model.end_of_word_suffix", "not supported");
    }
    t.byte_fallback_ = bool_or(j, "byte_fallback", false);
    t.fuse_unk_ = bool_or(j, "fuse_unk", false);
    t.ignore_merges_ = bool_or(j, "ignore_merges", false);
    if (auto unk = j.find("unk_token"); unk != j.end() && unk->is_string()) {
      auto it = t.vocab_.find(unk->get<std::string>());
      if (it != t.vocab_.end()) t.unk_id_ = it->second;
    }
    auto merges = j.find("merges");
    if (merges == j.end() || !merges->is_array()) return error("model.merges", "expected an array");
    t.merges_.reserve(merges->size());
    for (std::size_t rank = 0; rank < merges->size(); ++rank) {
      const json& m = (*merges)[rank];
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const std::size_t sp = s.find(' ', 1);
        if (sp == std::string::npos) return error("model.merges[" + std::to_string(rank) + "]", "expected 'a b'");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        return error("model.merges[" + std::to_string(rank) + "]", "expected 'a b' or [a, b]");
      }
      auto ia = t.vocab_.find(a), ib = t.vocab_.find(b), im = t.vocab_.find(a + b);
      if (ia == t.vocab_.end() || ib == t.vocab_.end() || im == t.vocab_.end()) {
        return error("model.merges[" + std::to_string(rank) + "]",
                     "merge '" + a + " " + b + "' uses a token missing from the vocab");
      }
      t.merges_.emplace(HfTokenizer::pair_key(ia->second, ib->second),
                        std::make_pair(static_cast<std::int32_t>(rank), im->second));
    }
    return ok_status();
  }

 private:
  std::string source_;
};

// tokenizer_config.json: special token names may be strings or {"content": ...} objects.
std::string config_token(const json& config, const char* key) {
  auto it = config.find(key);
  if (it == config.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) return JsonReader::string_or(*it, "content", "");
  return "";
}

// Settles BOS/EOS and the chat template from tokenizer_config.json (may be empty).
Status apply_config(std::string_view config_text, const std::string& source, HfTokenizer& t,
                    bool post_processor_handled, bool default_add_bos) {
  json config = json::object();
  if (!config_text.empty()) {
    config = json::parse(config_text.begin(), config_text.end(), nullptr, false);
    if (config.is_discarded() || !config.is_object()) {
      return invalid_argument(source + ": tokenizer_config.json is not a JSON object");
    }
  }
  std::string bos = config_token(config, "bos_token");
  std::string eos = config_token(config, "eos_token");
  // Without a config, guess from the vocabulary.
  if (bos.empty()) {
    for (const char* name : {"<|begin_of_text|>", "<s>"}) {
      if (t.find_id(name) >= 0) { bos = name; break; }
    }
  }
  if (eos.empty()) {
    for (const char* name : {"<|end_of_text|>", "<|endoftext|>", "</s>"}) {
      if (t.find_id(name) >= 0) { eos = name; break; }
    }
  }
  t.bos_id_ = bos.empty() ? -1 : t.find_id(bos);
  t.eos_id_ = eos.empty() ? -1 : t.find_id(eos);
  if (!post_processor_handled) {
    if (JsonReader::bool_or(config, "add_bos_token", default_add_bos) && t.bos_id_ >= 0) {
      t.prefix_ids_ = {t.bos_id_};
    }
    if (JsonReader::bool_or(config, "add_eos_token", false) && t.eos_id_ >= 0) t.suffix_ids_ = {t.eos_id_};
  }
  std::string template_text;
  if (auto it = config.find("chat_template"); it != config.end()) {
    if (it->is_string()) {
      template_text = it->get<std::string>();
    } else if (it->is_array()) {  // [{"name": "default", "template": ...}, ...]
      for (const auto& e : *it) {
        if (e.is_object() && JsonReader::string_or(e, "name", "") == "default") {
          template_text = JsonReader::string_or(e, "template", "");
        }
      }
    }
  }
  ChatTemplate& ct = t.chat_template_;
  ct.bos_token = bos;
  ct.eos_token = eos;
  ct.kind = detect_chat_template_kind(template_text);
  if (ct.kind == ChatTemplateKind::kNone && template_text.empty()) {
    if (t.find_id("<|start_header_id|>") >= 0) ct.kind = ChatTemplateKind::kLlama3;
    else if (t.find_id("<|im_start|>") >= 0) ct.kind = ChatTemplateKind::kChatMl;
    else if (bos == "<s>" && eos == "</s>") ct.kind = ChatTemplateKind::kLlama2;
  }
  if (ct.kind == ChatTemplateKind::kChatMl) {
    for (const char* prompt : {"You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                               "You are a helpful assistant."}) {
      if (template_text.find(prompt) != std::string::npos) {
        ct.default_system = prompt;
        break;
      }
    }
  }
  return ok_status();
}

StatusOr<std::unique_ptr<Tokenizer>> build_from_json(std::string_view text,
                                                     std::string_view config_text,
                                                     const std::string& source) {
  json j = json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded()) return invalid_argument(source + ": not valid JSON");
  if (!j.is_object()) return invalid_argument(source + ": expected a JSON object");
  auto t = std::make_unique<HfTokenizer>();
  JsonReader r(source);
  auto model = j.find("model");
  if (model == j.end()) return r.error("model", "missing");
  KUN_RETURN_IF_ERROR(r.model(*model, *t));
  if (auto added = j.find("added_tokens"); added != j.end() && !added->is_null()) {
    if (!added->is_array()) return r.error("added_tokens", "expected an array");
    for (std::size_t i = 0; i < added->size(); ++i) {
      const json& a = (*added)[i];
      const std::string path = "added_tokens[" + std::to_string(i) + "]";
      if (!a.is_object()) return r.error(path, "expected an object");
      AddedToken tok;
      auto id = a.find("id");
      if (id == a.end() || !id->is_number_integer() || id->get<std::int64_t>() < 0 ||
          id->get<std::int64_t>() > (1 << 30)) {
        return r.error(path + ".id", "expected a non-negative integer");
      }
      tok.id = id->get<std::int32_t>();
      KUN_ASSIGN_OR_RETURN(tok.content, r.string_field(a, "content", path + ".content"));
      tok.special = JsonReader::bool_or(a, "special", false);
      tok.lstrip = JsonReader::bool_or(a, "lstrip", false);
      tok.rstrip = JsonReader::bool_or(a, "rstrip", false);
      tok.single_word = JsonReader::bool_or(a, "single_word", false);
      t->added_.push_back(std::move(tok));
    }
  }
  const json null_json;
  auto field = [&](const char* key) -> const json& {
    auto it = j.find(key);
    return it == j.end() ? null_json : *it;
  };
  KUN_RETURN_IF_ERROR(r.normalizer(field("normalizer"), "normalizer", *t));
  KUN_RETURN_IF_ERROR(r.pre_tokenizer(field("pre_tokenizer"), "pre_tokenizer", *t));
  KUN_RETURN_IF_ERROR(r.decoder(field("decoder"), "decoder", *t));
  t->finish_setup();
  bool handled = false;
  KUN_RETURN_IF_ERROR(r.post_processor(field("post_processor"), "post_processor", *t, &handled));
  KUN_RETURN_IF_ERROR(apply_config(config_text, source, *t, handled, false));
  if (t->vocab_size() == 0) return r.error("model.vocab", "empty vocabulary");
  return std::unique_ptr<Tokenizer>(std::move(t));
}

// ---------------------------------------------------------------------------------------------
// SentencePiece tokenizer.model: protobuf ModelProto, read by hand.
//   ModelProto { repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2;
//                NormalizerSpec normalizer_spec = 3; }
//   SentencePiece { string piece = 1; float score = 2; Type type = 3; }
//     Type: NORMAL=1 UNKNOWN=2 CONTROL=3 USER_DEFINED=4 UNUSED=5 BYTE=6
//   TrainerSpec { ModelType model_type = 3 (UNIGRAM=1 BPE=2); bool byte_fallback = 35;
//                 int32 unk_id = 40, bos_id = 41, eos_id = 42; }
//   NormalizerSpec { bool add_dummy_prefix = 3; bool remove_extra_whitespaces = 4; }

class ProtoReader {
 public:
  explicit ProtoReader(std::string_view data) : data_(data) {}
  bool done() const { return pos_ >= data_.size(); }
  bool varint(std::uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= data_.size()) return false;
      const auto b = static_cast<unsigned char>(data_[pos_++]);
      *v |= static_cast<std::uint64_t>(b & 0x7F) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }
  // Reads the next field: number, wire type, and its payload (varint value or bytes).
  bool field(int* number, int* wire, std::uint64_t* value, std::string_view* bytes) {
    std::uint64_t key = 0;
    if (!varint(&key)) return false;
    *number = static_cast<int>(key >> 3);
    *wire = static_cast<int>(key & 7);
    switch (*wire) {
      case 0: return varint(value);
      case 1:
        if (data_.size() - pos_ < 8) return false;
        std::memcpy(value, data_.data() + pos_, 8);
        pos_ += 8;
        return true;
      case 2: {
        std::uint64_t len = 0;
        if (!varint(&len) || len > data_.size() - pos_) return false;
        *bytes = data_.substr(pos_, static_cast<std::size_t>(len));
        pos_ += static_cast<std::size_t>(len);
        return true;
      }
      case 5: {
        if (data_.size() - pos_ < 4) return false;
        std::uint32_t v = 0;
        std::memcpy(&v, data_.data() + pos_, 4);
        *value = v;
        pos_ += 4;
        return true;
      }
      default: return false;
    }
  }

 private:
  std::string_view data_;
  std::size_t pos_ = 0;
};

StatusOr<std::unique_ptr<Tokenizer>> build_from_sentencepiece(std::string_view data,
                                                              std::string_view config_text,
                                                              const std::string& source) {
  struct SpPiece {
    std::string text;
    float score = 0;
    int type = 1;
  };
  std::vector<SpPiece> pieces;
  int model_type = 1;  // UNIGRAM by default
  bool byte_fallback = false;
  std::int64_t unk_id = 0, bos_id = 1, eos_id = 2;
  bool add_dummy_prefix = true, remove_extra_whitespaces = true;
  auto corrupt = [&](std::string_view what) {
    return data_loss(source + ": malformed SentencePiece model (" + std::string(what) + ")");
  };
  ProtoReader top(data);
  while (!top.done()) {
    int num = 0, wire = 0;
    std::uint64_t v = 0;
    std::string_view bytes;
    if (!top.field(&num, &wire, &v, &bytes)) return corrupt("ModelProto");
    if (num == 1 && wire == 2) {
      SpPiece p;
      ProtoReader pr(bytes);
      while (!pr.done()) {
        int n2 = 0, w2 = 0;
        std::uint64_t v2 = 0;
        std::string_view b2;
        if (!pr.field(&n2, &w2, &v2, &b2)) return corrupt("pieces");
        if (n2 == 1 && w2 == 2) p.text = std::string(b2);
        else if (n2 == 2 && w2 == 5) {
          const auto bits = static_cast<std::uint32_t>(v2);
          std::memcpy(&p.score, &bits, 4);
        } else if (n2 == 3 && w2 == 0) p.type = static_cast<int>(v2);
      }
      pieces.push_back(std::move(p));
    } else if ((num == 2 || num == 3) && wire == 2) {
      ProtoReader sr(bytes);
      while (!sr.done()) {
        int n2 = 0, w2 = 0;
        std::uint64_t v2 = 0;
        std::string_view b2;
        if (!sr.field(&n2, &w2, &v2, &b2)) return corrupt(num == 2 ? "trainer_spec" : "normalizer_spec");
        if (w2 != 0) continue;
        const auto as_int = static_cast<std::int64_t>(static_cast<std::int32_t>(v2));
        if (num == 2) {
          if (n2 == 3) model_type = static_cast<int>(v2);
          else if (n2 == 35) byte_fallback = v2 != 0;
          else if (n2 == 40) unk_id = as_int;
          else if (n2 == 41) bos_id = as_int;
          else if (n2 == 42) eos_id = as_int;
        } else {
          if (n2 == 3) add_dummy_prefix = v2 != 0;
          else if (n2 == 4) remove_extra_whitespaces = v2 != 0;
        }
      }
    }
  }
  if (pieces.empty()) return corrupt("no pieces");
  if (model_type != 2) {
    return unimplemented(source + ": SentencePiece model_type " + std::to_string(model_type) +
                         " is not supported (BPE = 2 only; Unigram models are not)");
  }
  auto t = std::make_unique<HfTokenizer>();
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const auto id = static_cast<std::int32_t>(i);
    const auto& p = pieces[i];
    t->vocab_.emplace(p.text, id);
    t->set_token(id, p.text);
    if (p.type == 2) t->unk_id_ = id;
    if (p.type == 2 || p.type == 3 || p.type == 4) {  // unknown, control, user-defined
      t->added_.push_back(AddedToken{id, p.text, p.type != 4, false, false, false});
    }
    if (p.type == 6) byte_fallback = true;
  }
  if (t->unk_id_ < 0 && unk_id >= 0 && unk_id < static_cast<std::int64_t>(pieces.size())) {
    t->unk_id_ = static_cast<std::int32_t>(unk_id);
  }
  t->byte_fallback_ = byte_fallback;
  t->fuse_unk_ = true;
  // SentencePiece BPE merges the adjacent pair whose concatenation is the best-scoring normal
  // piece; expressed as merge ranks: order by score (descending), then id.
  std::vector<std::int32_t> order;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    if (pieces[i].type == 1 && unicode::decode_utf8(pieces[i].text).size() > 1) {
      order.push_back(static_cast<std::int32_t>(i));
    }
  }
  std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
    return pieces[static_cast<std::size_t>(a)].score > pieces[static_cast<std::size_t>(b)].score;
  });
  std::int32_t rank = 0;
  for (std::int32_t id : order) {
    const std::string& s = pieces[static_cast<std::size_t>(id)].text;
    std::size_t cut = 0;
    while (true) {
      unicode::decode_one(s, cut);
      if (cut >= s.size()) break;
      auto a = t->vocab_.find(s.substr(0, cut));
      auto b = t->vocab_.find(s.substr(cut));
      if (a != t->vocab_.end() && b != t->vocab_.end()) {
        t->merges_.emplace(HfTokenizer::pair_key(a->second, b->second), std::make_pair(rank, id));
      }
    }
    ++rank;
  }
  if (remove_extra_whitespaces) {
    NormalizerStep strip{};
    strip.kind = NormalizerStep::Kind::kReplaceRegex;
    auto re = TokenizerRegex::compile(" {2,}");
    KUN_CHECK(re.ok());
    strip.regex = std::make_shared<TokenizerRegex>(std::move(re).value());
    strip.b = " ";
    t->normalizers_.push_back(strip);
    NormalizerStep trim{};
    trim.kind = NormalizerStep::Kind::kStrip;
    trim.left = trim.right = true;
    t->normalizers_.push_back(trim);
  }
  if (add_dummy_prefix) {
    t->normalizers_.push_back(NormalizerStep{NormalizerStep::Kind::kPrepend, std::string(kMetaspaceMark), "", nullptr, false, false});
  }
  t->normalizers_.push_back(NormalizerStep{NormalizerStep::Kind::kReplace, " ", std::string(kMetaspaceMark), nullptr, false, false});
  t->decoders_.push_back(DecoderStep{DecoderStep::Kind::kReplace, std::string(kMetaspaceMark), " ", 0, 0, true});
  t->decoders_.push_back(DecoderStep{DecoderStep::Kind::kByteFallback, "", "", 0, 0, true});
  t->decoders_.push_back(DecoderStep{DecoderStep::Kind::kFuse, "", "", 0, 0, true});
  if (add_dummy_prefix) {
    t->decoders_.push_back(DecoderStep{DecoderStep::Kind::kStrip, " ", "", 1, 0, true});
  }
  t->finish_setup();
  // Control and user-defined pieces are matched in text before BPE, as HuggingFace does.
  auto valid = [&](std::int64_t id) { return id >= 0 && id < static_cast<std::int64_t>(pieces.size()); };
  // LlamaTokenizer defaults: BOS on, EOS off (tokenizer_config.json may say otherwise).
  KUN_RETURN_IF_ERROR(apply_config(config_text, source, *t, false, true));
  if (t->bos_id_ < 0 && valid(bos_id)) t->bos_id_ = static_cast<std::int32_t>(bos_id);
  if (t->eos_id_ < 0 && valid(eos_id)) t->eos_id_ = static_cast<std::int32_t>(eos_id);
  return std::unique_ptr<Tokenizer>(std::move(t));
}

StatusOr<std::string> read_file(const std::filesystem::path& path) {
  // Only regular files: opening a FIFO for reading would wait for a writer forever.
  std::error_code ec;
  if (std::filesystem::exists(path, ec) && !std::filesystem::is_regular_file(path, ec)) {
    return invalid_argument(path.string() + ": not a regular file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("cannot open " + path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return data_loss("cannot read " + path.string());
  return ss.str();
}

}  // namespace

std::string HfTokenizer::nfc(const std::string& text) { return unicode::nfc(text); }

StatusOr<std::unique_ptr<Tokenizer>> load_tokenizer_from_json(std::string_view tokenizer_json,
                                                              std::string_view config_json,
                                                              const std::string& source) {
  try {
    return build_from_json(tokenizer_json, config_json, source);
  } catch (const json::exception& e) {
    return invalid_argument(source + ": " + e.what());
  }
}

StatusOr<std::unique_ptr<Tokenizer>> load_sentencepiece_model(std::string_view model_bytes,
                                                              std::string_view config_json,
                                                              const std::string& source) {
  try {
    return build_from_sentencepiece(model_bytes, config_json, source);
  } catch (const json::exception& e) {
    return invalid_argument(source + ": " + e.what());
  }
}

StatusOr<std::unique_ptr<Tokenizer>> load_tokenizer(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path file(path);
  fs::path dir;
  if (fs::is_directory(file, ec)) {
    dir = file;
    if (fs::exists(dir / "tokenizer.json", ec)) file = dir / "tokenizer.json";
    else if (fs::exists(dir / "tokenizer.model", ec)) file = dir / "tokenizer.model";
    else return not_found(path + ": no tokenizer.json or tokenizer.model in the directory");
  } else if (fs::exists(file, ec)) {
    dir = file.parent_path();
  } else {
    return not_found(path + ": no such tokenizer file or directory");
  }
  std::string config;
  const fs::path config_path = dir / "tokenizer_config.json";
  if (fs::exists(config_path, ec)) {
    KUN_ASSIGN_OR_RETURN(config, read_file(config_path));
  }
  KUN_ASSIGN_OR_RETURN(std::string content, read_file(file));
  if (file.extension() == ".model") {
    return load_sentencepiece_model(content, config, file.string());
  }
  return load_tokenizer_from_json(content, config, file.string());
}

// ---------------------------------------------------------------------------------------------
// IncrementalDetokenizer.

namespace {
constexpr std::string_view kReplacementUtf8 = "\xEF\xBF\xBD";
constexpr std::size_t kDetokenizerWindow = 8;  // tokens kept before the unemitted ones
}  // namespace

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string IncrementalDetokenizer::push(std::int32_t id) {
  ids_.push_back(id);
  const std::span<const std::int32_t> window(ids_.data() + prefix_offset_, ids_.size() - prefix_offset_);
  const std::string text = tokenizer_.decode(window, skip_special_tokens_);
  // A trailing U+FFFD may be a character cut in the middle: hold it (and what follows) back.
  std::size_t stable = text.size();
  if (text.size() >= 3 && std::string_view(text).substr(text.size() - 3) == kReplacementUtf8) {
    stable = text.size() - 3;
  }
  std::string out;
  if (stable > emitted_bytes_) {
    out = text.substr(emitted_bytes_, stable - emitted_bytes_);
    emitted_bytes_ = stable;
  }
  // Slide the window once everything is emitted, when the shorter window decodes to exactly the
  // tail of the longer one (so emitted byte counts carry over).
  if (emitted_bytes_ == text.size() && ids_.size() - prefix_offset_ > 2 * kDetokenizerWindow) {
    const std::size_t next = ids_.size() - kDetokenizerWindow;
    const std::span<const std::int32_t> tail(ids_.data() + next, ids_.size() - next);
    const std::string tail_text = tokenizer_.decode(tail, skip_special_tokens_);
    if (tail_text.size() <= text.size() &&
        std::string_view(text).substr(text.size() - tail_text.size()) == tail_text) {
      prefix_offset_ = next;
      emitted_bytes_ = tail_text.size();
    }
  }
  return out;
}

std::string IncrementalDetokenizer::flush() {
  const std::span<const std::int32_t> window(ids_.data() + prefix_offset_, ids_.size() - prefix_offset_);
  const std::string text = tokenizer_.decode(window, skip_special_tokens_);
  std::string out = emitted_bytes_ < text.size() ? text.substr(emitted_bytes_) : std::string();
  emitted_bytes_ = text.size();
  return out;
}

std::string byte_level_text(std::string_view bytes) { return byte_level_encode(bytes); }

}  // namespace kun::model
