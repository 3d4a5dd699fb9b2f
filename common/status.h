// Status and StatusOr: how expected failures travel (DESIGN.md section 4, "Errors").
// Broken invariants do not use Status: they abort through KUN_CHECK (check.h).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "common/check.h"

namespace kun {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,    // bad request, bad config, malformed input
  kNotFound,           // unknown model, missing tensor or file
  kOutOfRange,         // prompt beyond the context, index past the end
  kResourceExhausted,  // out of KV blocks / pages / swap space
  kOverloaded,         // bounded queue full: retry later (HTTP 429/503)
  kUnavailable,        // peer lost, server shutting down
  kDeadlineExceeded,   // timeout
  kCancelled,          // request cancelled by its client
  kDataLoss,           // truncated or corrupt file
  kUnimplemented,      // unsupported architecture, dtype or feature
  kFailedPrecondition, // operation not allowed in the current state
  kInternal,           // unexpected failure inside a third-party adapter
};

std::string_view status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok_status() { return Status(); }
  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "INVALID_ARGUMENT: message"
  std::string to_string() const;
  // Prepends context: "while loading x: <message>".
  Status with_context(std::string_view context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status ok_status() { return Status(); }
inline Status invalid_argument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status not_found(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status out_of_range(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status resource_exhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
inline Status overloaded(std::string m) { return {StatusCode::kOverloaded, std::move(m)}; }
inline Status unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status deadline_exceeded(std::string m) { return {StatusCode::kDeadlineExceeded, std::move(m)}; }
inline Status cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
inline Status data_loss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
inline Status unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
inline Status failed_precondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
inline Status internal_error(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(Status status) : status_(std::move(status)) {  // NOLINT: implicit by design
    KUN_CHECK(!status_.ok()) << "StatusOr constructed from an OK status without a value";
  }
  StatusOr(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }

  T& value() & {
    KUN_CHECK(ok()) << "StatusOr::value() on error: " << status_.to_string();
    return *value_;
  }
  const T& value() const& {
    KUN_CHECK(ok()) << "StatusOr::value() on error: " << status_.to_string();
    return *value_;
  }
  T&& value() && {
    KUN_CHECK(ok()) << "StatusOr::value() on error: " << status_.to_string();
    return std::move(*value_);
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace kun

#define KUN_STATUS_CONCAT_INNER(a, b) a##b
#define KUN_STATUS_CONCAT(a, b) KUN_STATUS_CONCAT_INNER(a, b)

// Returns the status from the enclosing function if it is an error.
#define KUN_RETURN_IF_ERROR(expr)                 \
  do {                                            \
    ::kun::Status kun_status_tmp_ = (expr);       \
    if (!kun_status_tmp_.ok()) return kun_status_tmp_; \
  } while (0)

// KUN_ASSIGN_OR_RETURN(auto x, make_x()); declares x or returns the error.
#define KUN_ASSIGN_OR_RETURN(lhs, expr) \
  KUN_ASSIGN_OR_RETURN_IMPL(KUN_STATUS_CONCAT(kun_statusor_, __LINE__), lhs, expr)
#define KUN_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()
