// libFuzzer target: tokenizers on arbitrary bytes (valid and invalid UTF-8).
//   - encode never crashes and yields ids inside the vocabulary;
//   - for valid UTF-8, decode(encode(text)) == text (byte-level BPE and the synthetic
//     vocabulary are lossless);
//   - the incremental detokenizer's pieces concatenate to decode(ids) and are valid UTF-8;
//   - decoding arbitrary id sequences never crashes.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz/fuzz_util.h"
#include "server/utf8.h"

namespace {

void check_tokenizer(const kun::model::Tokenizer& tok, std::string_view text, const char* which) {
  const bool valid = kun::server::is_valid_utf8(text);
  const auto ids = tok.encode(text, /*add_special_tokens=*/false);
  for (std::int32_t id : ids) {
    if (id < 0 || id >= tok.vocab_size()) kun::fuzz::fail(std::string(which) + ": id out of range " + std::to_string(id));
  }
  const std::string back = tok.decode(ids, /*skip_special_tokens=*/false);
  if (valid && back != text) {
    kun::fuzz::fail(std::string(which) + ": round trip changed the text (" + std::to_string(text.size()) + " -> " +
                    std::to_string(back.size()) + " bytes)");
  }
  kun::model::IncrementalDetokenizer inc(tok, /*skip_special_tokens=*/false);
  std::string streamed;
  for (std::int32_t id : ids) {
    const std::string piece = inc.push(id);
    if (!kun::server::is_valid_utf8(piece)) kun::fuzz::fail(std::string(which) + ": incremental piece is not UTF-8");
    streamed += piece;
  }
  streamed += inc.flush();
  if (streamed != back) kun::fuzz::fail(std::string(which) + ": incremental text differs from decode");
  (void)tok.encode(text, /*add_special_tokens=*/true);
}

void decode_ids(const kun::model::Tokenizer& tok, const std::uint8_t* data, std::size_t size) {
  std::vector<std::int32_t> ids;
  for (std::size_t i = 0; i + 1 < size; i += 2) {
    ids.push_back(static_cast<std::int32_t>((data[i] | (data[i + 1] << 8)) % tok.vocab_size()));
  }
  (void)tok.decode(ids, true);
  kun::model::IncrementalDetokenizer inc(tok, true);
  std::string streamed;
  for (std::int32_t id : ids) streamed += inc.push(id);
  streamed += inc.flush();
  if (!kun::server::is_valid_utf8(streamed)) kun::fuzz::fail("incremental decode of arbitrary ids is not UTF-8");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const auto byte_level = kun::fuzz::byte_level_tokenizer();
  static const auto synthetic = kun::model::synthetic_tokenizer(1000);
  if (size == 0) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  switch (data[0] % 3) {
    case 0: check_tokenizer(*byte_level, text, "byte-level BPE"); break;
    case 1: check_tokenizer(*synthetic, text, "synthetic"); break;
    default:
      decode_ids(*byte_level, data + 1, size - 1);
      decode_ids(*synthetic, data + 1, size - 1);
      break;
  }
  return 0;
}
