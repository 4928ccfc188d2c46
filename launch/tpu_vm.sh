#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (v4, v5e, v5p, v6e; one host or many), from creation to cleanup.
#
#   launch/tpu_vm.sh create [--dry-run] TPU_NAME ZONE ACCELERATOR_TYPE [RUNTIME_VERSION] [--spot|--reserved]
#   launch/tpu_vm.sh setup  [--dry-run] TPU_NAME ZONE
#   launch/tpu_vm.sh train  [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_vm.sh logs   [--dry-run] TPU_NAME ZONE [WORKER]
#   launch/tpu_vm.sh status [--dry-run] TPU_NAME ZONE
#   launch/tpu_vm.sh stop   [--dry-run] TPU_NAME ZONE
#   launch/tpu_vm.sh delete [--dry-run] TPU_NAME ZONE
#   launch/tpu_vm.sh run    [--dry-run] [--spot|--reserved] [--runtime=VERSION] TPU_NAME ZONE
#                           ACCELERATOR_TYPE CONFIG WORKDIR [--config.x=y ...]
#
# create: a queued resource (spot, reserved or on demand), then waits until the slice is ACTIVE.
# setup:  installs this checkout's last commit (`git archive HEAD`) and its dependencies on
#         every worker, in a Python 3.11 environment made by uv (~/hdit-venv).
# train:  the same command on every worker, in the background; the log goes to
#         ~/hdit-train.log on each worker and, when the run ends, to WORKDIR/logs/.
# logs:   follows one worker's log (default worker 0). status: the slice and the training
#         processes. stop: SIGTERM to the training processes (they save a checkpoint and exit;
#         a `run` loop then ends instead of resuming).
# delete: the queued resource and its slice.
# run:    create, setup and train in the foreground; when the slice is preempted (or the run
#         stops early), waits, recreates the slice and resumes from the latest checkpoint in
#         WORKDIR, until the run reaches its last step. Give WORKDIR (and the data) on gs://.
# --dry-run prints the gcloud commands instead of running them, and needs neither gcloud nor git.
# RUNTIME_VERSION defaults to the one for the accelerator's generation (see default_runtime).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

DRY_RUN=0
TIER=""       # --spot | --reserved (run); create takes them after its arguments
RUNTIME=""    # --runtime=VERSION (run)
DRY_RUN_ATTEMPT=0   # the dry run of `run` shows one preemption: attempt 1 stops early
POLL_SECONDS=${HDIT_POLL_SECONDS:-30}
MAX_ATTEMPTS=${HDIT_MAX_ATTEMPTS:-100}

# Run a command, or print it (shell-quoted, one line) in a dry run. The printed lines go to
# fd 3, a copy of stdout that command substitutions do not capture.
exec 3>&1
run_cmd() {
  if ((DRY_RUN)); then
    {
      printf '+'
      printf ' %q' "$@"
      printf '\n'
    } >&3
  else
    "$@"
  fi
}

note() { printf '# %s\n' "$*" >&3; }

default_runtime() {
  case $1 in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5litepod* | v5e*) echo v2-alpha-tpuv5-lite ;;
    v4*) echo tpu-ubuntu2204-base ;;
    *) echo "unknown accelerator type $1: give RUNTIME_VERSION" >&2; exit 2 ;;
  esac
}

# The queued resource's state (ACTIVE, PROVISIONING, SUSPENDED, FAILED, ...), or NONE.
slice_state() {
  local tpu=$1 zone=$2
  if ((DRY_RUN)); then
    run_cmd gcloud compute tpus queued-resources describe "$tpu" --zone="$zone" \
      --format='value(state.state)'
    if ((DRY_RUN_ATTEMPT == 1)); then echo NONE; else echo SUSPENDED; fi
    return
  fi
  gcloud compute tpus queued-resources describe "$tpu" --zone="$zone" \
    --format='value(state.state)' 2>/dev/null || echo NONE
}

wait_active() {
  local tpu=$1 zone=$2 state
  while true; do
    if ((DRY_RUN)); then
      run_cmd gcloud compute tpus queued-resources describe "$tpu" --zone="$zone" \
        --format='value(state.state)'
      note "(until ACTIVE, every ${POLL_SECONDS} s)"
      return
    fi
    state=$(slice_state "$tpu" "$zone")
    case $state in
      ACTIVE) return ;;
      FAILED | SUSPENDED | NONE) echo "slice $tpu is $state" >&2; return 1 ;;
    esac
    note "slice $tpu is $state; waiting"
    sleep "$POLL_SECONDS"
  done
}

create() {
  local tpu=$1 zone=$2 accelerator=$3 runtime=${4:-$RUNTIME} tier=$TIER
  runtime=${runtime:-$(default_runtime "$accelerator")}
  local extra=()
  case $tier in
    --spot | --reserved) extra=("$tier") ;;
    "") ;;
    *) echo "unknown option $tier: --spot or --reserved" >&2; exit 2 ;;
  esac
  run_cmd gcloud compute tpus queued-resources create "$tpu" --node-id="$tpu" \
    --zone="$zone" --accelerator-type="$accelerator" --runtime-version="$runtime" \
    ${extra[@]+"${extra[@]}"}
  wait_active "$tpu" "$zone"
}

ssh_all() {
  local tpu=$1 zone=$2 command=$3
  run_cmd gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$command"
}

setup() {
  local tpu=$1 zone=$2
  local repo tarball
  repo=$(cd "$(dirname "$0")/.." && pwd)
  tarball=${TMPDIR:-/tmp}/hdit-jax-$$.tar.gz
  # Explicit checks: `set -e` does not apply inside a function called from an `||` list.
  if ((!DRY_RUN)) && [[ -n $(git -C "$repo" status --porcelain 2> /dev/null) ]]; then
    echo "warning: $repo has uncommitted changes; setup installs its last commit (HEAD)" \
      "without them: commit them first to ship them" >&2
  fi
  run_cmd git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD || return 1
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$tpu":hdit-jax.tar.gz --zone="$zone" \
    --worker=all || return 1
  # The TPU runtimes are Ubuntu 22.04, whose Python (3.10) is older than hdit-jax needs: uv
  # makes a Python 3.11 environment (~/hdit-venv), which tpu_worker.sh then uses.
  ssh_all "$tpu" "$zone" "set -e; rm -rf ~/hdit-jax ~/hdit-venv; mkdir -p ~/hdit-jax; \
tar -xzf ~/hdit-jax.tar.gz -C ~/hdit-jax; cd ~/hdit-jax; \
python3 -m pip install -q --user uv; python3 -m uv venv -q --python 3.11 ~/hdit-venv; \
python3 -m uv pip install -q --python ~/hdit-venv/bin/python 'jax[tpu]' -e ."
}

# The command every worker runs: launch/tpu_worker.sh with the arguments quoted for its shell.
worker_command() {
  local background=$1
  shift
  local quoted
  quoted=$(printf ' %q' "$@")
  if ((background)); then
    echo "cd ~/hdit-jax && nohup launch/tpu_worker.sh${quoted} > /dev/null 2>&1 < /dev/null & \
echo started on \$(hostname)"
  else
    echo "cd ~/hdit-jax && launch/tpu_worker.sh${quoted}"
  fi
}

train() {
  local tpu=$1 zone=$2 config=$3 workdir=$4
  shift 4
  ssh_all "$tpu" "$zone" "$(worker_command 1 "--config=$config" "--workdir=$workdir" "$@")"
  note "logs: launch/tpu_vm.sh logs $tpu $zone"
}

# `run`: train in the foreground on every worker until the run reaches its last step.
run_to_the_end() {
  local tpu=$1 zone=$2 accelerator=$3 config=$4 workdir=$5
  shift 5
  local attempt status state installed=0 setup_failures=0
  [[ -n $RUNTIME ]] || default_runtime "$accelerator" > /dev/null   # an unknown type: exit 2
  for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
    DRY_RUN_ATTEMPT=$attempt
    note "attempt $attempt"
    state=$(slice_state "$tpu" "$zone")
    case $state in
      ACTIVE) ;;
      NONE) ;;
      SUSPENDED | FAILED)
        note "slice $tpu is $state: deleting it to create it again"
        delete "$tpu" "$zone" || { sleep "$POLL_SECONDS"; continue; }
        state=NONE ;;
      *)   # queued, provisioning, being deleted or suspended: wait for it to settle
        note "slice $tpu is $state: waiting"
        sleep "$POLL_SECONDS"
        continue ;;
    esac
    if [[ $state == NONE ]]; then
      create "$tpu" "$zone" "$accelerator" || { sleep "$POLL_SECONDS"; continue; }
      installed=0
    fi
    if ((!installed)); then
      if ! setup "$tpu" "$zone"; then
        # Once may be the network; twice is the install itself, which waiting will not mend.
        if ((++setup_failures >= 2)); then
          echo "setup failed twice; the slice $tpu is still up:" \
            "launch/tpu_vm.sh delete $tpu $zone" >&2
          return 1
        fi
        note "setup failed: trying once more"
        sleep "$POLL_SECONDS"
        continue
      fi
      installed=1
    fi
    status=0
    ssh_all "$tpu" "$zone" "$(worker_command 0 "--config=$config" "--workdir=$workdir" "$@")" \
      || status=$?
    if ((DRY_RUN)); then
      if ((attempt == 1)); then
        status=75
        note "(dry run: attempt 1 is shown preempted, exit status 75)"
      else
        note "(dry run: attempt 2 is shown reaching the last step)"
      fi
    fi
    # 75: stopped early with a checkpoint (preempted); 255: ssh lost the workers (the slice
    # went away); above 128: killed by a signal. Anything else will not get better by itself.
    if ((status == 0)); then
      note "the run reached its last step"
      return 0
    elif ((status != 75 && status != 255 && status <= 128)); then
      echo "training ended with exit status $status (2: refused config, 1: failed, 3: stopped" \
        "by launch/tpu_vm.sh stop). Not retrying. The end of worker 0's log:" >&2
      run_cmd gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=0 \
        --command='tail -n 5 ~/hdit-train.log' >&2 || true
      echo "the slice $tpu is still up: launch/tpu_vm.sh delete $tpu $zone" >&2
      return "$status"
    fi
    note "training stopped (exit status $status): resuming from the latest checkpoint"
    ((DRY_RUN)) || sleep "$POLL_SECONDS"
  done
  echo "gave up after $MAX_ATTEMPTS attempts" >&2
  return 1
}

logs() {
  local tpu=$1 zone=$2 worker=${3:-0}
  run_cmd gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker="$worker" \
    --command='tail -n 200 -F ~/hdit-train.log'
}

status() {
  local tpu=$1 zone=$2
  run_cmd gcloud compute tpus queued-resources describe "$tpu" --zone="$zone" \
    --format='value(state.state)'
  # '[h]dit' matches the trainer but not the remote shell whose command line holds the pattern.
  ssh_all "$tpu" "$zone" "echo \$(hostname): \$(pgrep -f '[h]dit_jax[.]main' > /dev/null && \
echo training || echo not training); tail -n 1 ~/hdit-train.log 2> /dev/null || true"
}

stop() {
  # The marker makes tpu_worker.sh exit 3 (stopped), so that a `run` loop does not resume.
  ssh_all "$1" "$2" "touch ~/hdit-stop; pkill -TERM -f '[h]dit_jax[.]main' || true"
}

delete() {
  run_cmd gcloud compute tpus queued-resources delete "$1" --zone="$2" --force --quiet
}

main() {
  (($# >= 1)) || usage
  local subcommand=$1 arg args=()
  shift
  # Options anywhere (before, between or after the arguments); the training command's
  # --config.* overrides pass through in order. An unknown option is an error, never a
  # positional argument: a misplaced --dry-run must not run gcloud for real.
  for arg in "$@"; do
    case $arg in
      --dry-run) DRY_RUN=1 ;;
      --spot | --reserved) TIER=$arg ;;
      --runtime=*) RUNTIME=${arg#--runtime=} ;;
      --config.* | --config=*) args+=("$arg") ;;
      -*) echo "unknown option $arg (options: --dry-run, --spot, --reserved, --runtime=V;" \
             "training overrides: --config.KEY=VALUE)" >&2; exit 2 ;;
      *) args+=("$arg") ;;
    esac
  done
  set -- ${args[@]+"${args[@]}"}
  case $subcommand in
    create) (($# >= 3)) || usage; create "$@" ;;
    setup) (($# == 2)) || usage; setup "$@" ;;
    train) (($# >= 4)) || usage; train "$@" ;;
    logs) (($# == 2 || $# == 3)) || usage; logs "$@" ;;
    status) (($# == 2)) || usage; status "$@" ;;
    stop) (($# == 2)) || usage; stop "$@" ;;
    delete) (($# == 2)) || usage; delete "$@" ;;
    run) (($# >= 5)) || usage; run_to_the_end "$@" ;;
    -h | --help | help) usage ;;
    *) echo "unknown subcommand $subcommand" >&2; usage ;;
  esac
}

main "$@"
