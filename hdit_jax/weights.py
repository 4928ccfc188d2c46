"""hdit-jax weight files: safetensors of the parameters by state path, with what sampling needs.

The metadata holds the model config and the diffusion and sampler settings that the weights were
trained with (σ_data, σ_min, σ_max, the default sampler, steps and guidance), so a weight file
samples correctly without flags. k-diffusion interop lives in `convert`.
"""

import json
import os
import tempfile
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import numpy as st_numpy
from safetensors import safe_open

from hdit_jax.models import build_model
from hdit_jax.models.layers import Buffer

MODEL_CONFIG_KEY = "hdit_jax_model_config"
SETTINGS_KEY = "hdit_jax_settings"
DIFFUSION_SETTINGS = ("sigma_data", "sigma_min", "sigma_max")
SAMPLING_SETTINGS = ("sampler", "steps", "eta", "rho", "guidance_scale", "guidance_interval",
                     "sigma_min", "sigma_max")


def model_arrays(model: nnx.Module) -> dict[tuple[Any, ...], nnx.Variable]:
  """Every parameter and buffer of a model by its state path."""
  state = nnx.state(model, nnx.Any(nnx.Param, Buffer))
  return {path: var for path, var in nnx.to_flat_state(state)}


def _splits_last_axis(stored: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
  lead = len(stored) - 1
  return (len(wanted) > len(stored) and stored[:lead] == wanted[:lead]
          and stored[lead] == int(np.prod(wanted[lead:])))


def copy_arrays(targets: dict[str, tuple[nnx.Variable, bool]], tensors: Mapping[str, Any],
                mismatch: str) -> None:
  """Assign tensors[name] (transposed where asked) to each target; names and shapes must match."""
  missing = sorted(set(targets) - set(tensors))
  unexpected = sorted(set(tensors) - set(targets))
  if missing or unexpected:
    raise ValueError(f"{mismatch}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                     f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
  for name, (var, transpose) in targets.items():
    value = np.asarray(tensors[name])
    value = value.T if transpose else value
    if value.shape != var.shape and _splits_last_axis(value.shape, var.shape):
      # A fused projection stored flat (PyTorch's layout, or files written before its output
      # axes were kept apart): the same values, the last axis split.
      value = value.reshape(var.shape)
    if value.shape != var.shape:
      raise ValueError(f"{name}: stored shape {value.shape} (in hdit-jax layout), model "
                       f"expects {var.shape}")
    var[...] = jnp.asarray(value, var.dtype)


def _plain(value: Any) -> Any:
  return list(value) if isinstance(value, (list, tuple)) else value


def settings_from_config(config: Any) -> dict[str, dict[str, Any]]:
  """The diffusion and sampler settings of a full config, as stored in a weight file."""
  sampling = {k: _plain(config.sampling[k]) for k in SAMPLING_SETTINGS}
  sampling["sigma_max"] = float(config.sampling.sigma_max or config.diffusion.sigma_max)
  return {"diffusion": {k: float(config.diffusion[k]) for k in DIFFUSION_SETTINGS},
          "sampling": sampling}


def apply_settings(config: Any, settings: Mapping[str, Mapping[str, Any]]) -> None:
  """Set a config's diffusion and sampling sections from stored settings (in place)."""
  for section in ("diffusion", "sampling"):
    values = dict(settings.get(section, {}))
    if "guidance_interval" in values:
      values["guidance_interval"] = tuple(values["guidance_interval"] or ())
    config[section].update(values)


def save_weights(model: nnx.Module, model_cfg: Mapping[str, Any], path: str,
                 settings: Mapping[str, Any] | None = None) -> None:
  """Write the weight file (local or gs://); `settings` from `settings_from_config`."""
  tensors = {".".join(map(str, p)): np.asarray(v[...]) for p, v in model_arrays(model).items()}
  metadata = {MODEL_CONFIG_KEY: json.dumps({k: _plain(v) for k, v in dict(model_cfg).items()})}
  if settings:
    metadata[SETTINGS_KEY] = json.dumps(settings)
  if "://" not in path:
    st_numpy.save_file(tensors, path, metadata=metadata)
    return
  with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
    st_numpy.save_file(tensors, tmp.name, metadata=metadata)
    epath.Path(path).write_bytes(epath.Path(tmp.name).read_bytes())


def _metadata(path: str) -> dict[str, str]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  try:
    with safe_open(path, framework="numpy") as f:
      metadata = f.metadata() or {}
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a readable safetensors file ({e}); is it damaged, or a "
                     "k-diffusion checkpoint (use --kdiffusion)?") from e
  if MODEL_CONFIG_KEY not in metadata:
    raise ValueError(f"{path} is not an hdit-jax weight file (no {MODEL_CONFIG_KEY} metadata); "
                     "for a k-diffusion checkpoint use `python -m hdit_jax.convert import`")
  return metadata


def load_settings(path: str) -> dict[str, dict[str, Any]]:
  """The stored diffusion and sampler settings ({} for files written without them)."""
  return json.loads(_metadata(path).get(SETTINGS_KEY, "{}"))


def load_model_config(path: str) -> dict[str, Any]:
  # JSON has no tuples; configs hold per-level settings as tuples.
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in json.loads(_metadata(path)[MODEL_CONFIG_KEY]).items()}


def load_weights(path: str, **overrides: Any) -> tuple[nnx.Module, dict[str, Any]]:
  """The model saved by `save_weights` (config entries in `overrides`, e.g. dtype, replace it)."""
  model_cfg = {**load_model_config(path), **overrides}
  model = build_model(model_cfg, rngs=nnx.Rngs(0))
  tensors = st_numpy.load_file(path)
  targets = {".".join(map(str, p)): (v, False) for p, v in model_arrays(model).items()}
  copy_arrays(targets, tensors, f"{path} does not match its config")
  return model, model_cfg
