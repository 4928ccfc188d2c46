"""EDM preconditioning (Karras et al. 2022) as in k-diffusion's `Denoiser` (spec section 3.1)."""

from typing import Callable

import jax
import jax.numpy as jnp


def edm_scalings(sigma: jax.Array, sigma_data: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(c_skip, c_out, c_in) for noise levels `sigma` of any shape."""
  sd2 = sigma_data ** 2
  s2 = jnp.square(sigma)
  c_skip = sd2 / (s2 + sd2)
  c_out = sigma * sigma_data * jax.lax.rsqrt(s2 + sd2)
  c_in = jax.lax.rsqrt(s2 + sd2)
  return c_skip, c_out, c_in


def _bcast(c: jax.Array, x: jax.Array) -> jax.Array:
  return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def denoise(model: Callable[..., jax.Array], x: jax.Array, sigma: jax.Array, sigma_data: float,
            **cond) -> jax.Array:
  """D(x; sigma) = c_skip x + c_out F(c_in x, sigma, **cond); x is NHWC, sigma [B]."""
  c_skip, c_out, c_in = (_bcast(c, x) for c in edm_scalings(sigma, sigma_data))
  return c_skip * x + c_out * model(x * c_in, sigma, **cond)
