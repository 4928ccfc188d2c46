"""Training noise-level densities (k-diffusion's `sigma_sample_density`, spec section 3.3).

Each density is a monotone map from u in [0, 1) to sigma, fed by stratified uniforms so that
one optimizer step covers the noise range evenly across devices and accumulation steps.
"""

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.scipy.special import logit, ndtri

DENSITIES = ("lognormal", "loglogistic", "loguniform", "v-diffusion", "cosine",
             "cosine-interpolated", "split-lognormal")


def stratified_uniform(key: jax.Array, batch_size: int, groups: int = 1) -> jax.Array:
  """u [batch_size] in [0, 1): one sample in each of batch_size equal strata.

  The batch is `groups` contiguous groups (devices x accumulation steps) of B samples; sample j
  of group g takes stratum j * groups + g, as the official trainer's per-process strata, so every
  group spans the whole range.
  """
  if batch_size % groups:
    raise ValueError(f"batch size {batch_size} is not divisible into {groups} strata groups")
  per_group = batch_size // groups
  g = jnp.arange(groups)[:, None]
  j = jnp.arange(per_group)[None, :]
  strata = (j * groups + g).reshape(-1)
  return (strata + jax.random.uniform(key, (batch_size,))) / batch_size


def lognormal(u, loc: float, scale: float):
  u = u * (1 - 2e-7) + 1e-7
  return jnp.exp(loc + scale * ndtri(u))


def loglogistic(u, loc: float, scale: float, min_value: float = 0.0,
                max_value: float = math.inf):
  """Logistic in log sigma, truncated to [min_value, max_value]."""
  cdf = lambda s: jax.nn.sigmoid((jnp.log(s) - loc) / scale) if s > 0 else 0.0
  lo, hi = cdf(min_value), (1.0 if math.isinf(max_value) else cdf(max_value))
  return jnp.exp(loc + scale * logit(lo + u * (hi - lo)))


def loguniform(u, min_value: float, max_value: float):
  return jnp.exp(math.log(min_value) + u * (math.log(max_value) - math.log(min_value)))


def v_diffusion(u, sigma_data: float, min_value: float = 1e-3, max_value: float = 1e3):
  """sigma = sd tan(pi/2 t), t uniform between the angles of the bounds (the cosine schedule)."""
  c_lo = 2 / math.pi * math.atan(min_value / sigma_data)
  c_hi = 2 / math.pi * math.atan(max_value / sigma_data)
  return sigma_data * jnp.tan(math.pi / 2 * (c_lo + u * (c_hi - c_lo)))


def cosine_interpolated(u, sigma_data: float, image_d: float, noise_d_low: float,
                        noise_d_high: float, min_value: float = 1e-3, max_value: float = 1e3):
  """HDiT's density: the log-SNR of the cosine schedule shifted for a noise_d_low^2 image at high
  noise and for noise_d_high^2 at low noise, interpolated linearly in u (simple diffusion).

  u = 0 gives max_value, u = 1 gives min_value.
  """

  def logsnr(u, shift):
    t_a = math.atan(max_value / sigma_data * math.exp(shift / 2))
    t_b = math.atan(min_value / sigma_data * math.exp(shift / 2))
    return -2 * jnp.log(jnp.tan(t_a + u * (t_b - t_a))) + shift

  shift_lo = 2 * math.log(noise_d_low / image_d)
  shift_hi = 2 * math.log(noise_d_high / image_d)
  lam = (1 - u) * logsnr(u, shift_lo) + u * logsnr(u, shift_hi)
  return sigma_data * jnp.exp(-lam / 2)


def split_lognormal(key: jax.Array, shape, loc: float, scale_1: float, scale_2: float):
  """Two half-normals in log sigma, left with probability scale_1 / (scale_1 + scale_2)."""
  k_n, k_side = jax.random.split(key)
  n = jnp.abs(jax.random.normal(k_n, shape))
  left = jax.random.uniform(k_side, shape) < scale_1 / (scale_1 + scale_2)
  return jnp.exp(jnp.where(left, loc - n * scale_1, loc + n * scale_2))


def make_density(cfg: Mapping[str, Any], *, sigma_data: float, image_size: int
                 ) -> Callable[[jax.Array, int, int], jax.Array]:
  """sample(key, batch_size, groups) -> sigma [batch_size] for a `diffusion.sigma_density` config.

  Keys: type; loc, scale (lognormal, loglogistic, split-lognormal with scale_2); min_value,
  max_value (loglogistic, loguniform, v-diffusion, cosine-interpolated); noise_d_low,
  noise_d_high, image_d (cosine-interpolated; 0 means the image size).
  """
  kind = cfg["type"]
  get = lambda k, default: cfg.get(k, default) or default
  lo, hi = get("min_value", 1e-3), get("max_value", 1e3)
  if kind == "lognormal":
    transform = lambda u: lognormal(u, cfg.get("loc", -1.2), get("scale", 1.2))
  elif kind == "loglogistic":
    transform = lambda u: loglogistic(u, cfg.get("loc", math.log(sigma_data)),
                                      get("scale", 0.5), cfg.get("min_value", 0.0),
                                      get("max_value", math.inf))
  elif kind == "loguniform":
    transform = lambda u: loguniform(u, lo, hi)
  elif kind in ("v-diffusion", "cosine"):
    transform = lambda u: v_diffusion(u, sigma_data, lo, hi)
  elif kind == "cosine-interpolated":
    image_d = get("image_d", image_size)
    transform = lambda u: cosine_interpolated(
        u, sigma_data, image_d, get("noise_d_low", 32), get("noise_d_high", image_d), lo, hi)
  elif kind == "split-lognormal":
    # Not stratified, as in the official code.
    return lambda key, batch_size, groups=1: split_lognormal(
        key, (batch_size,), cfg.get("loc", -1.2), get("scale", 1.2), get("scale_2", 1.2))
  else:
    raise ValueError(f"diffusion.sigma_density.type {kind!r} is not one of {DENSITIES}")
  return lambda key, batch_size, groups=1: transform(stratified_uniform(key, batch_size, groups))
