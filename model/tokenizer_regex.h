// A small backtracking regular-expression engine over Unicode code points, for the Split
// pre-tokenizer patterns of HuggingFace tokenizer.json files (GPT-2, Llama 3, Qwen2, ...).
// Semantics follow Oniguruma (which the Rust tokenizers crate uses): leftmost match, alternatives
// tried in order, greedy quantifiers backtrack.
// Supported: literals, '.', classes [...] with ranges and negation, \s \S \d \D \w \W,
// \p{X} \P{X} (general categories and their major classes), \r \n \t \f \v \e \0, \xHH, \x{H..},
// \uHHHH, groups (...) (?:...) (?i:...) (?i) (?=...) (?!...) (?<name>...), quantifiers ? * + {n}
// {n,} {n,m} with lazy '?' and possessive '+' (treated as greedy), anchors ^ $ \A \z \Z.
// Case-insensitive matching folds ASCII letters only. A compiled regex is immutable: safe to
// share across threads.
#pragma once

#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace kun::model {

class TokenizerRegex {
 public:
  static StatusOr<TokenizerRegex> compile(std::string_view pattern);

  // Leftmost match beginning at or after `from`; false when there is none.
  bool find(std::span<const char32_t> text, std::size_t from, std::size_t* begin,
            std::size_t* end) const;
  // All non-overlapping matches, left to right, as [begin, end) code point ranges. An empty
  // match advances the scan by one code point.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(std::span<const char32_t> text) const;

  const std::string& pattern() const { return pattern_; }

  struct ClassItem {
    enum class Kind { kRange, kMajor, kCategory, kSpace, kDigit, kWord } kind = Kind::kRange;
    bool negated = false;
    char32_t lo = 0, hi = 0;  // kRange
    int value = 0;            // kMajor: major class letter; kCategory: unicode::Category
  };
  struct CharClass {
    std::vector<ClassItem> items;
    bool negated = false;
    bool icase = false;
  };
  enum class Op { kChar, kClass, kAny, kSplit, kJmp, kLook, kLineBegin, kLineEnd, kTextBegin,
                  kTextEnd, kTextEndNewline, kMatch };
  struct Inst {
    Op op = Op::kMatch;
    char32_t ch = 0;
    bool icase = false;
    bool negate = false;  // kLook: negative lookahead
    int x = 0;            // kSplit: preferred branch; kJmp: target; kClass: class index; kLook: sub
    int y = 0;            // kSplit: other branch; kLook: continuation
  };

 private:
  bool run(int pc, std::size_t pos, std::span<const char32_t> text, std::size_t* end) const;
  bool class_matches(const CharClass& cls, char32_t cp) const;

  std::string pattern_;
  std::vector<Inst> program_;
  std::vector<CharClass> classes_;

  friend class RegexCompiler;
};

}  // namespace kun::model
