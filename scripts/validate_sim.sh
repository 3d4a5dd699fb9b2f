#!/usr/bin/env bash
# Simulator against the real runtime (issue 15): the burst demo's trace and cluster options
# (scripts/demo.sh: 4 in-process devices, llama-30m, KV for 64 tokens each, monitor every
# 250 ms, paced links) run through `kunserve bench --in-process` (real) and `kunserve simulate`
# on this machine's measured CPU device profile (simulated), every policy; prints one table of
# p50 / p99 TTFT and mean TPOT, simulated against real, with the relative error (25 % allowed).
#
# The profile: CALIBRATE=1 (default) measures it right before the bench (`kunserve calibrate`,
# about a minute), so both see the same host load: on a shared machine a step's time depends on
# what else runs. CALIBRATE=0 uses the committed sim/profiles/cpu-llama-30m-t1.json (PROFILE=...
# another). Output in OUT (default out/validate): real.json, sim.json, table.md, the load average.
#
# Priority: on a shared host the real runs' speed follows whatever else runs (two identical
# bench runs here differed 2.3x in duration under load 6-12). As root the calibration and the
# bench run at nice ${NICE:--10}, and so does this session's autogroup (the kernel's autogroup
# scheduling weighs sessions against each other before nice values), so that they see the same,
# mostly undisturbed, cores; NICE=0 turns it off. The load average is recorded in the table.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/validate}
POLICIES=${POLICIES:-recompute,swap,migrate,kunserve}
BIN=./build/release/bin/kunserve
RUN=()
if [[ $(id -u) == 0 && ${NICE:--10} != 0 ]]; then
  RUN=(nice -n "${NICE:--10}")
  # With the kernel's autogroup scheduling (sched_autogroup_enabled) nice only ranks processes of
  # one session against each other; the session's own weight is its autogroup's nice.
  if [[ -w /proc/self/autogroup ]]; then echo "${NICE:--10}" > /proc/self/autogroup || true; fi
fi
mkdir -p "$OUT"
if [[ ! -x $BIN ]]; then
  cmake --preset release >/dev/null
  cmake --build --preset release -j "$(nproc)" --target kunserve
fi
PROFILE=${PROFILE:-sim/profiles/cpu-llama-30m-t1.json}
if [[ ${CALIBRATE:-1} == 1 ]]; then
  PROFILE=$OUT/profile.json
  # Host contention is measured with 2 requests running per device (calibrate's default): with KV
  # for 64 tokens each device below holds about two of these requests at once, whatever
  # --max-num-seqs says (--contention-seqs 8 measured 1.59x at 4 devices instead of 2.47x, and the
  # simulation came out twice as fast as the bench). CAL_REPS repeats calibrate's step set and
  # contention runs (1: about a minute; each contention run then lasts about a second).
  "${RUN[@]}" $BIN calibrate --preset llama-30m --threads 1 --reps "${CAL_REPS:-1}" --out "$PROFILE" | tee "$OUT/calibrate.log"
fi
OPTS=(--devices 4 --max-requests 600 --time-scale 2 --max-gap-s 1 --length-scale 0.005 --max-prompt 30
      --output-scale 1 --max-output 32 --kv-tokens-per-device 64 --max-num-seqs 8 --monitor-period-ms 250
      --link-gbps 0.7 --host-link-gbps 0.056)
# The real bench runs REPEATS times (default 3) and the table compares against the median of each
# figure: two runs of the same command here differed up to 2.8x, so one run is not a reference.
: > "$OUT/load.txt"
REAL=()
for ((k = 1; k <= ${REPEATS:-3}; ++k)); do
  echo "real run $k: load average before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
  KUN_LOG_LEVEL=${KUN_LOG_LEVEL:-warn} "${RUN[@]}" $BIN bench --in-process --preset llama-30m --policies "$POLICIES" "${OPTS[@]}" \
    --json "$OUT/real$k.json" --out-dir "$OUT/real$k" > "$OUT/real$k.log" 2>&1
  echo "real run $k: load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
  REAL+=("$OUT/real$k.json")
done
KUN_LOG_LEVEL=${KUN_LOG_LEVEL:-warn} $BIN simulate --gpu "$PROFILE" --policies "$POLICIES" "${OPTS[@]}" \
  --json "$OUT/sim.json" > "$OUT/sim.log" 2>&1
set +e
python3 scripts/validate_table.py "$OUT/sim.json" "${REAL[@]}" | tee "$OUT/table.md"
status=${PIPESTATUS[0]}
echo "profile: $PROFILE" | tee -a "$OUT/table.md"
cat "$OUT/load.txt" >> "$OUT/table.md"
exit "$status"
