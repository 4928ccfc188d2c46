"""Entry point: train, sample, or export, from an ml_collections config.

  python -m hdit_jax.main --config=configs/imagenet256.py --workdir=gs://BUCKET/run
  python -m hdit_jax.main --config=configs/quickstart.py --workdir=/tmp/q --mode=sample

Run the same command on every host of a TPU slice; `jax.distributed.initialize()` finds the
others (it is skipped on one host).
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory, local or gs://.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "export"],
                          "train: train (resuming from the latest checkpoint); sample: write a "
                          "grid and an .npz from the latest checkpoint's EMA weights; export: "
                          "write the EMA weights as an hdit-jax weight file.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "sample: number of images.")
_SEED = flags.DEFINE_integer("seed", 0, "sample: random seed.")


def initialize_distributed() -> None:
  """Join the other hosts: TPU slices, SLURM and Open MPI are detected by JAX; elsewhere set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
  explicit = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    explicit = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                    process_id=int(os.environ["JAX_PROCESS_ID"]))
  try:
    jax.distributed.initialize(**explicit)
  except (ValueError, RuntimeError) as e:
    # Nothing announces other processes: a single host. A multi-host environment must not
    # silently fall back to independent runs.
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get(
        "JAX_COORDINATOR_ADDRESS"):
      raise
    logging.info("single host (%s)", e)


def main(argv):
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  initialize_distributed()
  logging.info("JAX %s: process %d of %d, %d devices", jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count())
  config = _CONFIG.value
  if _MODE.value == "train":
    from hdit_jax.training.trainer import train  # pylint: disable=import-outside-toplevel
    train(config, _WORKDIR.value)
  else:
    from hdit_jax.sampling import cli  # pylint: disable=import-outside-toplevel
    if _MODE.value == "sample":
      cli.sample_from_workdir(config, _WORKDIR.value, _NUM_IMAGES.value, _SEED.value)
    else:
      cli.export_from_workdir(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
