#!/usr/bin/env bash
# Runs one MPI job for ctest and checks how it ended.
#   run_mpi.sh EXPECT REGEX NODE_BINARY -- mpirun-arguments...
# EXPECT: "ok" (exit 0), "fail" (nonzero exit) or "any" (mpirun --enable-recovery reports exit 0
# even after MPI_Abort: the output says how it ended). REGEX must match the job's output (empty:
# skip).
# Afterwards no process of NODE_BINARY started by this job may be left.
set -u
expect=$1; regex=$2; node=$3; shift 4
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# This job's processes carry a tag in their environment, so the check below finds only them (other
# tests may run the same binary at the same time).
export KUN_TEST_TAG="run_mpi-$$-$RANDOM"
ours() {
  for p in $(pgrep -f "^$node( |$)"); do
    if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "KUN_TEST_TAG=$KUN_TEST_TAG"; then echo "$p"; fi
  done
}
out=$(mktemp)
start=$(date +%s%N)
mpirun --oversubscribe --bind-to none --mca btl self,vader -x KUN_TEST_TAG "$@" >"$out" 2>&1
rc=$?
end=$(date +%s%N)
cat "$out"
echo "run_mpi.sh: exit $rc after $(( (end - start) / 1000000 )) ms"
status=0
if [[ $expect == ok && $rc -ne 0 ]]; then echo "run_mpi.sh: expected exit 0"; status=1; fi
if [[ $expect == fail && $rc -eq 0 ]]; then echo "run_mpi.sh: expected a nonzero exit"; status=1; fi
# Open MPI's PMIx error lines (printed by mpirun under --enable-recovery) can land in the middle of
# a rank's line: match with them cut out and the lines joined as well.
joined() { sed -E 's/\[[^]]*\] PMIX ERROR: [A-Z_-]+ in file [^ ]+ at line [0-9]+//g' "$out" | tr -d '\n'; }
if [[ -n $regex ]] && ! grep -Eq "$regex" "$out" && ! joined | grep -Eq "$regex"; then
  echo "run_mpi.sh: output does not match /$regex/"; status=1
fi
sleep 0.5
left=$(ours)
if [[ -n $left ]]; then
  echo "run_mpi.sh: processes left behind:"; ps -o pid,args -p $left; status=1
fi
rm -f "$out"
exit $status
