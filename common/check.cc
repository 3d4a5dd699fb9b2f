#include "common/check.h"

#include <cstdio>
#include <cstdlib>

namespace kun::detail {

CheckFailure::CheckFailure(const char* file, int line, const char* condition) {
  stream_ << "KUN_CHECK failed at " << file << ":" << line << ": " << condition << " ";
}

CheckFailure::~CheckFailure() {
  std::string msg = stream_.str();
  std::fprintf(stderr, "%s\n", msg.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace kun::detail
