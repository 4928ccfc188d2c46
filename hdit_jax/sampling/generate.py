"""Draw images from a model with any k-diffusion sampler and guidance, compiled once, on a mesh.

Image i of a run is a function of the key and i alone: its starting noise, its sampler noise and
(when drawn) its label come from `fold_in(key, i)`. The batch is split over the mesh, so N images
drawn on one device or on 64 are the same N images. The jitted sampler is built once per (model
structure, settings) and reused: further calls of the same shapes cost the steady-state time.
"""

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hdit_jax.diffusion import schedules
from hdit_jax.diffusion.guidance import guided_denoiser
from hdit_jax.diffusion.preconditioning import denoise
from hdit_jax.diffusion.samplers import SAMPLERS
from hdit_jax.models.partitioning import kernels_on_mesh

# Samplers with an eta (ancestral / SDE noise) option.
_ETA_SAMPLERS = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                           "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpm_fast",
                           "dpm_adaptive"})
# Sub-streams of an image's key.
_NOISE, _SAMPLER, _LABEL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Everything besides the weights that decides the samples (hashable: a compile-cache key)."""
  sampler: str = "dpmpp_3m_sde"
  steps: int = 50
  sigma_min: float = 0.01
  sigma_max: float = 80.0
  rho: float = 7.0
  eta: float = 1.0
  sigma_data: float = 0.5
  guidance_scale: float = 1.0
  guidance_interval: tuple[float, float] | None = None

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {sorted(SAMPLERS)}")
    if self.steps < 1:
      raise ValueError(f"sampling steps must be at least 1, got {self.steps}")
    if not 0 < self.sigma_min < self.sigma_max:
      raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
    if self.guidance_interval is not None and len(self.guidance_interval) != 2:
      raise ValueError("guidance_interval takes two noise levels (sigma_lo, sigma_hi), got "
                       f"{self.guidance_interval}")

  @classmethod
  def from_config(cls, config: Any, **overrides: Any) -> "SamplerSettings":
    """From a config's `sampling` and `diffusion` sections (sigma_max 0: the diffusion one)."""
    s, d = config.sampling, config.diffusion
    interval = tuple(float(v) for v in s.get("guidance_interval") or ()) or None
    values = dict(sampler=s.sampler, steps=int(s.steps), sigma_min=float(s.sigma_min),
                  sigma_max=float(s.sigma_max or d.sigma_max), rho=float(s.rho),
                  eta=float(s.eta), sigma_data=float(d.sigma_data),
                  guidance_scale=float(s.guidance_scale), guidance_interval=interval)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def sample_fn(settings: SamplerSettings):
  """run(denoiser, x_T, noise_fn) -> x_0 for the settings' sampler (k-diffusion's names)."""
  fn = SAMPLERS[settings.sampler]
  options = {"eta": settings.eta} if settings.sampler in _ETA_SAMPLERS else {}
  lo, hi = settings.sigma_min, settings.sigma_max
  if settings.sampler == "dpm_fast":
    return lambda d, x, noise: fn(d, x, lo, hi, settings.steps, noise_fn=noise, **options)
  if settings.sampler == "dpm_adaptive":
    # Its step-size control is shared by the batch: images depend on their batch-mates.
    return lambda d, x, noise: fn(d, x, lo, hi, noise_fn=noise, **options)
  sigmas = schedules.karras(settings.steps, lo, hi, settings.rho)
  return lambda d, x, noise: fn(d, x, sigmas, noise_fn=noise, **options)


def image_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
  """One key per image index."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


@functools.lru_cache(maxsize=64)
def _compiled_sampler(graphdef: Any, settings: SamplerSettings, num_classes: int,
                      image_shape: tuple[int, int, int], batch: NamedSharding):
  """jit(sample)(state, key_data, indices, labels) -> images [B, H, W, C] in [-1, 1], the batch
  split as `batch` says (also inside: sharded weights must not pull it elsewhere)."""
  run = sample_fn(settings)

  def per_image_normal(keys, stream):
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), image_shape))(keys)

  def sample(state, key_data, indices, labels):
    with kernels_on_mesh(batch.mesh, batch.spec[0]):
      return sample_on_mesh(state, key_data, indices, labels)

  def sample_on_mesh(state, key_data, indices, labels):
    model = nnx.merge(graphdef, state)
    keys = image_keys(jax.random.wrap_key_data(key_data), indices)
    x_t = jax.lax.with_sharding_constraint(per_image_normal(keys, _NOISE) * settings.sigma_max,
                                           batch)
    sampler_keys = jax.vmap(lambda k: jax.random.fold_in(k, _SAMPLER))(keys)
    noise = lambda i, *_: per_image_normal(sampler_keys, i)

    def denoiser(x, sigma, **cond):
      return denoise(model, x, sigma, settings.sigma_data, **cond)
    d = denoiser
    if num_classes:
      d = guided_denoiser(denoiser, labels, num_classes, settings.guidance_scale,
                          settings.guidance_interval)
    return run(d, x_t, noise)

  return jax.jit(sample, out_shardings=batch)


@functools.lru_cache(maxsize=8)
def _labels_fn(num_classes: int):
  def draw(key_data, indices):
    keys = image_keys(jax.random.wrap_key_data(key_data), indices)
    return jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, _LABEL), (), 0,
                                                 num_classes))(keys)
  return jax.jit(draw)


def random_labels(key: jax.Array, num_classes: int, start: int, count: int) -> np.ndarray:
  """The labels that `generate` draws for images start .. start + count - 1."""
  indices = jnp.arange(start, start + count, dtype=jnp.int32)
  return np.asarray(_labels_fn(num_classes)(_key_data(key), indices), np.int32)


def default_mesh() -> Mesh:
  """All devices of all hosts along one batch axis."""
  return Mesh(np.asarray(jax.devices()), ("batch",))


def batch_shards(mesh: Mesh, batch_axes: Sequence[str] | None = None) -> int:
  axes = tuple(batch_axes or mesh.axis_names)
  return int(np.prod([mesh.shape[a] for a in axes]))


def _key_data(key: jax.Array) -> np.ndarray:
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.asarray(key, np.uint32)


def _global(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a value every host holds in full (works across hosts)."""
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _on_mesh(leaf: Any, mesh: Mesh) -> Any:
  """Weights already on `mesh` (the sharded EMA of training) stay; others are replicated."""
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
    return leaf
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    # A dropout layer's RNG key (unused by the deterministic sampler): moved as its raw data.
    data = _global(np.asarray(jax.device_get(jax.random.key_data(leaf))), NamedSharding(mesh, P()))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
  return _global(np.asarray(jax.device_get(leaf)), NamedSharding(mesh, P()))


def generate(model: nnx.Module, config: Any, key: jax.Array, num_images: int,
             labels: jax.Array | np.ndarray | None = None, *, start: int = 0,
             image_size: tuple[int, int] | None = None, mesh: Mesh | None = None,
             batch_axes: Sequence[str] | None = None,
             settings: SamplerSettings | None = None, **overrides: Any) -> jax.Array:
  """Images start .. start + num_images - 1 of the run `key`: [N, H, W, C] in [-1, 1], unclipped.

  `model`: use the EMA weights; weights not yet on `mesh` are replicated onto it in place.
  Class-conditional models get `labels` [N] (default: drawn per
  image, see `random_labels`) and classifier-free guidance (`settings.guidance_scale`).
  `settings` default to the config's (`SamplerSettings.from_config(config, **overrides)`).
  The batch is split over `batch_axes` of `mesh` (default: every device along one axis; pass the
  training mesh and its batch axes to sample from sharded weights). Every host must call this;
  the result is a global array sharded over the batch.
  """
  if num_images < 1:
    raise ValueError(f"num_images must be at least 1, got {num_images}")
  settings = settings or SamplerSettings.from_config(config, **overrides)
  mesh = mesh or default_mesh()
  axes = tuple(batch_axes or mesh.axis_names)
  shards = batch_shards(mesh, axes)
  padded = -(-num_images // shards) * shards       # a multiple of the batch shards
  h, w = image_size or tuple(config.model.input_size)
  image_shape = (int(h), int(w), int(config.model.input_channels))
  num_classes = int(config.model.get("num_classes", 0))
  if settings.guidance_scale != 1.0 and not num_classes:
    raise ValueError(f"guidance_scale {settings.guidance_scale} needs a class-conditional "
                     "model; this one is unconditional (use guidance_scale 1)")

  batch = NamedSharding(mesh, P(axes))
  key_data = _key_data(key)
  indices = np.arange(start, start + padded, dtype=np.int32)
  if num_classes:
    if labels is None:
      labels = random_labels(key, num_classes, start, num_images)
    labels = np.asarray(labels, np.int32)
    if labels.shape != (num_images,):
      raise ValueError(f"labels must have shape ({num_images},), got {labels.shape}")
    if labels.min() < 0 or labels.max() > num_classes:
      raise ValueError(f"labels must be in [0, {num_classes}] ({num_classes}: the null class)")
    labels = _global(np.pad(labels, (0, padded - num_images)), batch)
  # Sampling never drops: a model loaded for inference (a weight file's) may still be in
  # training mode. The view shares the model's variables, so the placement below sticks.
  model = nnx.view(model, deterministic=True, raise_if_not_found=False)
  graphdef, state = nnx.split(model)
  placed = jax.tree.map(lambda leaf: _on_mesh(leaf, mesh), state)
  if any(a is not b for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(state))):
    nnx.update(model, placed)   # once: later calls find the weights on the mesh
  state = placed
  sampler = _compiled_sampler(graphdef, settings, num_classes, image_shape, batch)
  images = sampler(state, _global(key_data, NamedSharding(mesh, P())), _global(indices, batch),
                   labels)
  return images if padded == num_images else images[:num_images]
