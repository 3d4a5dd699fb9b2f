#!/usr/bin/env bash
# The main demo on the embedded default: installs what is missing, builds the release preset,
# then replays a bursty window of the Azure code trace (compiled into the binary) against 4
# in-process devices under each policy and prints one side-by-side table plus plots in out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)" --target kunserve
mkdir -p out/demo
# The window is compressed 8x in time (--time-scale default), so the demand monitor samples 8x
# faster than the 0.5 s default. Short prompts and long generations make the burst bound by KV
# memory (each device holds about two requests) rather than by the 2 cores' compute.
KUN_LOG_LEVEL=${KUN_LOG_LEVEL:-warn} ./build/release/bin/kunserve bench --in-process \
  --policies recompute,swap,migrate,kunserve --devices 4 \
  --max-requests 600 --kv-tokens-per-device 256 --length-scale 0.01 --output-scale 4 --max-output 128 \
  --monitor-period-ms 60 --json out/demo/report.json --out-dir out/demo "$@"
