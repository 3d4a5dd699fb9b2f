// Helpers shared by the libFuzzer targets: a byte-level BPE tokenizer.json covering all 256
// bytes (so every valid UTF-8 text round-trips), and a splitter turning fuzz bytes into fields.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "model/tokenizer.h"

namespace kun::fuzz {

// Aborts with a message: libFuzzer records the input as a crash.
[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz invariant violated: %s\n", what.c_str());
  std::abort();
}

// Splits `data` at 0xFF bytes into at most `max_fields` fields (the last keeps the rest).
inline std::vector<std::string_view> split_fields(const std::uint8_t* data, std::size_t size, std::size_t max_fields) {
  std::vector<std::string_view> out;
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  while (out.size() + 1 < max_fields) {
    const auto at = rest.find('\xff');
    if (at == std::string_view::npos) break;
    out.push_back(rest.substr(0, at));
    rest.remove_prefix(at + 1);
  }
  out.push_back(rest);
  return out;
}

// GPT-2's byte -> printable code point map (byte-level BPE), as UTF-8 strings.
inline std::vector<std::string> byte_level_alphabet() {
  std::vector<int> cps(256, -1);
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    cps[static_cast<std::size_t>(b)] = printable ? b : next++;
  }
  std::vector<std::string> out;
  for (int cp : cps) {
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    out.push_back(s);
  }
  return out;
}

inline std::string json_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

// A byte-level BPE tokenizer.json (Llama 3 / Qwen2 style): GPT-2 split regex, every byte in the
// vocabulary, a few merges, two special added tokens and a ChatML template in its config.
inline std::string byte_level_tokenizer_json() {
  const auto alphabet = byte_level_alphabet();
  std::string vocab;
  int id = 0;
  for (const auto& s : alphabet) {
    if (id) vocab += ", ";
    vocab += "\"" + json_escape(s) + "\": " + std::to_string(id++);
  }
  const char* merged[] = {"Ġt", "he", "Ġthe", "in", "er", "Ġa", "on", "re", "ĠĠ", "ĊĊ"};
  const char* merges[] = {"Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ a", "o n", "r e", "Ġ Ġ", "Ċ Ċ"};
  std::string merge_list;
  for (std::size_t i = 0; i < std::size(merged); ++i) {
    vocab += ", \"" + std::string(merged[i]) + "\": " + std::to_string(id++);
    if (i) merge_list += ", ";
    merge_list += "\"" + std::string(merges[i]) + "\"";
  }
  return R"({"added_tokens": [
      {"id": )" + std::to_string(id) + R"(, "content": "<|im_start|>", "special": true},
      {"id": )" + std::to_string(id + 1) + R"(, "content": "<|im_end|>", "special": true}],
    "normalizer": null,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"},
       "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]},
    "post_processor": null,
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {)" + vocab + R"(}, "merges": [)" + merge_list + R"(]}})";
}

inline const char* chatml_tokenizer_config() {
  return R"({"bos_token": null, "eos_token": "<|im_end|>",
    "chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"})";
}

inline std::unique_ptr<model::Tokenizer> byte_level_tokenizer() {
  auto t = model::load_tokenizer_from_json(byte_level_tokenizer_json(), chatml_tokenizer_config(), "fuzz/tokenizer.json");
  if (!t.ok()) fail("byte-level fuzz tokenizer does not load: " + t.status().to_string());
  return std::move(t).value();
}

}  // namespace kun::fuzz
