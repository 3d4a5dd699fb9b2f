#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan + coverage; preset `fuzz`, build/fuzz) and
# runs each for a bounded time from its seed corpus (fuzz/corpus/<target>).
#   scripts/fuzz.sh [SECONDS_PER_TARGET=30] [TARGET...]
# Environment: FUZZ_JOBS (build jobs, default nproc), FUZZ_WORK (where the growing corpora,
# crash files and logs go; default build/fuzz/work). A crash, leak, timeout or invariant failure
# stops that target, leaves crash-* / leak-* / timeout-* in FUZZ_WORK/<target>/ and makes the
# script exit non-zero after the other targets ran. The last lines of each run (execs, cov, ft)
# are printed as a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
shift || true
all_targets=(fuzz_http_request fuzz_openai_request fuzz_tokenizer fuzz_chat_template fuzz_safetensors fuzz_gguf fuzz_hf_config)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")
jobs="${FUZZ_JOBS:-$(nproc)}"
work="${FUZZ_WORK:-build/fuzz/work}"

command -v clang++-14 >/dev/null || { echo "fuzz.sh: clang++-14 missing (scripts/install_deps.sh)"; exit 2; }
cmake --preset fuzz >/dev/null
cmake --build --preset fuzz -j "$jobs" --target "${targets[@]}"

failed=()
printf '%-22s %10s %8s %8s %8s %s\n' target execs exec/s cov ft result
for t in "${targets[@]}"; do
  name="${t#fuzz_}"
  dir="$work/$t"
  mkdir -p "$dir/corpus"
  log="$dir/run.log"
  # Grow a private copy of the corpus; the committed seeds stay as they are.
  set +e
  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "build/fuzz/fuzz/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$dir/" "$dir/corpus" "fuzz/corpus/$name" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)
  speed=$(grep -m1 '^stat::average_exec_per_sec' "$log" | awk '{print $2}' || true)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  result=ok
  if [ $rc -ne 0 ]; then
    result="FAILED (rc $rc, see $log)"
    failed+=("$t")
    grep -E 'ERROR|invariant|SUMMARY|Test unit written' "$log" | head -5 || true
  fi
  printf '%-22s %10s %8s %8s %8s %s\n' "$t" "${execs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "$result"
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz.sh: ${#failed[@]} target(s) failed: ${failed[*]}"
  exit 1
fi
