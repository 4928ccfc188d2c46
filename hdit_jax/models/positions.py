"""2-D token positions and HDiT's axial rotary position embedding (spec section 1.5, 1.7.1)."""

import math

import jax
import jax.numpy as jnp


def make_axial_pos(height: int, width: int) -> jax.Array:
  """Cell-centre positions of an (height, width) grid, shape [H, W, 2] as (row, column).

  The longer side spans [-1, 1]; the shorter is scaled by the aspect ratio, so positions depend
  on the grid's shape only and the same weights work at other resolutions.
  """
  aspect = width / height
  y_max, x_max = (1.0 / aspect if aspect > 1 else 1.0), (aspect if aspect < 1 else 1.0)
  ys = -y_max + (jnp.arange(height, dtype=jnp.float32) + 0.5) * (2 * y_max / height)
  xs = -x_max + (jnp.arange(width, dtype=jnp.float32) + 0.5) * (2 * x_max / width)
  return jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1)


def downscale_pos(pos: jax.Array) -> jax.Array:
  """Average each 2x2 block of positions: the cell centres of the coarser grid."""
  h, w, c = pos.shape
  return pos.reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))


def rope_freqs(d_head: int, n_heads: int) -> jax.Array:
  """Frequencies [n_heads, d_head // 8], log-spaced from pi to 10 pi and interleaved over heads."""
  n_freqs = d_head // 8
  total = n_heads * n_freqs
  log_freqs = jnp.linspace(math.log(math.pi), math.log(10 * math.pi), total + 1,
                           dtype=jnp.float32)[:-1]
  return jnp.exp(log_freqs).reshape(n_freqs, n_heads).T


def rope_angles(pos: jax.Array, freqs: jax.Array) -> jax.Array:
  """Angles [..., n_heads, 2F]: F from the row coordinate, then F from the column coordinate."""
  theta_h = pos[..., None, 0:1].astype(jnp.float32) * freqs.astype(jnp.float32)
  theta_w = pos[..., None, 1:2].astype(jnp.float32) * freqs.astype(jnp.float32)
  return jnp.concatenate([theta_h, theta_w], axis=-1)


def _rotate(x: jax.Array, theta: jax.Array) -> jax.Array:
  """The rotation of apply_rope, in float32."""
  rot = theta.shape[-1]
  x32 = x.astype(jnp.float32)
  x1, x2, rest = x32[..., :rot], x32[..., rot:2 * rot], x32[..., 2 * rot:]
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


@jax.custom_vjp
def apply_rope(x: jax.Array, theta: jax.Array) -> jax.Array:
  """Rotate channel c with channel c + R (R = theta's last dim) for c < R; the rest is untouched.

  x: [..., n_heads, d_head], theta broadcastable to [..., n_heads, R]. Computed in float32.
  The gradient is written out: x's is the inverse rotation of the output's (a rotation is
  orthogonal), one concatenate like the forward's; autodiff's transpose of the slices is a chain
  of pads and adds in float32 that runs at a third of the memory bandwidth. (A custom VJP has no
  forward-mode derivative: jax.jvp through it raises.)
  """
  return _rotate(x, theta).astype(x.dtype)


def _apply_rope_fwd(x, theta):
  return apply_rope(x, theta), (x, theta)


def _apply_rope_bwd(residuals, grad):
  x, theta = residuals
  rot = theta.shape[-1]
  grad_x = _rotate(grad, -theta).astype(x.dtype)
  # d out1 / d theta = -out2 and d out2 / d theta = out1; summed over theta's broadcast axes.
  # Nothing of this is computed when theta needs no gradient (XLA drops it).
  out, g = _rotate(x, theta), grad.astype(jnp.float32)
  grad_theta = g[..., rot:2 * rot] * out[..., :rot] - g[..., :rot] * out[..., rot:2 * rot]
  return grad_x, _sum_to_shape(grad_theta, theta.shape).astype(theta.dtype)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sum x over the axes that broadcasting `shape` to x.shape added or stretched."""
  lead = x.ndim - len(shape)
  x = x.sum(axis=tuple(range(lead))) if lead else x
  stretched = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
  return x.sum(axis=stretched, keepdims=True) if stretched else x


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


def sincos_embedding_2d(pos: jax.Array, features: int) -> jax.Array:
  """Fixed additive 2-D sin-cos embedding [H, W, features] of positions in [-1, 1].

  Used by the ablation models that replace RoPE with an additive position embedding: a quarter
  of the channels each for sin/cos of the row and of the column, frequencies log-spaced as RoPE's.
  """
  if features % 4:
    raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {features}")
  n = features // 4
  freqs = math.pi * 10.0 ** (jnp.arange(n, dtype=jnp.float32) / n)
  ang_y, ang_x = pos[..., 0:1] * freqs, pos[..., 1:2] * freqs
  return jnp.concatenate([jnp.sin(ang_y), jnp.cos(ang_y), jnp.sin(ang_x), jnp.cos(ang_x)], -1)
