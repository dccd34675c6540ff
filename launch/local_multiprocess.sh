#!/usr/bin/env bash
# Runs `python -m diffax.main` as N processes on this machine, joined through 127.0.0.1 (CPU
# multi-process training, as on N hosts). Every argument after N goes to each process unchanged.
#
#   launch/local_multiprocess.sh 2 --config=experiments/mixture.py --workdir=/tmp/mixture
#   MODULE=diffax.fewstep.reflow launch/local_multiprocess.sh 2 --workdir=runs/rf --out=runs/rf/pairs
#
# Environment: MODULE (the program: diffax.main, or diffax.fewstep.reflow, the reflow pair job; default
# diffax.main), PORT (coordinator port, default 12355), DEVICES_PER_PROCESS (fake CPU devices per
# process, default 1), PYTHON (default python). Each process logs to <dir>/process_<i>.log, <dir> the
# --out directory if given, else the --workdir. The exit status is the first non-zero status of the
# processes (0 if all succeed); SIGTERM/SIGINT are passed on to every process, so a preempted job
# saves and stops cleanly.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES [flags of diffax.main, or of MODULE...]" >&2
  exit 2
fi
num=$1
shift
port=${PORT:-12355}
python=${PYTHON:-python}
module=${MODULE:-diffax.main}
devices=${DEVICES_PER_PROCESS:-1}
workdir=""
out=""
for arg in "$@"; do
  [[ "$arg" == --workdir=* ]] && workdir=${arg#--workdir=}
  [[ "$arg" == --out=* ]] && out=${arg#--out=}
done
logdir=${out:-$workdir}
[[ -n "$logdir" ]] && mkdir -p "$logdir"

cd "$(dirname "$0")/.."
# Each process gets its own device count (an inherited count flag is dropped).
xla_flags="--xla_force_host_platform_device_count=$devices $(sed 's/--xla_force_host_platform_device_count=[0-9]*//g' <<<"${XLA_FLAGS:-}")"
pids=()
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward TERM INT

for ((i = 0; i < num; i++)); do
  log=/dev/stderr
  [[ -n "$logdir" ]] && log="$logdir/process_$i.log"
  XLA_FLAGS="$xla_flags" JAX_PLATFORMS=cpu \
    "$python" -m "$module" --coordinator_address="127.0.0.1:$port" --num_processes="$num" \
    --process_id="$i" "$@" >"$log" 2>&1 &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  while true; do
    set +e
    wait "$pid"
    code=$?
    set -e
    # wait returns >128 when a trapped signal interrupts it; the process is still running then.
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [[ $code -ne 0 && $status -eq 0 ]]; then status=$code; fi
done
exit $status
