#!/usr/bin/env bash
# Rehearse a multi-host run on this machine: N processes, each with its own fake CPU devices,
# joined through jax.distributed on a loopback coordinator.
#
#   launch/local.sh N CMD [ARGS...]        e.g. launch/local.sh 2 lm pretrain --config configs/shakespeare.yaml
#
# Environment (all optional):
#   LM_LOCAL_DEVICES  CPU devices per process (default 4)
#   LM_PORT           coordinator port (default: a free one)
#   LM_HEARTBEAT_S    seconds before the others give up on a dead process (default 10)
#   LM_GRACE_S        after one process fails, seconds the others get to exit on their own
#                     before they are killed (default 30)
# Every process shares this terminal; only process 0 prints progress. The exit status is that
# of the first process to fail (0 if all succeed).
#
# SIGTERM or Ctrl-C to this script is passed to every process as SIGTERM: they agree on a step,
# checkpoint it and exit 0 (this script then exits 0, or 130 after Ctrl-C). A second Ctrl-C
# kills them at once.
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES CMD [ARGS...]" >&2
  exit 2
fi
num=$1
shift

port=${LM_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

export JAX_PLATFORMS=cpu
export JAX_NUM_CPU_DEVICES=${LM_LOCAL_DEVICES:-4}
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export LM_COORDINATOR=127.0.0.1:$port
export LM_NUM_PROCESSES=$num
export LM_HEARTBEAT_S=${LM_HEARTBEAT_S:-10}
export LM_SHUTDOWN_TIMEOUT_S=${LM_SHUTDOWN_TIMEOUT_S:-30}

workers=()
watchdog=
cleanup() {
  for pid in "${workers[@]}" $watchdog; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
stopping=0 interrupted=0
stop_workers() {
  ((stopping)) && return
  stopping=1
  kill -TERM "${workers[@]}" 2>/dev/null || true
}
on_interrupt() {
  if ((interrupted)); then
    kill -KILL "${workers[@]}" 2>/dev/null || true
    exit 130
  fi
  interrupted=1
  # The workers ignore SIGINT (background jobs of a script), so Ctrl-C reaches them only this way.
  stop_workers
}
trap stop_workers TERM
trap on_interrupt INT

for ((i = 0; i < num; i++)); do
  LM_PROCESS_ID=$i "$@" &
  workers+=($!)
done

status=0
running=("${workers[@]}")
while ((${#running[@]})); do
  code=0 finished=
  wait -n -p finished "${running[@]}" || code=$?
  [[ -n ${finished:-} ]] || continue # a signal to this script ended the wait, not a process
  still=()
  for pid in "${running[@]}"; do [[ $pid == "$finished" ]] || still+=("$pid"); done
  running=("${still[@]}")
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    grace=${LM_GRACE_S:-30}
    echo "launch/local.sh: a process exited with status $code; the others get ${grace}s to exit" >&2
    (
      trap 'kill $! 2>/dev/null; exit 0' TERM
      sleep "$grace" &
      wait $!
      kill "${running[@]}" 2>/dev/null
    ) >/dev/null 2>&1 &
    watchdog=$!
  fi
done
((interrupted && status == 0)) && exit 130
exit "$status"
