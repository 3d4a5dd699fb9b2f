// OpenAI-style API errors and the one place where kun::Status codes become HTTP statuses.
// Pure data + formatting; no I/O, no threads.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include "common/status.h"

namespace kun::server {

// {"error": {"message", "type", "param", "code"}} plus the HTTP status it travels with.
struct ApiError {
  int http_status = 400;
  std::string type = "invalid_request_error";
  std::string message;
  std::optional<std::string> param;  // the request field at fault, if any
  std::optional<std::string> code;
  int retry_after_s = -1;  // >= 0: send a Retry-After header
};

// 400 invalid_request_error naming `param`.
ApiError bad_request(std::string message, std::optional<std::string> param = std::nullopt,
                     std::optional<std::string> code = std::nullopt);
// Maps a Status from the engine front door (or the tokenizer) to the HTTP error. The single
// mapping point: kInvalidArgument / kOutOfRange / kFailedPrecondition -> 400, kNotFound -> 404,
// kOverloaded -> 429 + Retry-After, kResourceExhausted / kUnavailable / kCancelled -> 503 +
// Retry-After, kDeadlineExceeded -> 504, kUnimplemented -> 501, others -> 500.
ApiError api_error_from_status(const Status& status, int retry_after_s,
                               std::optional<std::string> param = std::nullopt);
// Messages may quote client input; error_body() cuts a message to this many bytes (at a UTF-8
// character boundary, with a note of what was cut) so an error never echoes a large body.
inline constexpr std::size_t kMaxErrorMessageBytes = 1024;
std::string bounded_message(std::string_view message);
// The JSON body of an error response (message bounded as above).
std::string error_body(const ApiError& error);

}  // namespace kun::server
