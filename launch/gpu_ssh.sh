#!/usr/bin/env bash
# Train on several GPU hosts reachable by ssh (no scheduler), one process per host:
#
#   launch/gpu_ssh.sh [--dry-run] HOSTS CONFIG WORKDIR [--config.x=y ...]
#
# HOSTS is a comma-separated list (the first is the coordinator, port $HDIT_COORDINATOR_PORT,
# default 12345). Each host needs this checkout at the same path, installed (`pip install -e .`)
# and the data and WORKDIR readable (gs:// or a shared file system). The logs go to
# ~/hdit-train-HOST.log on each host. --dry-run, anywhere on the command line, prints the ssh
# commands without running them; an option the script does not know is refused.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

unknown_option() {
  echo "unknown option $1 (options: --dry-run; training flags: --config.KEY=VALUE," \
    "--FLAG=VALUE)" >&2
  exit 2
}

# Options anywhere (before, between or after the arguments); the trainer's --config.x=y
# overrides (and its other --flag=value flags, e.g. --mode=sample) pass through in order. An
# unknown option is an error, never a training argument: a misplaced or misspelt --dry-run must
# not ssh for real.
dry_run=0
args=()
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1 ;;
    -h | --help) usage ;;
    --config.*) args+=("$arg") ;;
    --dry*) unknown_option "$arg" ;;
    --?*=*) args+=("$arg") ;;
    -*) unknown_option "$arg" ;;
    *) args+=("$arg") ;;
  esac
done
set -- ${args[@]+"${args[@]}"}
if (($# < 3)); then
  usage
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
