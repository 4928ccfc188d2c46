"""Noise-level (sigma) schedules for sampling, as k-diffusion's `get_sigmas_*` (spec section 5.1).

Each schedule returns `n + 1` decreasing sigmas with a final 0 appended (n sampling steps). The
arithmetic follows k-diffusion's float32 PyTorch code operation by operation so that a float32
schedule lands within ~1 ulp of the reference: scalar set-up (`sigma_max ** (1 / rho)`, `log`)
in Python double when the arguments are Python numbers, `torch.linspace`'s two-sided formula, and
PyTorch's special cases of `pow(tensor, scalar)`. All functions are jit-able with `n` static; the
other arguments may be traced (the scalar set-up then runs in `dtype`).
"""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(*values) -> bool:
  return all(isinstance(v, (numbers.Real, np.floating, np.integer)) for v in values)


def _log(v, dtype):
  """ln v, in Python double when v is a Python/numpy number (as k-diffusion's `math.log`)."""
  return math.log(v) if _concrete(v) else jnp.log(jnp.asarray(v, dtype))


def torch_pow(x: jax.Array, exponent) -> jax.Array:
  """`x ** exponent` as PyTorch evaluates `pow(tensor, scalar)`, with its exact special cases."""
  if _concrete(exponent):
    e = float(exponent)
    special = {0.: lambda: jnp.ones_like(x), 1.: lambda: x, 2.: lambda: x * x,
               3.: lambda: x * x * x, 0.5: lambda: jnp.sqrt(x), -0.5: lambda: jax.lax.rsqrt(x),
               -1.: lambda: 1 / x, -2.: lambda: 1 / (x * x)}
    if e in special:
      return special[e]()
  return jnp.power(x, jnp.asarray(exponent, x.dtype))


def linspace(start, end, n: int, dtype=jnp.float32) -> jax.Array:
  """`torch.linspace(start, end, n)` of shape [n]: the CPU kernel's two-sided formula.

  PyTorch computes `step = (end - start) / (n - 1)` in the output dtype, then `start + step * i`
  for the first half and `end - step * (n - 1 - i)` for the second, so both endpoints are exact.
  """
  start, end = jnp.asarray(start, dtype), jnp.asarray(end, dtype)
  if n == 1:
    return start[None]
  step = (end - start) / jnp.asarray(n - 1, dtype)
  idx = jnp.arange(n, dtype=jnp.int32)
  lo = start + step * idx.astype(dtype)
  hi = end - step * (n - 1 - idx).astype(dtype)
  return jnp.where(idx < n // 2, lo, hi)


def append_zero(sigmas: jax.Array) -> jax.Array:
  """[n] -> [n + 1] with a final 0 (the last step goes to the clean sample)."""
  return jnp.concatenate([sigmas, jnp.zeros((1,), sigmas.dtype)])


def karras(n: int, sigma_min, sigma_max, rho=7., dtype=jnp.float32) -> jax.Array:
  """Karras et al. (2022) eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho.

  Returns [n + 1] sigmas from sigma_max down to sigma_min, then 0.
  """
  ramp = linspace(0., 1., n, dtype)
  if _concrete(sigma_min, sigma_max, rho):
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  else:
    inv_rho = 1 / jnp.asarray(rho, dtype)
    min_inv_rho = jnp.power(jnp.asarray(sigma_min, dtype), inv_rho)
    max_inv_rho = jnp.power(jnp.asarray(sigma_max, dtype), inv_rho)
  return append_zero(torch_pow(max_inv_rho + ramp * (min_inv_rho - max_inv_rho), rho))


def exponential(n: int, sigma_min, sigma_max, dtype=jnp.float32) -> jax.Array:
  """Log-linear from sigma_max to sigma_min ([n + 1], final 0)."""
  return append_zero(jnp.exp(linspace(_log(sigma_max, dtype), _log(sigma_min, dtype), n, dtype)))


def polyexponential(n: int, sigma_min, sigma_max, rho=1., dtype=jnp.float32) -> jax.Array:
  """sigma = exp(r^rho (ln sigma_max - ln sigma_min) + ln sigma_min), r from 1 to 0 ([n + 1])."""
  ramp = torch_pow(linspace(1., 0., n, dtype), rho)
  log_min, log_max = _log(sigma_min, dtype), _log(sigma_max, dtype)
  return append_zero(jnp.exp(ramp * (log_max - log_min) + log_min))


def vp(n: int, beta_d=19.9, beta_min=0.1, eps_s=1e-3, dtype=jnp.float32) -> jax.Array:
  """Continuous VP schedule (Song et al. 2021): sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1).

  t runs linearly from 1 to eps_s; returns [n + 1] sigmas with a final 0. `exp(.) - 1` (not expm1)
  as k-diffusion.
  """
  t = linspace(1., eps_s, n, dtype)
  return append_zero(jnp.sqrt(jnp.exp(beta_d * (t * t) / 2 + beta_min * t) - 1))
