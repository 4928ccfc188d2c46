"""Tile bookkeeping shared by the Triton (Pallas GPU) neighborhood-attention kernels.

Inside a kernel, a tile's tokens are flattened row-major (index t -> row t // cols, column
t % cols, with power-of-two cols) and addressed by gathering from the native
(B, H, W, heads, dim) layout. Loads use indices clamped inside the map; scores of clamped copies
are masked by the window rule (keys) or an explicit in-map test (queries).
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hdit_kernels.neighborhood_attention.windows import attending_range, window_start

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def padded_dim(head_dim: int) -> int:
  """tl.dot wants power-of-two dims >= 16: smaller or odd head dims are zero-padded."""
  return max(16, pl.next_power_of_2(head_dim))


def split(idx, cols: int):
  """(idx // cols, idx % cols) for a power-of-two `cols`."""
  shift = cols.bit_length() - 1
  return idx >> shift, idx & (cols - 1)


def tile_origin(width: int, th: int, tw: int):
  """First row and column of this program's tile (grid axis 0 enumerates tiles row-major)."""
  tile = pl.program_id(0)
  tiles_w = pl.cdiv(width, tw)
  return (tile // tiles_w) * th, (tile % tiles_w) * tw


def tile_tokens(r0, c0, th: int, tw: int, height: int, width: int):
  """Rows, columns of a tile's tokens as they are (for the tile-padded outputs) and clamped
  inside the map (for loads)."""
  r, c = split(jnp.arange(th * tw, dtype=jnp.int32), tw)
  r, c = r0 + r, c0 + c
  return r, c, jnp.minimum(r, height - 1), jnp.minimum(c, width - 1)


def at(ref, b, rows, cols, h):
  """ref[b, rows[t], cols[t], h, :] for tokens t, as a (tokens, dim) view.

  All-integer indices (the head-dim one an arange too) so that interpret mode can gather them;
  Triton sees a contiguous, aligned last dim and vectorises the loads.
  """
  dim = jnp.arange(ref.shape[-1], dtype=jnp.int32)[None, :]
  return ref.at[b, rows[:, None], cols[:, None], h, dim]


def dot(a, b, precision, trans_b: bool = False):
  """a @ b (or a @ b.T), float32 accumulation."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=jnp.float32)


def in_window(q_rows, q_cols, k_rows, k_cols, height: int, width: int, kernel_size: int,
              keys_first: bool = False):
  """NATTEN's rule for query and key coordinate vectors: a (queries, keys) mask, or
  (keys, queries) with keys_first."""
  qx, kx = (slice(None), None), (None, slice(None))
  if keys_first:
    qx, kx = kx, qx
  sr = window_start(q_rows, height, kernel_size)[qx]
  sc = window_start(q_cols, width, kernel_size)[qx]
  kr, kc = k_rows[kx], k_cols[kx]
  return (kr >= sr) & (kr < sr + kernel_size) & (kc >= sc) & (kc < sc + kernel_size)


def key_halo_loop(r0, c0, geo, cfg, body, init):
  """Runs carry = body(rows, cols, rows_clamped, cols_clamped, carry) over the key halo of
  the query tile at (r0, c0), in blocks of kv_rows x kv_cols keys.

  The halo is rows [start(r0), start(r1) + k) and the same for columns: NATTEN windows stay
  inside the map, so it never reaches past the border (blocks may; their keys are clamped).
  """
  height, width, ks = geo
  kr, kc = cfg.kv_rows, cfg.kv_cols
  row0 = window_start(r0, height, ks)
  row1 = window_start(jnp.minimum(r0 + cfg.block_h - 1, height - 1), height, ks) + ks
  col0 = window_start(c0, width, ks)
  col1 = window_start(jnp.minimum(c0 + cfg.block_w - 1, width - 1), width, ks) + ks
  return _block_loop(row0, row1, col0, col1, kr, kc, height, width, body, init)


def query_halo_loop(r0, c0, geo, cfg, body, init):
  """As key_halo_loop, over the queries attending the key tile at (r0, c0), in blocks of
  q_rows x q_cols (see attending_range)."""
  height, width, ks = geo
  row0, row1 = attending_range(r0, jnp.minimum(r0 + cfg.block_h - 1, height - 1), height, ks)
  col0, col1 = attending_range(c0, jnp.minimum(c0 + cfg.block_w - 1, width - 1), width, ks)
  return _block_loop(row0, row1, col0, col1, cfg.q_rows, cfg.q_cols, height, width, body, init)


def _block_loop(row0, row1, col0, col1, br, bc, height, width, body, init):
  """fori_loop over blocks of br x bc tokens covering rows [row0, row1) x cols [col0, col1)."""
  col_blocks = pl.cdiv(col1 - col0, bc)
  ur, uc = split(jnp.arange(br * bc, dtype=jnp.int32), bc)

  def step(it, carry):
    rows = row0 + (it // col_blocks) * br + ur
    cols = col0 + (it % col_blocks) * bc + uc
    return body(rows, cols, jnp.minimum(rows, height - 1), jnp.minimum(cols, width - 1), carry)

  return jax.lax.fori_loop(0, pl.cdiv(row1 - row0, br) * col_blocks, step, init)


def load(ref, b, rows, cols, h):
  return plgpu.load(at(ref, b, rows, cols, h))
