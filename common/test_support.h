// Test-only helpers shared by the modules' tests (header-only; include from tests only).
#pragma once

#include <cstdlib>
#include <string_view>

#include <gtest/gtest.h>

namespace kun::test_support {

// True under CI (CI=true), where the test command has installed every tool the tests use.
inline bool running_in_ci() {
  const char* ci = std::getenv("CI");
  return ci != nullptr && std::string_view(ci) == "true";
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
