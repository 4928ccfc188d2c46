#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice (v4, v5e, v5p, v6e; one or many hosts).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/imagenet256.py gs://BUCKET/runs/hdit-557m [--config.x=y ...]
#
# Installs hdit-jax from this checkout on every worker (copied with scp), then runs the same
# command on all of them; jax.distributed.initialize() joins the hosts. Re-running the script
# resumes from the latest checkpoint in the workdir (also after a preemption).
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(mktemp --suffix=.tar.gz)
git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
gcloud compute tpus tpu-vm scp "$tarball" "$tpu":hdit-jax.tar.gz --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  mkdir -p ~/hdit-jax && tar -xzf ~/hdit-jax.tar.gz -C ~/hdit-jax
  cd ~/hdit-jax
  pip install -q 'jax[tpu]' -e .
  nohup python3 -m hdit_jax.main --config=$config --workdir=$workdir $* > ~/hdit-train.log 2>&1 &
  echo started on \$(hostname)
"
echo "logs: gcloud compute tpus tpu-vm ssh $tpu --zone=$zone --worker=0 --command='tail -f ~/hdit-train.log'"
