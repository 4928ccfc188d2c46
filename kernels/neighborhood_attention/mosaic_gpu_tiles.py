"""In-kernel helpers of the Mosaic GPU neighborhood-attention kernels: NATTEN's mask on
tile- and halo-relative tokens, TMA copies of tiles, halos and statistics, SMEM operands and
wgmma steps. The tiling itself (tile shapes, halos, streams) is in mosaic_gpu_halos.py.
"""

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hdit_kernels.neighborhood_attention.mosaic_gpu_halos import Geometry, Stream
from hdit_kernels.neighborhood_attention.windows import window_start

LOG2E = math.log2(math.e)
# Finite, so that exp2(MASK_VALUE - max) is 0 without inf - inf; every query has k^2 valid keys.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# jax 0.10's plgpu.load requires an index; jax 0.11 gives it a default and deprecates passing it.
_LOAD_NEEDS_INDEX = not plgpu.load.__defaults__


def _vector_iota(n: int, layout):
  return plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=layout)


def window_mask(shape, geo: Geometry, queries_dim: int, q_origin, q_cols: int, q_start: int,
                k_origin, k_cols: int, k_start: int):
  """NATTEN's rule over a (queries, keys) score block, or (keys, queries) with queries_dim 1;
  the block's first query / key is token q_start / k_start of its tile or halo.

  Positions and window starts are computed once per row and per column and broadcast, not per
  score (0.48 -> 0.42 ms forward at ImageNet level 0 on an H200).
  """
  rows, cols = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
  q_layout, k_layout = (rows, cols) if queries_dim == 0 else (cols, rows)
  qt = q_start + _vector_iota(shape[queries_dim], q_layout)
  kt = k_start + _vector_iota(shape[1 - queries_dim], k_layout)
  expand_q = lambda x: lax.broadcast_in_dim(x, shape, [queries_dim])
  expand_k = lambda x: lax.broadcast_in_dim(x, shape, [1 - queries_dim])
  return token_mask(qt, kt, geo, q_origin, q_cols, k_origin, k_cols, expand_q, expand_k)


def _split(t, cols: int):
  if cols & (cols - 1) == 0:
    return t >> (cols.bit_length() - 1), t & (cols - 1)
  return lax.div(t, cols), lax.rem(t, cols)


def token_mask(qt, kt, geo: Geometry, q_origin, q_cols: int, k_origin, k_cols: int,
               expand_q=lambda x: x, expand_k=lambda x: x):
  """Whether query token qt attends key token kt (non-negative int arrays, broadcast against
  each other by expand_q / expand_k).

  Tokens run row-major, q_cols / k_cols per row, from the origins.
  """
  (qr, qc), (kr, kc) = _split(qt, q_cols), _split(kt, k_cols)
  sr = window_start(q_origin[0] + qr, geo.height, geo.kernel_size)
  sc = window_start(q_origin[1] + qc, geo.width, geo.kernel_size)
  kr, kc = k_origin[0] + kr, k_origin[1] + kc
  ks = geo.kernel_size
  inside = lambda key, start: (expand_k(key) >= expand_q(start)) & (
      expand_k(key) < expand_q(start + ks))
  return inside(kr, sr) & inside(kc, sc)


def refill(stream: Stream, step: int, load) -> None:
  """After step `step`: load(group) of the group its buffer takes next, if any (in-kernel)."""
  if (group := stream.refill_after(step)) is not None:
    plgpu.commit_smem()   # every warp is done with the buffer before TMA refills it
    load(group)


def halo_loader(srcs, b, origin, h, dsts, barriers, stream: Stream):
  """load(group): the TMA copies of that group's rows of each src halo (at `origin`) into its
  dst, on that group's barrier of its barriers."""
  def load(group):
    for src, dst, bars in zip(srcs, dsts, barriers):
      copy_group_in(src, b, origin, h, dst, single(bars[group]), stream, group)
  return load


def copy_group_in(src, b, origin, h, dst, barrier, stream: Stream, group: int):
  """TMA copies of load group `group`'s halo rows (halo at `origin`) into dst, one per row."""
  first, rows = stream.groups[group]
  cols, offset = stream.halo.cols, stream.offset(group)
  for i in range(rows):
    plgpu.copy_gmem_to_smem(src.at[b, origin[0] + first + i, pl.ds(origin[1], cols), h],
                            dst.at[pl.ds(offset + i * cols, cols)], barrier)


def copy_group_stats_in(src, b, origin, h, dst, barrier, stream: Stream, group: int):
  """One TMA copy of the float32 statistics (B, heads, H, W) of load group `group`'s rows."""
  first, rows = stream.groups[group]
  cols = stream.halo.cols
  plgpu.copy_gmem_to_smem(
      src.at[b, h, pl.ds(origin[0] + first, rows), pl.ds(origin[1], cols)],
      dst.at[pl.ds(stream.offset(group), rows * cols)].reshape(rows, cols), barrier)


def single(barrier):
  """The one barrier of a Barrier ref: shape (1,) in jax 0.10, a scalar ref in 0.11."""
  return barrier.at[0] if barrier.shape else barrier


def copy_tile_in(src, b, r0, c0, h, dst, barrier, geo: Geometry):
  """TMA copies of the tile at (r0, c0) (one per row) into dst (64, ...) on `barrier` (which
  expects geo.tile_rows arrivals)."""
  cols = geo.tile_cols
  for i in range(geo.tile_rows):
    plgpu.copy_gmem_to_smem(src.at[b, r0 + i, pl.ds(c0, cols), h],
                            dst.at[pl.ds(i * cols, cols)], barrier)


def copy_stats_in(src, b, h, r0, c0, dst, barrier, rows: int, cols: int):
  """One TMA copy of the rows x cols per-query float32 statistics at (r0, c0) of src
  (B, heads, H, W) into dst (rows * cols,), row-major (one arrival)."""
  plgpu.copy_gmem_to_smem(src.at[b, h, pl.ds(r0, rows), pl.ds(c0, cols)],
                          dst.reshape(rows, cols), barrier)


def copy_tile_out(src, dst, b, r0, c0, h, geo: Geometry):
  """TMA copies of SMEM (64, ...) to the tile at (r0, c0) of dst (B, H, W, heads, ...)."""
  cols = geo.tile_cols
  for i in range(geo.tile_rows):
    plgpu.copy_smem_to_gmem(src.at[pl.ds(i * cols, cols)],
                            dst.at[b, r0 + i, pl.ds(c0, cols), h], commit_group=False)


def copy_stats_tile_out(src, dst, b, h, r0, c0, geo: Geometry):
  rows, cols = geo.tile_rows, geo.tile_cols
  plgpu.copy_smem_to_gmem(src.reshape(rows, cols), dst.at[b, h, pl.ds(r0, rows), pl.ds(c0, cols)],
                          commit_group=False)


def smem_matrix(rows: int, head_dim: int, dtype):
  """SMEM for a (tokens, head_dim) wgmma operand: 128-byte swizzle, 8-row tiles."""
  swizzle = plgpu.find_swizzle(head_dim * jnp.dtype(dtype).itemsize * 8)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM((rows, head_dim), dtype,
                    transforms=(plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)))


def row_broadcast(x, shape):
  """A per-row vector (layout WGMMA.reduce(1)) over a (rows, cols) block."""
  return lax.broadcast_in_dim(x, shape, [0])


def col_broadcast(x, shape):
  """A per-column vector (layout WGMMA.reduce(0)) over a (rows, cols) block."""
  return lax.broadcast_in_dim(x, shape, [1])


def load(ref, layout):
  """All of an SMEM ref into registers, in `layout`."""
  return plgpu.load(ref, (), layout=layout) if _LOAD_NEEDS_INDEX else plgpu.load(ref, layout=layout)


def load_row_vector(ref):
  """A float32 SMEM vector with one value per row of a score block (for row_broadcast)."""
  return load(ref, plgpu.Layout.WGMMA.reduce(1))


def load_col_vector(ref):
  """A float32 SMEM vector with one value per column of a score block (for col_broadcast)."""
  return load(ref, plgpu.Layout.WGMMA.reduce(0))


def scores(q_smem, k_smem, shape):
  """q @ k^T into a fresh float32 accumulator of `shape`."""
  def body(acc):
    plgpu.wgmma(acc, q_smem, k_smem.transpose((1, 0)))
    return acc[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def accumulate(acc, a, b_smem):
  """acc + a @ b, a in registers (or SMEM), b in SMEM."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b_smem)
  return pl.run_state(body)(plgpu.ACC.init(acc))


def zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def full_vector(n: int, value: float):
  return plgpu.layout_cast(jnp.full((n,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))


def grid_axes():
  """(tile, head, batch) of this program."""
  return lax.axis_index("tile"), lax.axis_index("head"), lax.axis_index("batch")


def call(kernel, q, out_type, scratch, geo: Geometry, name: str):
  b, _, _, n, _ = q.shape
  return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch,
                      grid=(geo.num_tiles, n, b), grid_names=("tile", "head", "batch"),
                      compiler_params=plgpu.CompilerParams(approx_math=True), kernel_name=name)
