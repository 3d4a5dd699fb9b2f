#!/usr/bin/env bash
# The project's test command (README): installs what is missing, builds the release preset and
# runs the default test suite (everything except the 'heavy' label).
#   scripts/test.sh            release build + tests
#   scripts/test.sh asan-ubsan unit tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   scripts/test.sh tsan       unit tests under ThreadSanitizer
#   scripts/test.sh heavy      release build + the heavy scenarios only
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-release}"
scripts/install_deps.sh
jobs="$(nproc)"
case "$preset" in
  release|asan-ubsan|tsan)
    cmake --preset "$preset" >/dev/null
    cmake --build --preset "$preset" -j "$jobs"
    ctest --preset "$preset" -j "$jobs"
    ;;
  heavy)
    cmake --preset release >/dev/null
    cmake --build --preset release -j "$jobs"
    ctest --test-dir build/release --output-on-failure -L heavy
    ;;
  *) echo "unknown preset '$preset' (release | asan-ubsan | tsan | heavy)"; exit 2 ;;
esac
