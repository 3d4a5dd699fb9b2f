#!/usr/bin/env bash
# The project's test command (README): installs what is missing, builds the release preset and
# runs the default test suite (everything except the 'heavy' label).
#   scripts/test.sh            release build + tests
#   scripts/test.sh asan-ubsan unit tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   scripts/test.sh tsan       unit tests under ThreadSanitizer
#   scripts/test.sh heavy      release build + the heavy scenarios only
#   scripts/test.sh fuzz       libFuzzer targets (clang, ASan/UBSan), FUZZ_SECONDS (default 20) each
#   scripts/test.sh soak       scripts/soak.sh against a real 4-device server, SOAK_SECONDS (default 120)
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
  fuzz)
    scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
    ;;
  soak)
    cmake --preset release >/dev/null
    cmake --build --preset release -j "$jobs" --target kunserve
    SOAK_SECONDS="${SOAK_SECONDS:-120}" scripts/soak.sh
    ;;
  *) echo "unknown preset '$preset' (release | asan-ubsan | tsan | heavy | fuzz | soak)"; exit 2 ;;
esac
