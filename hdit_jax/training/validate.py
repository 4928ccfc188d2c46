"""Config checks that run before anything is compiled, each error naming the offending key."""

import math
from typing import Any

import jax

from hdit_jax.config import base_config
from hdit_jax.data.sources import SOURCES
from hdit_jax.data.transforms import FITS
from hdit_jax.diffusion.densities import DENSITIES
from hdit_jax.diffusion.losses import WEIGHTINGS
from hdit_jax.evaluation.digits import NUM_CLASSES as DIGIT_CLASSES
from hdit_jax.evaluation.evaluator import evaluation_settings
from hdit_jax.sampling.generate import SamplerSettings
from hdit_jax.training.mesh import mesh_shape
from hdit_kernels import qk_norm_rope
from hdit_kernels.neighborhood_attention import IMPLEMENTATIONS as NA_IMPLEMENTATIONS

# Sections whose keys must be a subset of the base config's (the model section has its own
# checks in the model specs).
_CHECKED_SECTIONS = ("diffusion", "optimizer", "ema", "data", "training", "sampling",
                     "evaluation", "mesh")
METRICS = ("", "fid", "digits")
# The backend each named kernel runs on (a kernel is lowered for its own platform only).
_KERNEL_BACKENDS = {"pallas_tpu": "tpu", "pallas_gpu": "gpu", "mosaic_gpu": "gpu"}


def _unknown_keys(config: Any, reference: Any, prefix: str) -> list[str]:
  unknown = []
  for key in config.keys():
    if key not in reference:
      unknown.append(prefix + key)
    elif hasattr(config[key], "keys") and hasattr(reference[key], "keys"):
      unknown += _unknown_keys(config[key], reference[key], f"{prefix}{key}.")
  return unknown


class ConfigError(ValueError):
  """A config or workdir that cannot run; the message names the key and what to change."""


def validate_config(config: Any, num_devices: int, num_processes: int = 1,
                    backend: str | None = None) -> None:
  """Raise ConfigError for the first class of problems found in `config`; `backend` (default
  jax's) is where the named kernels must run."""
  try:
    _validate(config, num_devices, num_processes)
    _validate_kernels(config.model, backend or jax.default_backend())
  except ConfigError:
    raise
  except ValueError as err:   # the checks of the model specs and sampler settings
    raise ConfigError(str(err)) from err


def _validate(config: Any, num_devices: int, num_processes: int) -> None:
  base = base_config()
  unknown = [k for k in config.keys() if k not in base]
  for section in _CHECKED_SECTIONS:
    if section in config:
      unknown += _unknown_keys(config[section], base[section], f"{section}.")
  if unknown:
    raise ValueError(f"unknown config keys: {sorted(unknown)}")

  model = config.model
  kind = model.get("type", "hdit")
  height, width = tuple(model.input_size)
  if kind == "hdit":
    from hdit_jax.models.spec import hdit_spec_from_config  # pylint: disable=import-outside-toplevel
    hdit_spec_from_config(model).token_grids(height, width)
  elif kind == "dit":
    from hdit_jax.models.dit import dit_spec_from_config  # pylint: disable=import-outside-toplevel
    spec = dit_spec_from_config(model)
    if height % spec.patch_size or width % spec.patch_size:
      raise ValueError(f"model.input_size {height}x{width} is not divisible by the DiT patch "
                       f"size {spec.patch_size}")
  else:
    raise ValueError(f"model.type must be 'hdit' or 'dit', got {kind!r}")
  if int(config.data.image_size) != height or height != width:
    raise ValueError(f"data.image_size = {config.data.image_size} must equal the square "
                     f"model.input_size = {tuple(model.input_size)}")

  sizes = dict(zip(("data", "fsdp", "tensor"), mesh_shape(config.mesh, num_devices)))
  batch_shards = sizes["data"] * sizes["fsdp"]
  accum = int(config.training.grad_accum_steps)
  batch = int(config.data.batch_size)
  if accum < 1:
    raise ValueError(f"training.grad_accum_steps must be >= 1, got {accum}")
  if batch % (batch_shards * accum):
    raise ValueError(f"data.batch_size = {batch} cannot be split over the mesh's "
                     f"{batch_shards} batch shards (data x fsdp) x {accum} accumulation steps")
  if batch % num_processes:
    raise ValueError(f"data.batch_size = {batch} is not divisible by {num_processes} hosts")

  lr = float(config.optimizer.lr)
  if not (math.isfinite(lr) and lr > 0):
    raise ValueError(f"optimizer.lr must be a positive number, got {config.optimizer.lr}")
  diffusion = config.diffusion
  if diffusion.loss_weighting not in WEIGHTINGS:
    raise ValueError(f"diffusion.loss_weighting {diffusion.loss_weighting!r} is not one of "
                     f"{WEIGHTINGS}")
  if diffusion.sigma_density.type not in DENSITIES:
    raise ValueError(f"diffusion.sigma_density.type {diffusion.sigma_density.type!r} is not "
                     f"one of {DENSITIES}")
  if diffusion.sigma_data <= 0 or not 0 < diffusion.sigma_min < diffusion.sigma_max:
    raise ValueError("diffusion needs sigma_data > 0 and 0 < sigma_min < sigma_max")
  if not 0 <= diffusion.cond_dropout_rate < 1:
    raise ValueError("diffusion.cond_dropout_rate must be in [0, 1)")
  if config.data.source not in SOURCES:
    raise ValueError(f"data.source must be one of {SOURCES}, got {config.data.source!r}")
  if config.data.fit not in FITS:
    raise ValueError(f"data.fit must be one of {FITS}, got {config.data.fit!r}")
  if config.data.source in ("prepared", "folder") and not config.data.name:
    raise ValueError(f"data.source = {config.data.source!r} needs data.name, the dataset's "
                     "directory (local or gs://)")
  if int(config.data.read_threads) < 1 or int(config.data.prefetch_buffer) < 1:
    raise ValueError("data.read_threads and data.prefetch_buffer must be >= 1")
  if int(config.training.num_steps) < 1:
    raise ValueError("training.num_steps must be >= 1")
  for key in ("checkpoint_retries", "max_consecutive_checkpoint_failures"):
    if int(config.training[key]) < 0:
      raise ValueError(f"training.{key} must be >= 0, got {config.training[key]}")
  if float(config.training.checkpoint_host_timeout) <= 0:
    raise ValueError("training.checkpoint_host_timeout must be > 0 (seconds), got "
                     f"{config.training.checkpoint_host_timeout}")
  if int(config.training.max_consecutive_nonfinite) < 0:
    raise ValueError("training.max_consecutive_nonfinite must be >= 0 (0: stop at the first "
                     "non-finite step)")

  _validate_sampling(config)


def _validate_kernels(model: Any, backend: str) -> None:
  """model.attention_implementation and model.qk_implementation: known names, for this backend."""
  for key, names in (("attention_implementation", NA_IMPLEMENTATIONS),
                     ("qk_implementation", qk_norm_rope.IMPLEMENTATIONS)):
    name = model.get(key, "") or ""
    if not name:
      continue
    if name not in names:
      raise ValueError(f"model.{key} {name!r} is not one of {('',) + tuple(names)} ('' picks "
                       "the default)")
    needs = _KERNEL_BACKENDS.get(name)
    if needs and needs != backend:
      raise ValueError(f"model.{key} {name!r} runs on {needs.upper()}s, and this run's backend "
                       f"is {backend}: use '' (the default) or 'xla'")


def _validate_sampling(config: Any) -> None:
  """The sampler settings of periodic samples and of evaluation, checked before training."""
  conditional = bool(config.model.get("num_classes", 0))
  try:
    sampling = SamplerSettings.from_config(config)
  except ValueError as err:
    raise ValueError(f"sampling: {err}") from err
  for section, settings in (("sampling", sampling), ("evaluation", evaluation_settings(config))):
    if settings.guidance_scale != 1.0 and not conditional:
      raise ValueError(f"{section}.guidance_scale = {settings.guidance_scale}, but the model is "
                       "unconditional (model.num_classes = 0): guidance needs classes; use 1.0")
  evaluation = config.evaluation
  if evaluation.metric not in METRICS:
    raise ValueError(f"evaluation.metric must be one of {METRICS}, got {evaluation.metric!r}")
  classes = int(config.model.get("num_classes", 0))
  if evaluation.metric == "digits" and classes not in (0, DIGIT_CLASSES):
    raise ValueError(f"evaluation.metric = 'digits' scores the {DIGIT_CLASSES} digit classes, but "
                     f"model.num_classes = {classes}: set model.num_classes = {DIGIT_CLASSES} "
                     "(or 0) for a digit dataset")
  if evaluation.metric and int(evaluation.num_samples) < 2:
    raise ValueError("evaluation.num_samples must be at least 2")
  if evaluation.metric == "fid" and not evaluation.inception_weights:
    raise ValueError("evaluation.metric = 'fid' needs evaluation.inception_weights: pytorch-fid's "
                     "pt_inception-2015-12-05-6726825d.pth (see the README, Evaluation)")
  if int(evaluation.every) < 0 or int(config.training.sample_every) < 0:
    raise ValueError("evaluation.every and training.sample_every must be >= 0")

