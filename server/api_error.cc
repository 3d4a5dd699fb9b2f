#include "server/api_error.h"

#include <nlohmann/json.hpp>

namespace kun::server {

ApiError bad_request(std::string message, std::optional<std::string> param,
                     std::optional<std::string> code) {
  ApiError e;
  e.http_status = 400;
  e.type = "invalid_request_error";
  e.message = std::move(message);
  e.param = std::move(param);
  e.code = std::move(code);
  return e;
}

ApiError api_error_from_status(const Status& status, int retry_after_s,
                               std::optional<std::string> param) {
  ApiError e;
  e.message = status.message().empty() ? std::string(status_code_name(status.code()))
                                       : status.message();
  e.param = std::move(param);
  switch (status.code()) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kFailedPrecondition:
      e.http_status = 400;
      e.type = "invalid_request_error";
      break;
    case StatusCode::kOutOfRange:
      e.http_status = 400;
      e.type = "invalid_request_error";
      e.code = "context_length_exceeded";
      break;
    case StatusCode::kNotFound:
      e.http_status = 404;
      e.type = "invalid_request_error";
      e.code = "model_not_found";
      break;
    case StatusCode::kOverloaded:
      e.http_status = 429;
      e.type = "rate_limit_error";
      e.code = "server_overloaded";
      e.retry_after_s = retry_after_s;
      break;
    case StatusCode::kResourceExhausted:
    case StatusCode::kUnavailable:
    case StatusCode::kCancelled:
      e.http_status = 503;
      e.type = "service_unavailable_error";
      e.code = "service_unavailable";
      e.retry_after_s = retry_after_s;
      break;
    case StatusCode::kDeadlineExceeded:
      e.http_status = 504;
      e.type = "timeout_error";
      break;
    case StatusCode::kUnimplemented:
      e.http_status = 501;
      e.type = "not_implemented_error";
      break;
    case StatusCode::kOk:  // not an error: a caller bug, reported as internal
    case StatusCode::kDataLoss:
    case StatusCode::kInternal:
      e.http_status = 500;
      e.type = "server_error";
      break;
  }
  return e;
}

std::string bounded_message(std::string_view message) {
  if (message.size() <= kMaxErrorMessageBytes) return std::string(message);
  std::size_t cut = kMaxErrorMessageBytes;
  // Do not split a UTF-8 character: back up over continuation bytes.
  while (cut > 0 && (static_cast<unsigned char>(message[cut]) & 0xC0) == 0x80) --cut;
  return std::string(message.substr(0, cut)) + "... (" + std::to_string(message.size() - cut) +
         " more bytes)";
}

std::string error_body(const ApiError& error) {
  nlohmann::json j;
  j["error"]["message"] = bounded_message(error.message);
  j["error"]["type"] = error.type;
  j["error"]["param"] = error.param ? nlohmann::json(*error.param) : nlohmann::json(nullptr);
  j["error"]["code"] = error.code ? nlohmann::json(*error.code) : nlohmann::json(nullptr);
  // Messages may quote client input: never let invalid UTF-8 throw here.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace kun::server
