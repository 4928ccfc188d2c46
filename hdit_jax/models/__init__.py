"""Flax NNX models: the Hourglass Diffusion Transformer and the DiT baseline.

They know nothing of diffusion or training: `model(x, sigma, aug_cond, class_cond)` maps an
NHWC image (already scaled by c_in) and noise levels to the network output F.
"""

from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from hdit_jax.models.hdit import HDiT
from hdit_jax.models.spec import HDiTSpec, hdit_spec_from_config
from hdit_kernels import qk_norm_rope


def build_model(cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
  """The model that a config's `model` section describes (`type` 'hdit' or 'dit')."""
  kind = cfg.get("type", "hdit")
  dtype = jnp.dtype(cfg.get("dtype", "float32"))
  param_dtype = jnp.dtype(cfg.get("param_dtype", "float32"))
  if kind == "hdit":
    return HDiT(hdit_spec_from_config(cfg), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                remat=bool(cfg.get("remat", False)),
                attention_implementation=cfg.get("attention_implementation") or None,
                qk_implementation=(cfg.get("qk_implementation")
                                   or qk_norm_rope.default_implementation()))
  if kind == "dit":
    from hdit_jax.models import dit  # pylint: disable=import-outside-toplevel
    return dit.DiT(dit.dit_spec_from_config(cfg), rngs=rngs, dtype=dtype,
                   param_dtype=param_dtype, remat=bool(cfg.get("remat", False)))
  raise ValueError(f"model.type must be 'hdit' or 'dit', got {kind!r}")


__all__ = ["HDiT", "HDiTSpec", "build_model", "hdit_spec_from_config"]
