#include "model/tokenizer_unicode.h"

#include <algorithm>

namespace kun::model::unicode {

Category general_category(char32_t cp) {
  if (cp > 0x10FFFF) return Category::kCn;
  const CategoryRange* begin = kCategoryRanges;
  const CategoryRange* end = kCategoryRanges + kCategoryRangeCount;
  // The last range whose first code point is <= cp.
  const CategoryRange* it = std::upper_bound(
      begin, end, cp, [](char32_t value, const CategoryRange& r) { return value < r.first; });
  return it == begin ? Category::kCn : (it - 1)->category;
}

char major_class(Category category) {
  switch (category) {
    case Category::kLu: case Category::kLl: case Category::kLt: case Category::kLm:
    case Category::kLo:
      return 'L';
    case Category::kMn: case Category::kMc: case Category::kMe:
      return 'M';
    case Category::kNd: case Category::kNl: case Category::kNo:
      return 'N';
    case Category::kPc: case Category::kPd: case Category::kPs: case Category::kPe:
    case Category::kPi: case Category::kPf: case Category::kPo:
      return 'P';
    case Category::kSm: case Category::kSc: case Category::kSk: case Category::kSo:
      return 'S';
    case Category::kZs: case Category::kZl: case Category::kZp:
      return 'Z';
    case Category::kCn: case Category::kCc: case Category::kCf: case Category::kCs:
    case Category::kCo:
      return 'C';
  }
  return 'C';
}

bool is_letter(char32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return major_class(general_category(cp)) == 'L';
}

bool is_number(char32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return major_class(general_category(cp)) == 'N';
}

bool is_white_space(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

char32_t decode_one(std::string_view text, std::size_t& pos) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char b0 = byte(pos);
  if (b0 < 0x80) {
    ++pos;
    return b0;
  }
  int need = 0;
  char32_t cp = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1; cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2; cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3; cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    ++pos;
    return kReplacementChar;
  }
  std::size_t i = pos + 1;
  for (int k = 0; k < need; ++k, ++i) {
    const unsigned char lo_k = k == 0 ? lo : 0x80;
    const unsigned char hi_k = k == 0 ? hi : 0xBF;
    if (i >= text.size() || byte(i) < lo_k || byte(i) > hi_k) {
      pos = i;  // the maximal subpart ends before the offending byte
      return kReplacementChar;
    }
    cp = (cp << 6) | (byte(i) & 0x3F);
  }
  pos = i;
  return cp;
}

std::vector<char32_t> decode_utf8(std::string_view text) {
  std::vector<char32_t> out;
  out.reserve(text.size());
  std::size_t pos = 0;
  while (pos < text.size()) out.push_back(decode_one(text, pos));
  return out;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp >= 0xD800 && cp <= 0xDFFF) cp = kReplacementChar;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp <= 0x10FFFF) {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    append_utf8(out, kReplacementChar);
  }
}

std::string encode_utf8(const std::vector<char32_t>& cps) {
  std::string out;
  out.reserve(cps.size());
  for (char32_t cp : cps) append_utf8(out, cp);
  return out;
}

bool is_valid_utf8(std::string_view bytes) {
  std::size_t pos = 0;
  while (pos < bytes.size()) {
    const std::size_t start = pos;
    const char32_t cp = decode_one(bytes, pos);
    // A genuine U+FFFD in the input is 3 bytes EF BF BD; a replacement for bad bytes is not.
    if (cp == kReplacementChar &&
        bytes.substr(start, pos - start) != std::string_view("\xEF\xBF\xBD")) {
      return false;
    }
  }
  return true;
}

std::string repair_utf8(std::string_view bytes) {
  if (is_valid_utf8(bytes)) return std::string(bytes);
  std::string out;
  out.reserve(bytes.size() + 8);
  std::size_t pos = 0;
  while (pos < bytes.size()) append_utf8(out, decode_one(bytes, pos));
  return out;
}

}  // namespace kun::model::unicode
