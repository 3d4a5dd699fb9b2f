// The OpenAI wire protocol: parsing and validating /v1/completions and /v1/chat/completions
// bodies into engine requests, and formatting responses, SSE chunks and usage. Pure functions
// (no I/O, no threads); nlohmann exceptions are caught inside.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/api.h"
#include "model/tokenizer.h"
#include "server/api_error.h"

namespace kun::server {

enum class Endpoint { kCompletions, kChatCompletions };

struct ProtocolLimits {
  std::int64_t default_completion_max_tokens = 16;  // OpenAI's default for /v1/completions
  std::size_t max_stop_sequences = 16;
  std::size_t max_stop_bytes = 1024;
  std::size_t max_json_depth = 64;
};

// A validated request body, before tokenization.
struct ParsedRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  std::optional<std::string> model;
  bool stream = false;
  bool include_usage = false;
  std::optional<std::string> prompt_text;      // completions: text prompt
  std::vector<std::int32_t> prompt_token_ids;  // completions: token-id prompt
  std::vector<model::ChatMessage> messages;    // chat
  std::optional<std::int64_t> max_tokens;
  std::string max_tokens_field = "max_tokens";  // or "max_completion_tokens" if that was given
  engine::SamplingParams sampling;
  std::vector<std::string> stop;
  std::vector<std::int32_t> stop_token_ids;
  bool ignore_eos = false;
  bool skip_special_tokens = true;
};

// Parses and type-checks a request body (which must already be valid UTF-8).
std::optional<ApiError> parse_request(Endpoint endpoint, std::string_view body,
                                      const ProtocolLimits& limits, ParsedRequest& out);

// A request ready for FrontDoor::submit.
struct PreparedRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  engine::RequestSpec spec;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;
  bool skip_special_tokens = true;
};

// Checks the model name, tokenizes (applying the chat template for chat), and checks lengths
// against the model's context.
std::optional<ApiError> prepare_request(ParsedRequest&& parsed, const model::Tokenizer& tokenizer,
                                        const engine::ModelInfo& info,
                                        std::string_view served_model_name,
                                        const ProtocolLimits& limits, PreparedRequest& out);

// OpenAI's finish_reason for an engine finish reason ("stop" | "length"; errors/cancels are
// reported by other means and map to "stop").
const char* openai_finish_reason(engine::FinishReason reason);

// Formats the JSON objects of one response; "id"/"created"/"model" are shared by all chunks.
class ResponseFormatter {
 public:
  ResponseFormatter(Endpoint endpoint, std::string id, std::int64_t created, std::string model,
                    bool include_usage);
  // SSE events ("data: {...}\n\n").
  std::string role_chunk() const;  // chat only: delta {"role":"assistant","content":""}
  std::string text_chunk(std::string_view text) const;
  // Final chunk with finish_reason; for completions it carries `text` (may be empty), for chat
  // `text` (if non-empty) goes in a content chunk before an empty-delta finish chunk.
  std::string finish_chunks(std::string_view text, const char* finish_reason) const;
  std::string usage_chunk(std::int64_t prompt_tokens, std::int64_t completion_tokens) const;
  static std::string error_event(const ApiError& error);
  static std::string done_event() { return "data: [DONE]\n\n"; }
  // Non-streaming response body.
  std::string full_response(std::string_view text, const char* finish_reason,
                            std::int64_t prompt_tokens, std::int64_t completion_tokens) const;

 private:
  std::string chunk(std::string_view choice_body) const;

  Endpoint endpoint_;
  std::string id_;
  std::int64_t created_;
  std::string model_;
  bool include_usage_;
  std::string prefix_;  // data: {"id":..,"object":..,"created":..,"model":..,"choices":[
};

// JSON string literal of `s` (quotes included); invalid UTF-8 is replaced by U+FFFD.
std::string json_quote(std::string_view s);

}  // namespace kun::server
