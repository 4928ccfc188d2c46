"""Neighborhood attention in plain jnp, with its own VJP: the portable fallback.

Neither pass materialises the windows (the reference gathers 2k^2 copies of k and v):
* Forward 'halo' (default), and the backward: each tile of (block_h x block_w) queries attends
  densely to its key halo (block + k - 1 per axis, NATTEN windows clamped inside the map),
  masked per query with the exact window rule: batched matmuls over a few times the useful work
  ((block+k-1)^2 logits per query; 4x for 8x8 tiles and k = 7), halos (1 + (k-1)/block)^2 times
  k and v. Tiles default to the size per axis that minimises padded queries x halo length.
* Forward 'offsets': one pass per window offset (a, c) gathers each query's key at that offset
  into a fused multiply-reduce, giving exactly the k^2 useful logits per query (so XLA's cost
  analysis counts the true work); softmax over them, then one fused weighted sum of the k^2
  gathered values. Its k^2 gathers make it 2-4x slower than 'halo' on the CPU.
* The backward recomputes the probabilities from the saved log-sum-exp: dq per query tile, dk
  and dv per key tile over its inverse-neighborhood halo of queries, so nothing is scattered.

Layout: (batch, height, width, heads, head_dim); dilation 1 (see dilation.py).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hdit_kernels.neighborhood_attention import autodiff, tiling, windows


@dataclasses.dataclass(frozen=True)
class Config:
  """Forward method ('halo' or 'offsets') and the tile of queries / keys per axis ('halo'
  forward, dq; dk and dv; 0: `auto_tile`)."""
  forward: str = "halo"
  block_h: int = 0
  block_w: int = 0


def auto_tile(length: int, kernel_size: int) -> int:
  """The tile, between max(k, 4) and 16 (or the whole axis if shorter), with the least work:
  padded queries x keys per query halo; ties go to the larger tile (fewer, larger matmuls)."""
  low = min(max(kernel_size, 4), length)
  costs = {t: -(-length // t) * t * min(t + kernel_size - 1, length)
           for t in range(low, max(low, min(16, length)) + 1)}
  return min(costs, key=lambda t: (costs[t], -t))


def _window_mask(pos: np.ndarray, keys: np.ndarray, length: int, kernel_size: int) -> np.ndarray:
  """mask[t, i, a]: query pos[t, i] attends key keys[t, a] (one axis); padded queries clamp."""
  start = np.clip(pos - kernel_size // 2, 0, length - kernel_size)[:, :, None]
  return (keys[:, None, :] >= start) & (keys[:, None, :] < start + kernel_size)


def _tiles(x: jax.Array, plan_h: tiling.AxisPlan, plan_w: tiling.AxisPlan) -> jax.Array:
  """(B, H, W, ...) -> (B, nh, th, nw, tw, ...), zero-padded to whole tiles."""
  nh, th, nw, tw = plan_h.num_tiles, plan_h.tile, plan_w.num_tiles, plan_w.tile
  pad = [(0, 0), (0, nh * th - x.shape[1]), (0, nw * tw - x.shape[2])] + [(0, 0)] * (x.ndim - 3)
  x = jnp.pad(x, pad)
  return x.reshape((x.shape[0], nh, th, nw, tw) + x.shape[3:])


def _stats_to_logits_layout(x: jax.Array) -> jax.Array:
  """(B, nh, th, nw, tw, n) per-query statistics -> (B, nh, nw, n, th, tw), the logits' layout."""
  return jnp.transpose(x, (0, 1, 3, 5, 2, 4))


def _stats_from_logits_layout(x: jax.Array) -> jax.Array:
  return jnp.transpose(x, (0, 1, 4, 2, 5, 3))


def _untile(x: jax.Array, height: int, width: int) -> jax.Array:
  b, nh, th, nw, tw = x.shape[:5]
  return x.reshape((b, nh * th, nw * tw) + x.shape[5:])[:, :height, :width]


def _halo(x: jax.Array, starts_h, span_h, starts_w, span_w) -> jax.Array:
  """(B, H, W, ...) -> (B, nh, span_h, nw, span_w, ...): each tile's halo, gathered."""
  rows = starts_h[:, None] + np.arange(span_h)[None, :]
  cols = starts_w[:, None] + np.arange(span_w)[None, :]
  return x[:, rows][:, :, :, cols]


def _plans(shape, kernel_size, config):
  _, height, width = shape[:3]
  return (tiling.axis_plan(height, kernel_size, config.block_h or auto_tile(height, kernel_size)),
          tiling.axis_plan(width, kernel_size, config.block_w or auto_tile(width, kernel_size)))


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _query_tile_probs(q, k, lse, plan_h, plan_w, kernel_size, scale):
  """Logits of each query tile against its key halo, masked; softmax-normalised if lse given.

  Returns (s or p, k halo) with s/p of shape (B, nh, nw, n, th, tw, sh, sw), float32.
  """
  height, width = q.shape[1:3]
  kh = _halo(k, plan_h.kv_starts, plan_h.kv_span, plan_w.kv_starts, plan_w.kv_span)
  s = jnp.einsum("bxiyjnd,bxaycnd->bxynijac", _tiles(q, plan_h, plan_w), kh,
                 preferred_element_type=jnp.float32, precision=_precision(q.dtype)) * scale
  qpos_h = np.arange(plan_h.num_tiles * plan_h.tile).reshape(plan_h.num_tiles, -1)
  qpos_w = np.arange(plan_w.num_tiles * plan_w.tile).reshape(plan_w.num_tiles, -1)
  keys_h = plan_h.kv_starts[:, None] + np.arange(plan_h.kv_span)
  keys_w = plan_w.kv_starts[:, None] + np.arange(plan_w.kv_span)
  mh = _window_mask(qpos_h, keys_h, height, kernel_size)   # (nh, th, sh)
  mw = _window_mask(qpos_w, keys_w, width, kernel_size)    # (nw, tw, sw)
  mask = mh[:, None, None, :, None, :, None] & mw[None, :, None, None, :, None, :]
  if lse is None:
    return jnp.where(mask, s, -jnp.inf), kh
  lse_t = _stats_to_logits_layout(_tiles(lse, plan_h, plan_w))
  return jnp.where(mask, jnp.exp(s - lse_t[..., None, None]), 0.0), kh


def _offsets_forward(q, k, v, kernel_size, scale):
  """Exact-work forward: k^2 fused gather-multiply-reduce passes, then one fused weighted sum."""
  height, width = q.shape[1:3]
  rows = windows.window_indices(height, kernel_size)   # (H, k) key row of each query row
  cols = windows.window_indices(width, kernel_size)
  offsets = [(a, c) for a in range(kernel_size) for c in range(kernel_size)]

  def at_offset(x, a, c):   # (B, H, W, n, d): each query's key (value) at window offset (a, c)
    return x[:, rows[:, a]][:, :, cols[:, c]].astype(jnp.float32)

  q32 = q.astype(jnp.float32)
  s = jnp.stack([jnp.sum(q32 * at_offset(k, a, c), axis=-1) for a, c in offsets], -1) * scale
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = sum(p[..., i, None] * at_offset(v, a, c) for i, (a, c) in enumerate(offsets)) / l
  return out.astype(q.dtype), (m + jnp.log(l))[..., 0]


def forward(q, k, v, kernel_size, scale, config):
  """Returns out (B, H, W, n, d) in q's dtype and lse (B, H, W, n) float32."""
  if config.forward == "offsets":
    return _offsets_forward(q, k, v, kernel_size, scale)
  if config.forward != "halo":
    raise ValueError(f"xla.Config.forward must be 'offsets' or 'halo', got {config.forward!r}")
  height, width = q.shape[1:3]
  plan_h, plan_w = _plans(q.shape, kernel_size, config)
  s, _ = _query_tile_probs(q, k, None, plan_h, plan_w, kernel_size, scale)
  m = jnp.max(s, axis=(-2, -1), keepdims=True)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=(-2, -1), keepdims=True)
  vh = _halo(v, plan_h.kv_starts, plan_h.kv_span, plan_w.kv_starts, plan_w.kv_span)
  o = jnp.einsum("bxynijac,bxaycnd->bxiyjnd", p.astype(v.dtype), vh,
                 preferred_element_type=jnp.float32, precision=_precision(v.dtype))
  inv_l = _stats_from_logits_layout(1.0 / l[..., 0, 0])[..., None]
  out = _untile(o * inv_l, height, width).astype(q.dtype)
  lse = _stats_from_logits_layout((m + jnp.log(l))[..., 0, 0])
  return out, _untile(lse, height, width)


def backward(q, k, v, out, lse, dout, kernel_size, scale, config):
  """Returns (dq, dk, dv), each in its input's dtype."""
  height, width = q.shape[1:3]
  plan_h, plan_w = _plans(q.shape, kernel_size, config)
  delta = autodiff.attention_delta(out, dout)
  hp = _precision(q.dtype)

  # dq, per query tile over its key halo.
  p, kh = _query_tile_probs(q, k, lse, plan_h, plan_w, kernel_size, scale)
  vh = _halo(v, plan_h.kv_starts, plan_h.kv_span, plan_w.kv_starts, plan_w.kv_span)
  dp = jnp.einsum("bxiyjnd,bxaycnd->bxynijac", _tiles(dout, plan_h, plan_w), vh,
                  preferred_element_type=jnp.float32, precision=hp)
  delta_t = _stats_to_logits_layout(_tiles(delta, plan_h, plan_w))[..., None, None]
  ds = (p * (dp - delta_t)).astype(k.dtype)
  dq = jnp.einsum("bxynijac,bxaycnd->bxiyjnd", ds, kh, preferred_element_type=jnp.float32,
                  precision=hp) * scale

  # dk, dv, per key tile over the halo of queries that attend to it.
  def qhalo(x):
    return _halo(x, plan_h.q_starts, plan_h.q_span, plan_w.q_starts, plan_w.q_span)

  qh, doh = qhalo(q), qhalo(dout)
  lse_h = _stats_to_logits_layout(qhalo(lse))[..., None, None]
  delta_h = _stats_to_logits_layout(qhalo(delta))[..., None, None]
  s = jnp.einsum("bxaycnd,bxiyjnd->bxynacij", qh, _tiles(k, plan_h, plan_w),
                 preferred_element_type=jnp.float32, precision=hp) * scale
  qpos_h = plan_h.q_starts[:, None] + np.arange(plan_h.q_span)
  qpos_w = plan_w.q_starts[:, None] + np.arange(plan_w.q_span)
  keys_h = np.arange(plan_h.num_tiles * plan_h.tile).reshape(plan_h.num_tiles, -1)
  keys_w = np.arange(plan_w.num_tiles * plan_w.tile).reshape(plan_w.num_tiles, -1)
  mh = _window_mask(qpos_h, keys_h, height, kernel_size)   # (nh, qa, th)
  mw = _window_mask(qpos_w, keys_w, width, kernel_size)    # (nw, qc, tw)
  mask = mh[:, None, None, :, None, :, None] & mw[None, :, None, None, :, None, :]
  p = jnp.where(mask, jnp.exp(s - lse_h), 0.0)
  dv = jnp.einsum("bxynacij,bxaycnd->bxiyjnd", p.astype(dout.dtype), doh,
                  preferred_element_type=jnp.float32, precision=hp)
  dp = jnp.einsum("bxaycnd,bxiyjnd->bxynacij", doh, _tiles(v, plan_h, plan_w),
                  preferred_element_type=jnp.float32, precision=hp)
  ds = (p * (dp - delta_h)).astype(q.dtype)
  dk = jnp.einsum("bxynacij,bxaycnd->bxiyjnd", ds, qh, preferred_element_type=jnp.float32,
                  precision=hp) * scale
  return (_untile(dq, height, width).astype(q.dtype),
          _untile(dk, height, width).astype(k.dtype),
          _untile(dv, height, width).astype(v.dtype))


na2d = autodiff.with_lse_vjp(forward, backward)
