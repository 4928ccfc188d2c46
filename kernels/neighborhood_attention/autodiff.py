"""The custom VJP shared by every implementation: save (q, k, v, out, lse), never probabilities.

An implementation supplies
  forward(q, k, v, kernel_size, scale, config) -> (out, lse)
  backward(q, k, v, out, lse, dout, kernel_size, scale, config) -> (dq, dk, dv)
with q, k, v, out, dout of shape (batch, height, width, heads, head_dim) and lse a float32
log-sum-exp of each query's scaled logits whose base and layout the implementation chooses
(natural log, (batch, height, width, heads) for most; base 2, (batch, heads, height, width) for
mosaic_gpu): only its own backward reads it. Dilation is handled outside (see dilation.py), so
both see dilation 1.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Forward = Callable[..., tuple[jax.Array, jax.Array]]
Backward = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def attention_delta(out: jax.Array, dout: jax.Array) -> jax.Array:
  """FlashAttention-2's D = rowsum(dO * O) per query and head, float32 (B, H, W, heads)."""
  return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)


def with_lse_vjp(forward: Forward, backward: Backward) -> Callable[..., jax.Array]:
  """Returns na(q, k, v, kernel_size, scale, config) differentiable in q, k, v.

  kernel_size, scale and config are static (hashable).
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
  def na(q, k, v, kernel_size: int, scale: float, config: Any):
    return forward(q, k, v, kernel_size, scale, config)[0]

  def na_fwd(q, k, v, kernel_size, scale, config):
    out, lse = forward(q, k, v, kernel_size, scale, config)
    return out, (q, k, v, out, lse)

  def na_bwd(kernel_size, scale, config, res, dout):
    q, k, v, out, lse = res
    return backward(q, k, v, out, lse, dout, kernel_size, scale, config)

  na.defvjp(na_fwd, na_bwd)
  return na
