"""A model and its sampling config from a weight file: hdit-jax's, or a k-diffusion checkpoint."""

from typing import Any

from flax import nnx

from hdit_jax import convert, weights
from hdit_jax.config import base_config


def load_model_file(*, weights_path: str | None = None, kdiffusion: str | None = None,
                    kdiffusion_config: str | None = None, allow_pickle: bool = False,
                    dtype: str | None = None) -> tuple[nnx.Module, Any]:
  """(model, full config) where the config's model section, σ_data, σ_min, σ_max and sampler
  defaults are those stored with the weights (k-diffusion's defaults for what it leaves unset)."""
  if bool(weights_path) == bool(kdiffusion):
    raise ValueError("give exactly one of an hdit-jax weight file and a k-diffusion checkpoint")
  if weights_path:
    overrides = {"dtype": dtype} if dtype else {}
    model, model_cfg = weights.load_weights(weights_path, **overrides)
    settings = weights.load_settings(weights_path)
  else:
    model, model_cfg, settings = convert.model_from_kdiffusion(
        kdiffusion, kdiffusion_config, allow_pickle=allow_pickle, dtype=dtype, with_settings=True)
  config = base_config()
  config.model = dict(model_cfg)
  weights.apply_settings(config, settings)
  return model, config
