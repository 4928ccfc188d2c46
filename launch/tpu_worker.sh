#!/usr/bin/env bash
# One TPU worker's share of a run (launch/tpu_vm.sh starts it on every worker):
#
#   launch/tpu_worker.sh --config=CONFIG --workdir=WORKDIR [--config.x=y ...]
#
# Trains, with the log in ~/hdit-train.log, copies the log to WORKDIR/logs/HOSTNAME.log when the
# run ends, and exits with the trainer's status (0: last step reached, 75: stopped early with a
# checkpoint saved, 2: refused, 1: failed), or 3 when `launch/tpu_vm.sh stop` stopped it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
log=~/hdit-train.log
workdir=""
for arg in "$@"; do
  case $arg in --workdir=*) workdir=${arg#--workdir=} ;; esac
done
rm -f ~/hdit-stop
python=~/hdit-venv/bin/python   # made by launch/tpu_vm.sh setup
[[ -x $python ]] || python=python3
"$python" -m hdit_jax.main "$@" > "$log" 2>&1
status=$?
if [[ -e ~/hdit-stop ]]; then   # launch/tpu_vm.sh stop: not a preemption to resume from
  echo "stopped by launch/tpu_vm.sh stop" >> "$log"
  status=3
fi
if [[ -n $workdir ]]; then
  target="$workdir/logs/$(hostname).log"
  if [[ $workdir == gs://* ]]; then
    gcloud storage cp "$log" "$target" > /dev/null 2>&1 || echo "could not copy the log to $target"
  else
    mkdir -p "$workdir/logs" && cp "$log" "$target"
  fi
fi
exit "$status"
