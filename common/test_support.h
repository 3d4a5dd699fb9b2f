// Test-only helpers shared by the modules' tests (header-only; include from tests only).
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>

#include <gtest/gtest.h>

namespace kun::test_support {

// True under CI (CI=true), where the test command has installed every tool the tests use.
inline bool running_in_ci() {
  const char* ci = std::getenv("CI");
  return ci != nullptr && std::string_view(ci) == "true";
}

#ifdef KUN_SOURCE_DIR
// The source tree the tests read their data from: $KUN_SOURCE_DIR where set (a test binary run
// from another checkout), else the one it was built from (every test target defines the macro).
inline std::filesystem::path source_dir() {
  if (const char* env = std::getenv("KUN_SOURCE_DIR"); env != nullptr && *env != '\0') return env;
  return KUN_SOURCE_DIR;
}
#endif

// Runs `cmd` through /bin/sh with stderr folded into stdout: returns its exit status (-1 where it
// could not start or a signal ended it) and its output in *output.
inline int run_shell(const std::string& cmd, std::string* output) {
  output->clear();
  std::FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  char buf[65536];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) output->append(buf, n);
  const int status = ::pclose(p);
  return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// `s` as one shell word: single quotes, an inner ' written as '\''.
inline std::string shell_quote(std::string_view s) {
  std::string q = "'";
  for (const char c : s) {
    if (c == '\'') q += "'\\''";
    else q.push_back(c);
  }
  q.push_back('\'');
  return q;
}

}  // namespace kun::test_support

// Skips a test whose external tool (node, torch, promtool) is missing on a developer machine, but
// fails it under CI: there scripts/test.sh installed the tool, so its absence is a broken setup,
// not a reason to pass silently.
#define KUN_SKIP_OR_FAIL_IN_CI(message)                                                           \
  do {                                                                                             \
    if (::kun::test_support::running_in_ci()) {                                                         \
      FAIL() << message << " (CI=true: the test command installs it, so it must be present)";     \
    }                                                                                              \
    GTEST_SKIP() << message;                                                                       \
  } while (0)
