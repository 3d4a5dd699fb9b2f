// Minimal leveled logging to stderr: KUN_LOG(kInfo) << "text";
// Thread-safe (one line is written with one call). Level from KUN_LOG_LEVEL
// (debug|info|warn|error, default info) or set_log_level().
#pragma once

#include <sstream>

namespace kun {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3, kOff = 4 };

void set_log_level(LogLevel level);
LogLevel log_level();
bool log_enabled(LogLevel level);

namespace detail {
class LogLine {
 public:
  LogLine(LogLevel level, const char* file, int line);
  ~LogLine();
  LogLine(const LogLine&) = delete;
  LogLine& operator=(const LogLine&) = delete;
  template <typename T>
  LogLine& operator<<(const T& v) {
    stream_ << v;
    return *this;
  }

 private:
  std::ostringstream stream_;
};
}  // namespace detail

}  // namespace kun

#define KUN_LOG(level)                                   \
  if (!::kun::log_enabled(::kun::LogLevel::level)) {     \
  } else                                                 \
    ::kun::detail::LogLine(::kun::LogLevel::level, __FILE__, __LINE__)
