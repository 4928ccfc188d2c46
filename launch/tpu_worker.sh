#!/usr/bin/env bash
# One TPU worker's share of a run (launch/tpu_vm.sh starts it on every worker):
#
#   launch/tpu_worker.sh --config=CONFIG --workdir=WORKDIR [--config.x=y ...]
#
# Trains, with the log in ~/hdit-train.log, copies the log to WORKDIR/logs/HOSTNAME.log when the
# run ends, and exits with the trainer's status (0: last step reached, 75: stopped early with a
# checkpoint saved, 2: refused).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
log=~/hdit-train.log
workdir=""
for arg in "$@"; do
  case $arg in --workdir=*) workdir=${arg#--workdir=} ;; esac
done
python3 -m hdit_jax.main "$@" > "$log" 2>&1
status=$?
if [[ -n $workdir ]]; then
  target="$workdir/logs/$(hostname).log"
  if [[ $workdir == gs://* ]]; then
    gcloud storage cp "$log" "$target" > /dev/null 2>&1 || echo "could not copy the log to $target"
  else
    mkdir -p "$workdir/logs" && cp "$log" "$target"
  fi
fi
exit "$status"
