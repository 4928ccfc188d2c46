#!/usr/bin/env bash
# Train on several GPU hosts reachable by ssh (no scheduler), one process per host:
#
#   launch/gpu_ssh.sh [--dry-run] HOSTS CONFIG WORKDIR [--config.x=y ...]
#
# HOSTS is a comma-separated list (the first is the coordinator, port $HDIT_COORDINATOR_PORT,
# default 12345). Each host needs this checkout at the same path, installed (`pip install -e .`)
# and the data and WORKDIR readable (gs:// or a shared file system). The logs go to
# ~/hdit-train-HOST.log on each host. --dry-run prints the ssh commands without running them.
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
if (($# < 3)); then
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
fi
IFS=, read -r -a hosts <<< "$1"
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
port=${HDIT_COORDINATOR_PORT:-12345}
quoted=$(printf ' %q' "$@")
pids=()
for i in "${!hosts[@]}"; do
  host=${hosts[$i]}
  remote="cd $(printf %q "$repo") && JAX_COORDINATOR_ADDRESS=${hosts[0]}:$port \
JAX_NUM_PROCESSES=${#hosts[@]} JAX_PROCESS_ID=$i launch/gpu_multihost.sh${quoted} \
> ~/hdit-train-$host.log 2>&1"
  if ((dry_run)); then
    printf '+ ssh %q %q\n' "$host" "$remote"
  else
    # shellcheck disable=SC2029  # expanded here on purpose: the remote command is built above
    ssh "$host" "$remote" &
    pids+=($!)
  fi
done
status=0
for pid in ${pids[@]+"${pids[@]}"}; do
  wait "$pid" || status=$?
done
exit "$status"
