"""Export of the EMA weights alone, for sampling (and on to k-diffusion through the converter)."""

import tempfile
from typing import Any

from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from hdit_jax import convert


def export_ema(config: Any, model_def: Any, state: Any, path: str, *, write: bool = True) -> None:
  """Write the EMA model as an hdit-jax weight file (`convert.load_weights` reads it).

  Every host must call this (the sharded weights are gathered); only those with `write` write.
  """
  ema = multihost_utils.process_allgather(state.ema, tiled=True)
  buffers = multihost_utils.process_allgather(state.buffers, tiled=True)
  if not write:
    return
  model = nnx.merge(model_def.graphdef, ema, buffers, model_def.rng_state)
  model_cfg = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
               for k, v in config.model.to_dict().items()}
  if "://" not in path:
    convert.save_weights(model, model_cfg, path)
    return
  with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
    convert.save_weights(model, model_cfg, tmp.name)
    epath.Path(path).write_bytes(epath.Path(tmp.name).read_bytes())
