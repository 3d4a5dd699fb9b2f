// KUN_CHECK: a broken invariant aborts loudly with file, line, the failed condition and any
// context streamed after it. Never used for expected conditions (those return Status).
#pragma once

#include <sstream>
#include <string>

namespace kun::detail {

class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* condition);
  [[noreturn]] ~CheckFailure();
  CheckFailure(const CheckFailure&) = delete;
  CheckFailure& operator=(const CheckFailure&) = delete;
  template <typename T>
  CheckFailure& operator<<(const T& v) {
    stream_ << v;
    return *this;
  }

 private:
  std::ostringstream stream_;
};

// Lets `KUN_CHECK(x) << "context"` compile as a void expression.
struct CheckVoidify {
  void operator&(const CheckFailure&) {}
};

}  // namespace kun::detail

#define KUN_CHECK(cond)                                                         \
  (cond) ? (void)0                                                              \
         : ::kun::detail::CheckVoidify() &                                      \
               ::kun::detail::CheckFailure(__FILE__, __LINE__, #cond)

#define KUN_CHECK_OP(a, op, b) \
  KUN_CHECK((a)op(b)) << "(" << (a) << " vs " << (b) << ") "
#define KUN_CHECK_EQ(a, b) KUN_CHECK_OP(a, ==, b)
#define KUN_CHECK_NE(a, b) KUN_CHECK_OP(a, !=, b)
#define KUN_CHECK_LT(a, b) KUN_CHECK_OP(a, <, b)
#define KUN_CHECK_LE(a, b) KUN_CHECK_OP(a, <=, b)
#define KUN_CHECK_GT(a, b) KUN_CHECK_OP(a, >, b)
#define KUN_CHECK_GE(a, b) KUN_CHECK_OP(a, >=, b)

// Checks that a Status-returning expression succeeded (for call sites where failure is a bug).
#define KUN_CHECK_OK(expr)                                           \
  do {                                                               \
    auto kun_check_ok_status_ = (expr);                              \
    KUN_CHECK(kun_check_ok_status_.ok()) << kun_check_ok_status_.to_string(); \
  } while (0)
