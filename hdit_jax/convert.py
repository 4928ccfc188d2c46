"""k-diffusion HDiT checkpoints in and out of hdit-jax.

Reads (1) k-diffusion training checkpoints (`.pth` with `model`/`model_ema` state dicts and the
config; pickle, so only with `allow_pickle=True`), (2) inference safetensors (`convert_for_inference`
output, the config JSON in the metadata key `config`), (3) a plain state dict (safetensors, or
`.pth` with `allow_pickle`) plus a k-diffusion JSON config. Writes k-diffusion-loadable safetensors
(EMA weights, config in the metadata) and hdit-jax weight files.

CLI:
  python -m hdit_jax.convert import CKPT [--config=CFG.json] [--noema] [--allow_pickle] --output=W.safetensors
  python -m hdit_jax.convert export W.safetensors --output=KDIFF.safetensors [--dtype=fp16]

hdit-jax weight files (`weights`) carry σ_data, σ_min, σ_max and the sampler defaults; export
writes the σs into the k-diffusion config and keeps the hdit-jax config and settings in the
metadata, so export then import gives back the same config.
"""

import json
import os
import sys
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from absl import app, flags
from flax import nnx
from safetensors import numpy as st_numpy
from safetensors import safe_open

from hdit_jax import weights
from hdit_jax.models import build_model
from hdit_jax.models.spec import config_from_kdiffusion, config_to_kdiffusion

_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def _torch_key(path: tuple[Any, ...]) -> tuple[str, bool]:
  """PyTorch state_dict key of an hdit-jax state path, and whether the array is transposed."""
  name = ".".join(str(p) for p in path)
  if name.endswith(".kernel"):
    return name[: -len("kernel")] + "weight", True
  if name == "class_emb.embedding":
    return "class_emb.weight", False
  return name, False


def model_to_state_dict(model: nnx.Module, dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """The k-diffusion state_dict (numpy, PyTorch names and layouts) of an hdit-jax HDiT."""
  out = {}
  for path, var in weights.model_arrays(model).items():
    key, transpose = _torch_key(path)
    value = np.asarray(var[...], dtype=np.float32)
    if transpose:   # a kernel [in, *out] is PyTorch's weight [prod(out), in]
      value = value.reshape(value.shape[0], -1).T
    elif key.endswith(".bias"):
      value = value.reshape(-1)
    out[key] = np.ascontiguousarray(value).astype(dtype)
  return out


def load_state_dict_into(model: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> None:
  """Copy a k-diffusion state_dict into `model` in place; every key must match exactly."""
  targets = {}
  for path, var in weights.model_arrays(model).items():
    key, transpose = _torch_key(path)
    targets[key] = (var, transpose)
  weights.copy_arrays(targets, state_dict, "state_dict does not match the model")


def _load_pickle(path: str) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch)") from e
  # weights_only restricts unpickling to tensors and plain containers.
  return torch.load(path, map_location="cpu", weights_only=True)


KDIFF_SIGMA_DEFAULTS = {"sigma_data": 1.0, "sigma_min": 1e-2, "sigma_max": 80.0}   # k-diffusion's


def read_kdiffusion_checkpoint(path: str, config_path: str | None = None, *, use_ema: bool = True,
                               allow_pickle: bool = False
                               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(k-diffusion config, state_dict as numpy) of any of the three checkpoint kinds."""
  config, state_dict, _ = _read_checkpoint(path, config_path, use_ema, allow_pickle)
  return config, state_dict


def _read_checkpoint(path, config_path, use_ema, allow_pickle):
  """(config, state_dict, safetensors metadata) of a k-diffusion checkpoint."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  config, metadata = None, {}
  if path.endswith(".safetensors"):
    try:
      with safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    if "config" in metadata:
      config = json.loads(metadata["config"])
    state_dict = st_numpy.load_file(path)
  else:
    if not allow_pickle:
      raise ValueError(f"{path} is not a safetensors file; loading it unpickles data, which can "
                       "run code: pass allow_pickle=True (CLI: --allow_pickle) if you trust it")
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
  return config, state_dict, metadata


def _model_config(kdiff_config: Mapping[str, Any], metadata: Mapping[str, str]) -> dict[str, Any]:
  """The hdit-jax model config: the one hdit-jax stored on export when it still describes the
  same network as the k-diffusion config (it keeps what k-diffusion's format has no place for),
  else the one converted from the k-diffusion config."""
  converted = config_from_kdiffusion(kdiff_config)
  if weights.MODEL_CONFIG_KEY in metadata:
    stored = {k: tuple(v) if isinstance(v, list) else v
              for k, v in json.loads(metadata[weights.MODEL_CONFIG_KEY]).items()}
    if config_to_kdiffusion(stored) == config_to_kdiffusion(converted):
      return stored
  return converted


def kdiffusion_settings(kdiff_config: Mapping[str, Any],
                        metadata: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
  """Diffusion settings of a k-diffusion config (its defaults where unset), and the sampler
  settings that hdit-jax stored on export, if any."""
  model = kdiff_config.get("model", kdiff_config)
  diffusion = {k: float(model.get(k, v)) for k, v in KDIFF_SIGMA_DEFAULTS.items()}
  stored = json.loads((metadata or {}).get(weights.SETTINGS_KEY, "{}"))
  sampling = dict(stored.get("sampling", {}))
  sampling.setdefault("sigma_min", diffusion["sigma_min"])
  sampling.setdefault("sigma_max", diffusion["sigma_max"])
  return {"diffusion": diffusion, "sampling": sampling}


def model_from_kdiffusion(path: str, config_path: str | None = None, *, use_ema: bool = True,
                          allow_pickle: bool = False, dtype: str | None = None,
                          with_settings: bool = False):
  """An HDiT with a k-diffusion checkpoint's weights and its hdit-jax model config (and, with
  `with_settings`, its diffusion and sampler settings: see `kdiffusion_settings`). `dtype`: the
  compute dtype (default: the stored one, else float32)."""
  kdiff_config, state_dict, metadata = _read_checkpoint(path, config_path, use_ema, allow_pickle)
  model_cfg = _model_config(kdiff_config, metadata)
  if dtype or "dtype" not in model_cfg:
    model_cfg["dtype"] = dtype or "float32"
  model = build_model(model_cfg, rngs=nnx.Rngs(0))
  load_state_dict_into(model, state_dict)
  if with_settings:
    return model, model_cfg, kdiffusion_settings(kdiff_config, metadata)
  return model, model_cfg


def save_kdiffusion(model: nnx.Module, model_cfg: Mapping[str, Any], path: str, *,
                    dtype: str = "fp32", extra_config: Mapping[str, Any] | None = None,
                    settings: Mapping[str, Any] | None = None) -> None:
  """A safetensors file that k-diffusion loads as an inference checkpoint (config in metadata).

  `settings` (`weights.settings_from_config`): σ_data, σ_min and σ_max go into the k-diffusion
  config (k-diffusion would otherwise assume σ_data = 1); the metadata also keeps the hdit-jax
  config and settings for a lossless import.
  """
  config = dict(extra_config or {})
  config["model"] = {**config.get("model", {}), **config_to_kdiffusion(model_cfg)}
  if settings:
    config["model"].update(settings.get("diffusion", {}))
  dataset = dict(config.get("dataset", {}))
  dataset["num_classes"] = int(model_cfg.get("num_classes", 0))
  config["dataset"] = dataset
  tensors = model_to_state_dict(model, _DTYPES[dtype])
  metadata = {"config": json.dumps(config),
              weights.MODEL_CONFIG_KEY: json.dumps({k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in dict(model_cfg).items()})}
  if settings:
    metadata[weights.SETTINGS_KEY] = json.dumps(settings)
  st_numpy.save_file(tensors, path, metadata=metadata)


def _define_flags() -> None:
  flags.DEFINE_string("output", None, "File to write.")
  flags.DEFINE_string("config", None, "k-diffusion JSON config (import), if the checkpoint has none.")
  flags.DEFINE_bool("ema", True, "Import the EMA weights of a training checkpoint.")
  flags.DEFINE_bool("allow_pickle", False, "Allow reading pickled .pth files (runs their code).")
  flags.DEFINE_enum("dtype", "fp32", list(_DTYPES), "Export dtype.")


def main(argv: list[str]) -> None:
  """The command; a missing or unusable input file or value ends it in one line (exit 2)."""
  try:
    _main(argv)
  except (FileNotFoundError, ValueError, app.UsageError) as e:   # one line, not the whole help
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _main(argv: list[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) != 3 or argv[1] not in ("import", "export") or not FLAGS.output:
    raise app.UsageError("usage: python -m hdit_jax.convert import|export INPUT --output OUTPUT")
  command, source = argv[1], argv[2]
  if command == "import":
    model, model_cfg, settings = model_from_kdiffusion(
        source, FLAGS.config, use_ema=FLAGS.ema, allow_pickle=FLAGS.allow_pickle,
        with_settings=True)
    weights.save_weights(model, model_cfg, FLAGS.output, settings)
  else:
    model, model_cfg = weights.load_weights(source)
    save_kdiffusion(model, model_cfg, FLAGS.output, dtype=FLAGS.dtype,
                    settings=weights.load_settings(source))
  print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
