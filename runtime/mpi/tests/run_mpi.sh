#!/usr/bin/env bash
# Runs one MPI job for ctest and checks how it ended.
#   run_mpi.sh EXPECT REGEX NODE_BINARY -- mpirun-arguments...
# EXPECT: "ok" (exit 0), "fail" (nonzero exit) or "any" (mpirun --enable-recovery reports exit 0
# even after MPI_Abort: the output says how it ended). REGEX must match the job's output (empty:
# skip).
# Afterwards no process of NODE_BINARY may be left.
set -u
expect=$1; regex=$2; node=$3; shift 4
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=$(mktemp)
start=$(date +%s%N)
mpirun --oversubscribe --bind-to none --mca btl self,vader "$@" >"$out" 2>&1
rc=$?
end=$(date +%s%N)
cat "$out"
echo "run_mpi.sh: exit $rc after $(( (end - start) / 1000000 )) ms"
status=0
if [[ $expect == ok && $rc -ne 0 ]]; then echo "run_mpi.sh: expected exit 0"; status=1; fi
if [[ $expect == fail && $rc -eq 0 ]]; then echo "run_mpi.sh: expected a nonzero exit"; status=1; fi
if [[ -n $regex ]] && ! grep -Eq "$regex" "$out"; then echo "run_mpi.sh: output does not match /$regex/"; status=1; fi
sleep 0.5
if pgrep -f "^$node( |$)" >/dev/null; then
  echo "run_mpi.sh: processes left behind:"; pgrep -af "^$node( |$)"; status=1
fi
rm -f "$out"
exit $status
