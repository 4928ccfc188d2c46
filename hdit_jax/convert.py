"""k-diffusion HDiT checkpoints in and out of hdit-jax.

Reads (1) k-diffusion training checkpoints (`.pth` with `model`/`model_ema` state dicts and the
config; pickle, so only with `allow_pickle=True`), (2) inference safetensors (`convert_for_inference`
output, the config JSON in the metadata key `config`), (3) a plain state dict (safetensors, or
`.pth` with `allow_pickle`) plus a k-diffusion JSON config. Writes k-diffusion-loadable safetensors
(EMA weights, config in the metadata) and hdit-jax weight files.

CLI:
  python -m hdit_jax.convert import CKPT [--config CFG.json] [--no-ema] [--allow-pickle] --output W.safetensors
  python -m hdit_jax.convert export W.safetensors --output KDIFF.safetensors [--dtype fp16]
"""

import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, flags
from flax import nnx
from safetensors import numpy as st_numpy
from safetensors import safe_open

from hdit_jax.models import build_model
from hdit_jax.models.layers import Buffer
from hdit_jax.models.spec import config_from_kdiffusion, config_to_kdiffusion

WEIGHTS_CONFIG_KEY = "hdit_jax_model_config"
_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def _torch_key(path: tuple[Any, ...]) -> tuple[str, bool]:
  """PyTorch state_dict key of an hdit-jax state path, and whether the array is transposed."""
  name = ".".join(str(p) for p in path)
  if name.endswith(".kernel"):
    return name[: -len("kernel")] + "weight", True
  if name == "class_emb.embedding":
    return "class_emb.weight", False
  return name, False


def _model_arrays(model: nnx.Module) -> dict[tuple[Any, ...], Any]:
  state = nnx.state(model, nnx.Any(nnx.Param, Buffer))
  return {path: var for path, var in nnx.to_flat_state(state)}


def model_to_state_dict(model: nnx.Module, dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """The k-diffusion state_dict (numpy, PyTorch names and layouts) of an hdit-jax HDiT."""
  out = {}
  for path, var in _model_arrays(model).items():
    key, transpose = _torch_key(path)
    value = np.asarray(var[...], dtype=np.float32)
    out[key] = np.ascontiguousarray(value.T if transpose else value).astype(dtype)
  return out


def load_state_dict_into(model: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> None:
  """Copy a k-diffusion state_dict into `model` in place; every key must match exactly."""
  targets = {}
  for path, var in _model_arrays(model).items():
    key, transpose = _torch_key(path)
    targets[key] = (var, transpose)
  _copy_arrays(targets, state_dict, "state_dict does not match the model")


def _copy_arrays(targets: dict[str, tuple[nnx.Variable, bool]], tensors: Mapping[str, Any],
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
    if value.shape != var.shape:
      raise ValueError(f"{name}: stored shape {value.shape} (in hdit-jax layout), model "
                       f"expects {var.shape}")
    var[...] = jnp.asarray(value, var.dtype)


def _load_pickle(path: str) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch)") from e
  # weights_only restricts unpickling to tensors and plain containers.
  return torch.load(path, map_location="cpu", weights_only=True)


def read_kdiffusion_checkpoint(path: str, config_path: str | None = None, *, use_ema: bool = True,
                               allow_pickle: bool = False
                               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(k-diffusion config, state_dict as numpy) of any of the three checkpoint kinds."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  config = None
  if path.endswith(".safetensors"):
    with safe_open(path, framework="numpy") as f:
      metadata = f.metadata() or {}
    if "config" in metadata:
      config = json.loads(metadata["config"])
    state_dict = st_numpy.load_file(path)
  else:
    if not allow_pickle:
      raise ValueError(f"{path} is not a safetensors file; loading it unpickles data, which can "
                       "run code: pass allow_pickle=True (CLI: --allow-pickle) if you trust it")
    obj = _load_pickle(path)
    if isinstance(obj, dict) and ("model" in obj or "model_ema" in obj):
      config = obj.get("config")
      obj = obj["model_ema" if use_ema and "model_ema" in obj else "model"]
    state_dict = {k: v.float().numpy() for k, v in obj.items()}
  if config_path is not None:
    if not os.path.exists(config_path):
      raise FileNotFoundError(f"config not found: {config_path}")
    with open(config_path) as f:
      config = json.load(f)
  if config is None:
    raise ValueError(f"{path} carries no config: pass the k-diffusion JSON config "
                     "(config_path / --config)")
  return config, state_dict


def model_from_kdiffusion(path: str, config_path: str | None = None, *, use_ema: bool = True,
                          allow_pickle: bool = False, dtype: str = "float32"
                          ) -> tuple[nnx.Module, dict[str, Any]]:
  """An HDiT with a k-diffusion checkpoint's weights, and its hdit-jax model config."""
  kdiff_config, state_dict = read_kdiffusion_checkpoint(
      path, config_path, use_ema=use_ema, allow_pickle=allow_pickle)
  model_cfg = config_from_kdiffusion(kdiff_config)
  model_cfg["dtype"] = dtype
  model = build_model(model_cfg, rngs=nnx.Rngs(0))
  load_state_dict_into(model, state_dict)
  return model, model_cfg


def save_kdiffusion(model: nnx.Module, model_cfg: Mapping[str, Any], path: str, *,
                    dtype: str = "fp32", extra_config: Mapping[str, Any] | None = None) -> None:
  """A safetensors file that k-diffusion loads as an inference checkpoint (config in metadata)."""
  config = dict(extra_config or {})
  config["model"] = {**config.get("model", {}), **config_to_kdiffusion(model_cfg)}
  dataset = dict(config.get("dataset", {}))
  dataset["num_classes"] = int(model_cfg.get("num_classes", 0))
  config["dataset"] = dataset
  tensors = model_to_state_dict(model, _DTYPES[dtype])
  st_numpy.save_file(tensors, path, metadata={"config": json.dumps(config)})


def save_weights(model: nnx.Module, model_cfg: Mapping[str, Any], path: str) -> None:
  """An hdit-jax weight file: parameters and buffers by state path, the model config in metadata."""
  tensors = {".".join(map(str, p)): np.asarray(v[...]) for p, v in _model_arrays(model).items()}
  st_numpy.save_file(tensors, path, metadata={WEIGHTS_CONFIG_KEY: json.dumps(dict(model_cfg))})


def load_weights(path: str, **overrides: Any) -> tuple[nnx.Module, dict[str, Any]]:
  """The model saved by `save_weights` (config entries in `overrides`, e.g. dtype, replace it)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  with safe_open(path, framework="numpy") as f:
    metadata = f.metadata() or {}
  if WEIGHTS_CONFIG_KEY not in metadata:
    raise ValueError(f"{path} is not an hdit-jax weight file (no {WEIGHTS_CONFIG_KEY} metadata)")
  # JSON has no tuples; configs hold per-level settings as tuples.
  stored = {k: tuple(v) if isinstance(v, list) else v
            for k, v in json.loads(metadata[WEIGHTS_CONFIG_KEY]).items()}
  model_cfg = {**stored, **overrides}
  model = build_model(model_cfg, rngs=nnx.Rngs(0))
  tensors = st_numpy.load_file(path)
  targets = {".".join(map(str, p)): (v, False) for p, v in _model_arrays(model).items()}
  _copy_arrays(targets, tensors, f"{path} does not match its config")
  return model, model_cfg


def _define_flags() -> None:
  flags.DEFINE_string("output", None, "File to write.")
  flags.DEFINE_string("config", None, "k-diffusion JSON config (import), if the checkpoint has none.")
  flags.DEFINE_bool("ema", True, "Import the EMA weights of a training checkpoint.")
  flags.DEFINE_bool("allow_pickle", False, "Allow reading pickled .pth files (runs their code).")
  flags.DEFINE_enum("dtype", "fp32", list(_DTYPES), "Export dtype.")


def main(argv: list[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) != 3 or argv[1] not in ("import", "export") or not FLAGS.output:
    raise app.UsageError("usage: python -m hdit_jax.convert import|export INPUT --output OUTPUT")
  command, source = argv[1], argv[2]
  if command == "import":
    model, model_cfg = model_from_kdiffusion(source, FLAGS.config, use_ema=FLAGS.ema,
                                             allow_pickle=FLAGS.allow_pickle)
    save_weights(model, model_cfg, FLAGS.output)
  else:
    model, model_cfg = load_weights(source)
    save_kdiffusion(model, model_cfg, FLAGS.output, dtype=FLAGS.dtype)
  print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
