#!/usr/bin/env bash
# Train on several GPU hosts: run this on every host (e.g. from `srun` under SLURM, which
# jax.distributed.initialize() detects by itself), or set the coordinator by hand:
#
#   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \
#     launch/gpu_multihost.sh configs/imagenet256.py gs://BUCKET/runs/hdit-557m
#
# One process per host drives all of its GPUs; the mesh spans every GPU of every host.
set -euo pipefail
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
# NCCL's NVLink SHARP (multicast) collectives are off: not every fabric supports them.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec python3 -m hdit_jax.main --config="$config" --workdir="$workdir" "$@"
