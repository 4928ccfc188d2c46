"""The EDM training loss with k-diffusion's weightings (spec section 3.2).

Per sample: w(sigma) * mean_{H,W,C}((F(c_in x, sigma) - T)^2) with target
T = (x0 - c_skip x) / c_out and x = x0 + sigma * noise; the optimised scalar is the batch mean.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hdit_jax.diffusion.preconditioning import edm_scalings

WEIGHTINGS = ("karras", "soft-min-snr", "snr")


def loss_weight(sigma: jax.Array, sigma_data: float,
                weighting: str | Callable[[jax.Array], jax.Array]) -> jax.Array:
  """w(sigma) in F space.

  'karras': 1 (EDM's lambda = 1/c_out^2 in denoiser space). 'soft-min-snr' (HDiT):
  (sigma sd)^2 / (sigma^2 + sd^2)^2, a smooth min(SNR, sd^-2) in x0 space. 'snr':
  sd^2 / (sigma^2 + sd^2), epsilon-prediction MSE. A callable is applied to sigma.
  """
  if callable(weighting):
    return weighting(sigma)
  sd2, s2 = sigma_data ** 2, jnp.square(sigma)
  if weighting == "karras":
    return jnp.ones_like(sigma)
  if weighting == "soft-min-snr":
    return s2 * sd2 / jnp.square(s2 + sd2)
  if weighting == "snr":
    return sd2 / (s2 + sd2)
  raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS} "
                   "or a callable")


def dct_matrix(n: int) -> np.ndarray:
  """Orthonormal DCT-II matrix [n, n]: y = M @ x."""
  k, i = np.arange(n)[:, None], np.arange(n)[None, :]
  m = np.sqrt(2.0 / n) * np.cos(math.pi * (2 * i + 1) * k / (2 * n))
  m[0] /= math.sqrt(2.0)
  return m


def dct_frequency_weights(height: int, width: int, scales: int) -> np.ndarray:
  """w[i, j] = min(g_H[i], g_W[j]), g_n = min(-log2(linspace(0.5/n, 0.5, n)), scales)."""
  g = lambda n: np.minimum(-np.log2(np.linspace(0.5 / n, 0.5, n)), scales)
  return np.minimum(g(height)[:, None], g(width)[None, :])


def squared_error(out: jax.Array, target: jax.Array, scales: int = 1) -> jax.Array:
  """Per-sample mean squared error [B] of NHWC tensors; scales > 1 weights DCT frequencies."""
  err = (out - target).astype(jnp.float32)
  if scales > 1:
    h, w = err.shape[1:3]
    err = jnp.einsum("kh,bhwc,lw->bklc", jnp.asarray(dct_matrix(h), jnp.float32), err,
                     jnp.asarray(dct_matrix(w), jnp.float32))
    weights = jnp.asarray(dct_frequency_weights(h, w, scales), jnp.float32)[None, :, :, None]
    return jnp.mean(jnp.square(err) * weights, axis=(1, 2, 3))
  return jnp.mean(jnp.square(err), axis=(1, 2, 3))


def diffusion_loss(model: Callable[..., jax.Array], x0: jax.Array, noise: jax.Array,
                   sigma: jax.Array, sigma_data: float,
                   weighting: str | Callable[[jax.Array], jax.Array] = "soft-min-snr",
                   scales: int = 1, **cond) -> jax.Array:
  """Per-sample loss [B] of k-diffusion's `Denoiser.loss`; x0, noise NHWC, sigma [B]."""
  c_skip, c_out, c_in = (c[:, None, None, None] for c in edm_scalings(sigma, sigma_data))
  x = x0 + noise * sigma[:, None, None, None]
  target = (x0 - c_skip * x) / c_out
  out = model(x * c_in, sigma, **cond)
  return squared_error(out, target, scales) * loss_weight(sigma, sigma_data, weighting)


def simple_loss(model: Callable[..., jax.Array], x0: jax.Array, noise: jax.Array,
                sigma: jax.Array, sigma_data: float, **cond) -> jax.Array:
  """k-diffusion's `SimpleLossDenoiser`: mean((to_d(x, sigma, D(x)) - noise)^2) per sample."""
  c_skip, c_out, c_in = (c[:, None, None, None] for c in edm_scalings(sigma, sigma_data))
  s = sigma[:, None, None, None]
  x = x0 + noise * s
  denoised = c_skip * x + c_out * model(x * c_in, sigma, **cond)
  eps = (x - denoised) / s
  return jnp.mean(jnp.square(eps - noise), axis=(1, 2, 3))


def drop_labels(key: jax.Array, labels: jax.Array, num_classes: int, rate: float) -> jax.Array:
  """Replace each label by the null class `num_classes` with probability `rate` (for guidance)."""
  if rate <= 0:
    return labels
  return jnp.where(jax.random.uniform(key, labels.shape) < rate, num_classes, labels)
