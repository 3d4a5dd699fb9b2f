// Unicode support for the tokenizers: UTF-8 coding, lossy UTF-8 repair (U+FFFD for every
// maximal ill-formed subsequence, as Rust's from_utf8_lossy and the WHATWG decoder do), and the
// general category of a code point (tables generated from Unicode data, tokenizer_unicode_data.cc).
// Pure functions over immutable tables: safe from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace kun::model::unicode {

enum class Category : std::uint8_t {
  kCn, kLu, kLl, kLt, kLm, kLo, kMn, kMc, kMe, kNd, kNl, kNo, kPc, kPd, kPs, kPe, kPi, kPf, kPo,
  kSm, kSc, kSk, kSo, kZs, kZl, kZp, kCc, kCf, kCs, kCo,
};

struct CategoryRange {
  char32_t first;
  Category category;
};
extern const CategoryRange kCategoryRanges[];
extern const std::size_t kCategoryRangeCount;

inline constexpr char32_t kReplacementChar = 0xFFFD;

Category general_category(char32_t cp);
// Major classes: 'L' letters, 'M' marks, 'N' numbers, 'P' punctuation, 'S' symbols,
// 'Z' separators, 'C' other.
char major_class(Category category);
bool is_letter(char32_t cp);
bool is_number(char32_t cp);
// The Unicode White_Space property (what Oniguruma's \s matches in Unicode mode).
bool is_white_space(char32_t cp);

// Decodes one code point starting at text[pos] and advances pos. An ill-formed sequence yields
// U+FFFD and consumes its maximal subpart (at least one byte).
char32_t decode_one(std::string_view text, std::size_t& pos);
std::vector<char32_t> decode_utf8(std::string_view text);
void append_utf8(std::string& out, char32_t cp);
std::string encode_utf8(const std::vector<char32_t>& cps);
// Replaces every maximal ill-formed subsequence by U+FFFD; valid text is returned unchanged.
std::string repair_utf8(std::string_view bytes);
bool is_valid_utf8(std::string_view bytes);

}  // namespace kun::model::unicode
