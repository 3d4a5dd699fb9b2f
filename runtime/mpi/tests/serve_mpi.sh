#!/usr/bin/env bash
# `kunserve serve --runtime mpi` end to end (ctest label mpi):
#   1. the same greedy completions over HTTP in-process and under mpirun with 4 device ranks;
#   2. a device rank killed (SIGKILL) while 4 streams run, under mpirun --enable-recovery: the front
#      end names the rank, open streams end with an SSE error event, the job ends within seconds
#      (exit 3 from rank 0), and no kunserve process is left.
#   serve_mpi.sh KUNSERVE_BINARY
set -u
K=$1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Every process this script starts carries a tag in its environment, so the checks below find only
# them (other tests may run kunserve at the same time).
export KUN_TEST_TAG="serve_mpi-$$-$RANDOM"
MPIRUN=(mpirun --oversubscribe --bind-to none --mca btl self,vader -x KUN_TEST_TAG)
COMMON=(serve --load-format dummy --preset tiny --port 0 --kv-tokens-per-device 512 --mpi-peer-timeout-ms 10000)
dir=$(mktemp -d)
status=0
fail() { echo "serve_mpi.sh: FAIL: $*"; status=1; }
ours() {  # pids of this script's kunserve serve processes
  for p in $(pgrep -f "^$K serve"); do
    if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "KUN_TEST_TAG=$KUN_TEST_TAG"; then echo "$p"; fi
  done
}
leftovers() { [[ -n $(ours) ]]; }
rank_pid() {  # rank -> pid of that rank's kunserve process
  for p in $(ours); do
    if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -q "^OMPI_COMM_WORLD_RANK=$1\$"; then echo "$p"; fi
  done
}

wait_port() {  # log -> port (from the banner), waits up to 60 s
  for _ in $(seq 1 600); do
    p=$(grep -o 'serving [^ ]* on http://127.0.0.1:[0-9]*' "$1" | grep -o '[0-9]*$' | head -1)
    if [[ -n $p ]]; then echo "$p"; return 0; fi
    sleep 0.1
  done
  return 1
}

complete_all() {  # port out
  : >"$2"
  for prompt in "hello world" "the quick brown fox jumps" "fused pipelines drop layers"; do
    curl -s -m 60 "http://127.0.0.1:$1/v1/completions" -H 'Content-Type: application/json' \
      -d "{\"model\":\"dummy-tiny\",\"prompt\":\"$prompt\",\"max_tokens\":24,\"temperature\":0}" |
      grep -o '"text":"[^"]*"' >>"$2"
  done
}

# 1. In-process, then MPI: same tokens.
"$K" "${COMMON[@]}" --devices 4 --max-seconds 60 >"$dir/inproc.log" 2>&1 &
pid=$!
port=$(wait_port "$dir/inproc.log") || fail "in-process server did not start"
complete_all "$port" "$dir/inproc.txt"
kill -TERM $pid; wait $pid

"${MPIRUN[@]}" -np 5 "$K" "${COMMON[@]}" --runtime mpi --max-seconds 120 >"$dir/mpi.log" 2>&1 &
mpid=$!
port=$(wait_port "$dir/mpi.log") || fail "MPI server did not start"
grep -q "runtime mpi: 4 device ranks" "$dir/mpi.log" || fail "no MPI banner"
complete_all "$port" "$dir/mpi.txt"
kill -TERM "$(rank_pid 0)"  # rank 0 drains, frees the device ranks, and all finalize
wait $mpid
rc=$?
[[ $rc -eq 0 ]] || fail "MPI serve exited $rc after SIGTERM to rank 0"
if [[ $(wc -l <"$dir/inproc.txt") -ne 3 ]]; then fail "in-process completions missing"; fi
if cmp -s "$dir/inproc.txt" "$dir/mpi.txt"; then
  echo "ok   3 greedy completions identical in-process and over 4 MPI device ranks"
else
  fail "completions differ:"; diff "$dir/inproc.txt" "$dir/mpi.txt"
fi

# 2. A device rank killed mid-stream.
"${MPIRUN[@]}" --enable-recovery -np 5 "$K" "${COMMON[@]}" --runtime mpi --max-seconds 120 >"$dir/kill.log" 2>&1 &
mpid=$!
port=$(wait_port "$dir/kill.log") || fail "MPI server (kill) did not start"
for i in 1 2 3 4; do
  curl -s -N -m 60 "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\":\"dummy-tiny\",\"prompt\":\"stream $i\",\"max_tokens\":1000,\"ignore_eos\":true,\"temperature\":0,\"stream\":true}" \
    >"$dir/stream$i.txt" 2>&1 &
done
sleep 1.5
victim=$(rank_pid 2)
[[ -n $victim ]] || fail "rank 2 not found"
killed_at=$(date +%s%N)
kill -9 "$victim"
wait $mpid
rc=$?
ended_ms=$(( ($(date +%s%N) - killed_at) / 1000000 ))
wait  # the curls
cat "$dir/kill.log" | grep -v "PMIX ERROR" | tail -20
grep -q "device rank 2 lost: rank 2 died" "$dir/kill.log" || fail "the front end did not name rank 2"
errors=$(grep -l '"error"' "$dir"/stream*.txt | wc -l)
[[ $errors -ge 1 ]] || fail "no stream got an error event"
echo "ok   rank 2 killed: job ended after $ended_ms ms (mpirun exit $rc), $errors of 4 streams ended with an error event"
[[ $ended_ms -lt 15000 ]] || fail "the job took $ended_ms ms to end"
sleep 0.5
if leftovers; then left=$(ours); fail "processes left behind:"; ps -o pid,args -p $left; kill -9 $left; fi
rm -rf "$dir"
exit $status
