"""Export of the EMA weights alone, for sampling (and on to k-diffusion through the converter)."""

import os
from typing import Any

from flax import nnx
from jax.experimental import multihost_utils

from hdit_jax import weights


def ema_path(workdir: str, step: int) -> str:
  """Where a workdir's EMA weights of `step` are exported."""
  return os.path.join(workdir, f"ema_{step:08d}.safetensors")


def export_ema(config: Any, model_def: Any, state: Any, path: str, *, write: bool = True) -> None:
  """Write the EMA model as an hdit-jax weight file (`weights.load_weights` reads it), with the
  config's diffusion and sampler settings.

  Every host must call this (the sharded weights are gathered); only those with `write` write.
  """
  ema = multihost_utils.process_allgather(state.ema, tiled=True)
  buffers = multihost_utils.process_allgather(state.buffers, tiled=True)
  if not write:
    return
  model = nnx.merge(model_def.graphdef, ema, buffers, model_def.rng_state)
  weights.save_weights(model, config.model.to_dict(), path, weights.settings_from_config(config))
