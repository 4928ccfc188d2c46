"""Dilated neighborhood attention as undilated attention over the dilation groups.

With dilation δ, position i of an axis belongs to group i mod δ and only sees keys of its group,
with NATTEN's window rule applied to the group's own length (spec §6). Gathering each group's
positions into a contiguous sub-map therefore turns dilated attention into ordinary (δ = 1)
attention over δ_h·δ_w sub-maps. Groups have ceil(L/δ) or floor(L/δ) positions, so an axis has
at most two group lengths and a map at most four blocks of equal-sized sub-maps, each folded into
the batch. Every implementation then only needs dilation 1.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _axis_groups(length: int, dilation: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """Permutation gathering the groups of an axis, and its blocks as (num_groups, group_len).

  Groups 0..r-1 (r = L mod δ) have ceil(L/δ) positions, the others floor(L/δ); the permuted
  axis is the long groups one after another, then the short ones.
  """
  perm = np.concatenate([np.arange(g, length, dilation) for g in range(dilation)])
  long_len, rem = -(-length // dilation), length % dilation
  blocks = [(rem, long_len), (dilation - rem, length // dilation)] if rem else [
      (dilation, length // dilation)]
  return perm.astype(np.int32), blocks


def _split(x: jax.Array, blocks_h, blocks_w) -> list[jax.Array]:
  """(B, H, W, ...) in group order -> one (B * gh * gw, Lh, Lw, ...) array per block."""
  b, rest = x.shape[0], x.shape[3:]
  parts, r0 = [], 0
  for gh, lh in blocks_h:
    c0 = 0
    for gw, lw in blocks_w:
      blk = x[:, r0:r0 + gh * lh, c0:c0 + gw * lw]
      blk = blk.reshape((b, gh, lh, gw, lw) + rest)
      blk = jnp.moveaxis(blk, 3, 2).reshape((b * gh * gw, lh, lw) + rest)
      parts.append(blk)
      c0 += gw * lw
    r0 += gh * lh
  return parts


def _merge(parts: list[jax.Array], batch: int, blocks_h, blocks_w) -> jax.Array:
  """Inverse of `_split`."""
  rows, it = [], iter(parts)
  for gh, lh in blocks_h:
    cols = []
    for gw, lw in blocks_w:
      blk = next(it)
      rest = blk.shape[3:]
      blk = blk.reshape((batch, gh, gw, lh, lw) + rest)
      cols.append(jnp.moveaxis(blk, 2, 3).reshape((batch, gh * lh, gw * lw) + rest))
    rows.append(jnp.concatenate(cols, axis=2) if len(cols) > 1 else cols[0])
  return jnp.concatenate(rows, axis=1) if len(rows) > 1 else rows[0]


def dilated(fn: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
            dilation: int) -> jax.Array:
  """Applies undilated NA `fn(q, k, v)` to each dilation group of (B, H, W, heads, dim) maps."""
  if dilation == 1:
    return fn(q, k, v)
  batch, height, width = q.shape[:3]
  perm_h, blocks_h = _axis_groups(height, dilation)
  perm_w, blocks_w = _axis_groups(width, dilation)
  grouped = [_split(jnp.take(jnp.take(t, perm_h, axis=1), perm_w, axis=2), blocks_h, blocks_w)
             for t in (q, k, v)]
  outs = [fn(qb, kb, vb) for qb, kb, vb in zip(*grouped)]
  out = _merge(outs, batch, blocks_h, blocks_w)
  inv_h, inv_w = np.argsort(perm_h), np.argsort(perm_w)
  return jnp.take(jnp.take(out, inv_h, axis=1), inv_w, axis=2)
