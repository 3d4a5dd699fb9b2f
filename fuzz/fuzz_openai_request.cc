// libFuzzer target: a request body (JSON) -> parse_request -> prepare_request, for both
// endpoints (the first byte picks one), with the byte-level tokenizer and the synthetic one.
// Checks: no crash; an accepted request fits the model's context with ids inside the vocabulary.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.h"
#include "server/api_error.h"
#include "server/openai_protocol.h"
#include "server/utf8.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const auto byte_level = kun::fuzz::byte_level_tokenizer();
  static const auto synthetic = kun::model::synthetic_tokenizer(512);
  if (size == 0) return 0;
  const auto endpoint = (data[0] & 1) ? kun::server::Endpoint::kChatCompletions : kun::server::Endpoint::kCompletions;
  const kun::model::Tokenizer& tok = (data[0] & 2) ? *synthetic : *byte_level;
  const std::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);
  if (!kun::server::is_valid_utf8(body)) return 0;  // the server answers 400 before parsing
  const kun::server::ProtocolLimits limits;
  kun::server::ParsedRequest parsed;
  if (auto err = kun::server::parse_request(endpoint, body, limits, parsed)) {
    (void)kun::server::error_body(*err);
    return 0;
  }
  kun::engine::ModelInfo info;
  info.name = "m";
  info.max_context_tokens = 128;
  info.vocab_size = tok.vocab_size();
  info.eos_token_id = tok.eos_token_id();
  kun::server::PreparedRequest out;
  if (auto err = kun::server::prepare_request(std::move(parsed), tok, info, "m", limits, out)) {
    (void)kun::server::error_body(*err);
    return 0;
  }
  const auto prompt = static_cast<std::int64_t>(out.spec.prompt_tokens.size());
  if (prompt + out.spec.max_tokens > info.max_context_tokens) {
    kun::fuzz::fail("accepted " + std::to_string(prompt) + " prompt + " + std::to_string(out.spec.max_tokens) +
                    " max tokens beyond the context of " + std::to_string(info.max_context_tokens));
  }
  for (std::int32_t id : out.spec.prompt_tokens) {
    if (id < 0 || id >= info.vocab_size) kun::fuzz::fail("prompt token id out of range: " + std::to_string(id));
  }
  return 0;
}
