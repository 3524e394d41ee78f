#!/usr/bin/env bash
# N processes on this machine, each with its own CPU devices, joined by
# jax.distributed on 127.0.0.1: the multi-host code path of a pod, runnable
# on a laptop.
#
#   launch/local_multiprocess.sh N [CONFIG] [WORKDIR] [extra flags...]
#
# Defaults: CONFIG=configs/tiny.py, WORKDIR=workdirs/local_multiprocess,
# DEVICES_PER_PROCESS=4 (environment). Logs go to WORKDIR/process_<i>.log;
# the script exits non-zero if any process fails.
set -euo pipefail
N="${1:?usage: launch/local_multiprocess.sh N [CONFIG] [WORKDIR] [flags...]}"
CONFIG="${2:-configs/tiny.py}"
WORKDIR="${3:-workdirs/local_multiprocess}"
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PORT="${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
mkdir -p "$WORKDIR"
pids=()
for (( i = 0; i < N; i++ )); do
  CAC_COORDINATOR="127.0.0.1:$PORT" CAC_NUM_PROCESSES="$N" CAC_PROCESS_ID="$i" \
  JAX_NUM_CPU_DEVICES="${DEVICES_PER_PROCESS:-4}" \
    "$PY" -m cac_jax.main --multihost --config="$CONFIG" --workdir="$WORKDIR" "$@" \
    > "$WORKDIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $WORKDIR/process_$i.log" >&2; status=1
  fi
done
tail -n 3 "$WORKDIR/process_0.log"
exit "$status"
