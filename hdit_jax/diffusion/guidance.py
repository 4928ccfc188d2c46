"""Classifier-free guidance over a class-conditional denoiser (Ho & Salimans 2022)."""

from typing import Callable

import jax
import jax.numpy as jnp

Denoiser = Callable[..., jax.Array]


def guided_denoiser(denoiser: Denoiser, labels: jax.Array, null_class: int, scale: float,
                    interval: tuple[float, float] | None = None) -> Callable[..., jax.Array]:
  """D(x, sigma) = D_u + scale (D_c - D_u), in one batched call with the null class.

  `denoiser(x, sigma, class_cond=...)`; scale 1 is the conditional model, 0 the unconditional.
  `interval` (sigma_lo, sigma_hi) applies guidance only inside that noise range (Kynkaanniemi
  et al. 2024); outside it the conditional output is used.
  """
  if scale == 1.0:
    return lambda x, sigma: denoiser(x, sigma, class_cond=labels)

  def pair(a, b):
    # Interleaved (row 2i unconditional, 2i + 1 conditional): a batch sharded over devices
    # keeps each image's two rows on its own device, so guidance needs no communication.
    return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])

  def guided(x, sigma):
    both = denoiser(pair(x, x), pair(sigma, sigma),
                    class_cond=pair(jnp.full_like(labels, null_class), labels))
    both = both.reshape((x.shape[0], 2) + x.shape[1:])
    uncond, cond = both[:, 0], both[:, 1]
    out = uncond + scale * (cond - uncond)
    if interval is not None:
      inside = (sigma >= interval[0]) & (sigma <= interval[1])
      out = jnp.where(inside.reshape((-1,) + (1,) * (x.ndim - 1)), out, cond)
    return out

  return guided
