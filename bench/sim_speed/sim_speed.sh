#!/usr/bin/env bash
# Simulator speed (issue 15): one simulated hour of 8 instances under a sustained overload
# (Llama-2-13B on 8 A100-80GB, Poisson 12 req/s for 3600 s, kunserve: 42.8 K requests, queues of
# thousands, groups grown to 8 members running ~2 K sequences a round). Prints user CPU seconds,
# wall seconds, simulated seconds per wall second, instants (event-loop iterations) per second and
# steps per second of the binary under test, and, with BASE=path/to/an/older/kunserve, the same
# for that binary run right before it and the old/new CPU ratio (the same command back to back;
# this host's load drifts, so only such a ratio is a figure), and whether the two JSON reports are
# byte-identical (a speed change must not change results). Target: under 10 s of CPU.
# Usage: bench/sim_speed/sim_speed.sh [extra simulate options]; BIN (default
# build/release/bin/kunserve), BASE (optional), OUT (default out/sim_speed).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-build/release/bin/kunserve}
OUT=${OUT:-out/sim_speed}
mkdir -p "$OUT"
CMD=(simulate --scenario llama13b-a100x8 --trace poisson --rate 12 --duration-s 3600 --policies kunserve --speed "$@")
run() {  # label binary
  local label=$1 bin=$2
  /usr/bin/time -f "%U %e" -o "$OUT/$label.time" "$bin" "${CMD[@]}" --json "$OUT/$label.json" > "$OUT/$label.log" 2>&1
  read -r user wall < "$OUT/$label.time"
  local speed
  speed=$(grep -E '^speed ' "$OUT/$label.log" | sed 's/^speed [^:]*: //')
  echo "$label: ${user} s user CPU, ${wall} s wall; $speed" >&2
  echo "$user"
}
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
if [[ -n ${BASE:-} ]]; then
  old=$(run base "$BASE")
fi
new=$(run new "$BIN")
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
if [[ -n ${BASE:-} ]]; then
  python3 -c "print(f'old/new user CPU: {$old / $new:.2f}x')"
  if cmp -s "$OUT/base.json" "$OUT/new.json"; then echo "reports byte-identical"; else echo "reports DIFFER"; exit 1; fi
fi
python3 -c "import sys; u=$new; print(f'user CPU {u:.2f} s against the 10 s target: ' + ('met' if u < 10 else 'not met'))"
