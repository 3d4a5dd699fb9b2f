// A tiny Tokenizer for server tests: one token per byte (ids 0..255), plus <s> (256) and
// </s> (257). decode() replaces invalid UTF-8 by U+FFFD per maximal subpart, like HuggingFace.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "model/tokenizer.h"

namespace kun::server::testing {

class ByteTokenizer final : public model::Tokenizer {
 public:
  static constexpr std::int32_t kBos = 256;
  static constexpr std::int32_t kEos = 257;

  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<std::int32_t> ids;
    ids.reserve(text.size() + 1);
    if (add_special_tokens) ids.push_back(kBos);
    for (char c : text) ids.push_back(static_cast<unsigned char>(c));
    return ids;
  }

  std::string decode(std::span<const std::int32_t> ids, bool skip_special_tokens) const override {
    std::string bytes;
    std::string out;
    auto flush_bytes = [&] {
      append_lossy(bytes, out);
      bytes.clear();
    };
    for (std::int32_t id : ids) {
      if (id >= 0 && id < 256) {
        bytes.push_back(static_cast<char>(id));
      } else {
        flush_bytes();
        if (!skip_special_tokens) out += id == kBos ? "<s>" : id == kEos ? "</s>" : "<unk>";
      }
    }
    flush_bytes();
    return out;
  }

  std::int64_t vocab_size() const override { return 258; }
  std::int32_t bos_token_id() const override { return kBos; }
  std::int32_t eos_token_id() const override { return kEos; }
  bool is_special(std::int32_t id) const override { return id >= 256; }

  StatusOr<std::string> apply_chat_template(const std::vector<model::ChatMessage>& messages,
                                            bool add_generation_prompt) const override {
    std::string out;
    for (const auto& m : messages) {
      if (m.role != "system" && m.role != "user" && m.role != "assistant") {
        return invalid_argument("unsupported role " + m.role);
      }
      out += "<|" + m.role + "|>" + m.content + "\n";
    }
    if (add_generation_prompt) out += "<|assistant|>";
    return out;
  }

 private:
  static void append_lossy(std::string_view s, std::string& out) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const std::size_t n = s.size();
    std::size_t i = 0;
    while (i < n) {
      const unsigned char c = p[i];
      if (c < 0x80) {
        out.push_back(static_cast<char>(c));
        ++i;
        continue;
      }
      std::size_t len = 0;
      unsigned char lo = 0x80, hi = 0xBF;
      if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
      } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
      } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
      }
      if (len == 0) {
        out += "\xEF\xBF\xBD";
        ++i;
        continue;
      }
      std::size_t k = 1;
      while (k < len && i + k < n) {
        const unsigned char b = p[i + k];
        const bool ok = k == 1 ? (b >= lo && b <= hi) : ((b & 0xC0) == 0x80);
        if (!ok) break;
        ++k;
      }
      if (k == len) {
        out.append(s.substr(i, len));
      } else {
        out += "\xEF\xBF\xBD";  // one replacement for the maximal invalid subpart
      }
      i += k;
    }
  }
};

}  // namespace kun::server::testing
