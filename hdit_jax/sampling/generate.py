"""Draw images from a model: Karras noise schedule, any k-diffusion sampler, guidance."""

from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hdit_jax.diffusion import schedules
from hdit_jax.diffusion.guidance import guided_denoiser
from hdit_jax.diffusion.preconditioning import denoise
from hdit_jax.diffusion.samplers import SAMPLERS

# Samplers with an eta (ancestral / SDE noise) option.
_ETA_SAMPLERS = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                           "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpm_fast",
                           "dpm_adaptive"})


def sample_fn(sampler: str, steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
              eta: float = 1.0, **options):
  """run(denoiser, x_T, key) -> x_0 for a sampler name (k-diffusion's names)."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
  fn = SAMPLERS[sampler]
  if sampler in _ETA_SAMPLERS:
    options["eta"] = eta
  if sampler == "dpm_fast":
    return lambda d, x, key: fn(d, x, sigma_min, sigma_max, steps, key=key, **options)
  if sampler == "dpm_adaptive":
    return lambda d, x, key: fn(d, x, sigma_min, sigma_max, key=key, **options)
  sigmas = schedules.karras(steps, sigma_min, sigma_max, rho)
  return lambda d, x, key: fn(d, x, sigmas, key=key, **options)


def generate(model: nnx.Module, config: Any, key: jax.Array, num_images: int,
             labels: jax.Array | None = None, *, image_size: tuple[int, int] | None = None,
             guidance_scale: float | None = None, mesh: jax.sharding.Mesh | None = None
             ) -> jax.Array:
  """num_images samples [N, H, W, C] in [-1, 1] (not clipped) from `model` (use the EMA weights).

  Class-conditional models get `labels` (random classes when None) and classifier-free guidance
  with config.sampling.guidance_scale. With `mesh`, the batch is split over its devices.
  """
  s = config.sampling
  sigma_max = s.sigma_max or config.diffusion.sigma_max
  run = sample_fn(s.sampler, int(s.steps), float(s.sigma_min), float(sigma_max), float(s.rho),
                  float(s.eta))
  h, w = image_size or tuple(config.model.input_size)
  shape = (num_images, h, w, int(config.model.input_channels))
  num_classes = int(config.model.get("num_classes", 0))
  k_noise, k_labels, k_sampler = jax.random.split(key, 3)
  if num_classes and labels is None:
    labels = jax.random.randint(k_labels, (num_images,), 0, num_classes)
  scale = float(s.guidance_scale if guidance_scale is None else guidance_scale)
  interval = tuple(s.guidance_interval) if s.get("guidance_interval") else None
  x_t = jax.random.normal(k_noise, shape) * sigma_max
  if mesh is not None:
    x_t = jax.device_put(x_t, NamedSharding(mesh, P(mesh.axis_names)))

  @nnx.jit
  def sample(model, x_t, labels, key):
    def denoiser(x, sigma, **cond):
      return denoise(model, x, sigma, config.diffusion.sigma_data, **cond)
    if num_classes:
      d = guided_denoiser(denoiser, labels, num_classes, scale, interval)
    else:
      d = denoiser
    return run(d, x_t, key)

  return sample(model, x_t, labels, k_sampler)
