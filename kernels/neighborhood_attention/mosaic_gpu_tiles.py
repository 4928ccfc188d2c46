"""Tile geometry and in-kernel helpers of the Mosaic GPU neighborhood-attention kernels.

A tile is 8 x 8 tokens (64 rows of a warpgroup's wgmma). A halo is 16 rows of 24 tokens (16 on
maps 16 wide): the keys a query tile attends to (8 + k - 1 rows and columns are needed, 14 for
k = 7), or the queries attending a key tile. Mosaic GPU lays (tokens, dim) wgmma operands out in
SMEM tiles of 8 tokens, and a TMA copy into such tiles must start on a multiple of 8 tokens
(jax 0.11 checks this; 0.10 would copy the wrong tokens): a halo's columns therefore start on a
multiple of 8 (three groups of 8 cover any window of up to 17), its rows anywhere (each row is
one copy). Sixteen rows, not fourteen, so that wgmma's contraction over halo tokens comes in
multiples of 64. In SMEM, halo token t is (t // cols, t % cols) of the halo, tile token t is
(t // 8, t % 8) of the tile. Halo origins are clamped inside the map, and `covers` checks on the
host, for every tile of a map, that the clamped halo holds what is needed.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hdit_kernels.neighborhood_attention.windows import attending_range, window_start

TILE = 8
HALO_ROWS = 16
LOG2E = math.log2(math.e)
# Finite, so that exp2(MASK_VALUE - max) is 0 without inf - inf; every query has k^2 valid keys.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static shapes of a call: map size and window."""
  height: int
  width: int
  kernel_size: int

  @property
  def halo_rows(self) -> int:
    return HALO_ROWS

  @property
  def halo_cols(self) -> int:
    return min(3 * TILE, self.width)

  @property
  def halo_tokens(self) -> int:
    return self.halo_rows * self.halo_cols

  @property
  def num_tiles(self) -> int:
    return (self.height // TILE) * (self.width // TILE)

  def tile_origin(self, tile):
    tiles_w = self.width // TILE
    return (tile // tiles_w) * TILE, (tile % tiles_w) * TILE

  def _halo_origin(self, row_lo, col_lo):
    # (x // 8) * 8 and min of multiples of 8: Mosaic GPU proves the column tile-aligned.
    return (jnp.minimum(row_lo, self.height - self.halo_rows),
            jnp.minimum((col_lo // TILE) * TILE, self.width - self.halo_cols))

  def key_halo_origin(self, r0, c0):
    """Top-left key of the halo of the query tile at (r0, c0); its column a multiple of 8."""
    ks = self.kernel_size
    return self._halo_origin(window_start(r0, self.height, ks), window_start(c0, self.width, ks))

  def query_halo_origin(self, r0, c0):
    """Top-left query of the halo of queries attending the key tile at (r0, c0)."""
    ks = self.kernel_size
    row_lo, _ = attending_range(r0, r0 + TILE - 1, self.height, ks)
    col_lo, _ = attending_range(c0, c0 + TILE - 1, self.width, ks)
    return self._halo_origin(row_lo, col_lo)

  @functools.cache   # asked by the dispatcher and by each kernel, for every call traced
  def covers(self) -> str | None:
    """Why the clamped halos would miss a needed token on this map, or None (host check)."""
    with jax.ensure_compile_time_eval():  # concrete even when called under a trace
      return self._covers()

  def _covers(self) -> str | None:
    ks = self.kernel_size
    for length, axis in ((self.height, "height"), (self.width, "width")):
      if length % TILE or length < 2 * TILE:
        return f"{axis} {length} must be a multiple of {TILE} and >= {2 * TILE}"
    for tile in range(self.num_tiles):
      r0, c0 = (int(x) for x in self.tile_origin(tile))
      r1, c1 = r0 + TILE - 1, c0 + TILE - 1
      needed = {
          "key": ((int(window_start(r0, self.height, ks)),
                   int(window_start(r1, self.height, ks)) + ks),
                  (int(window_start(c0, self.width, ks)),
                   int(window_start(c1, self.width, ks)) + ks),
                  self.key_halo_origin(r0, c0)),
          "query": (tuple(int(x) for x in attending_range(r0, r1, self.height, ks)),
                    tuple(int(x) for x in attending_range(c0, c1, self.width, ks)),
                    self.query_halo_origin(r0, c0)),
      }
      for kind, (rows, cols, origin) in needed.items():
        hr, hc = (int(x) for x in origin)
        for axis, (lo, hi), start, span in (("rows", rows, hr, self.halo_rows),
                                            ("columns", cols, hc, self.halo_cols)):
          if not 0 <= start <= lo <= hi <= start + span:
            return (f"the {kind} halo of the tile at ({r0}, {c0}) misses {axis} (kernel_size "
                    f"{ks} too large for {self.halo_rows} x {self.halo_cols} halos on this map)")
    return None


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


def single(barrier):
  """The one barrier of a Barrier ref: shape (1,) in jax 0.10, a scalar ref in 0.11."""
  return barrier.at[0] if barrier.shape else barrier


def copy_tile_in(src, b, r0, c0, h, dst, barrier):
  """TMA copies of the 8 x 8 tile at (r0, c0) (one per row) into dst (64, ...) on `barrier`
  (which expects 8 arrivals)."""
  for i in range(TILE):
    plgpu.copy_gmem_to_smem(src.at[b, r0 + i, pl.ds(c0, TILE), h],
                            dst.at[pl.ds(i * TILE, TILE)], barrier)


def copy_halo_in(src, b, r0, c0, h, dst, barrier, geo: Geometry):
  """TMA copies of the halo at (r0, c0) into dst (halo_tokens, ...), one per row (halo_rows
  arrivals)."""
  cols = geo.halo_cols
  for i in range(geo.halo_rows):
    plgpu.copy_gmem_to_smem(src.at[b, r0 + i, pl.ds(c0, cols), h],
                            dst.at[pl.ds(i * cols, cols)], barrier)


def copy_stats_in(src, b, h, r0, c0, dst, barrier, rows: int, cols: int):
  """One TMA copy of the rows x cols per-query float32 statistics at (r0, c0) of src
  (B, heads, H, W) into dst (rows * cols,), row-major (one arrival)."""
  plgpu.copy_gmem_to_smem(src.at[b, h, pl.ds(r0, rows), pl.ds(c0, cols)],
                          dst.reshape(rows, cols), barrier)


def copy_tile_out(src, dst, b, r0, c0, h):
  """TMA copies of SMEM (64, ...) to the 8 x 8 tile at (r0, c0) of dst (B, H, W, heads, ...)."""
  for i in range(TILE):
    plgpu.copy_smem_to_gmem(src.at[pl.ds(i * TILE, TILE)],
                            dst.at[b, r0 + i, pl.ds(c0, TILE), h], commit_group=False)


def copy_stats_tile_out(src, dst, b, h, r0, c0):
  plgpu.copy_smem_to_gmem(src.reshape(TILE, TILE), dst.at[b, h, pl.ds(r0, TILE), pl.ds(c0, TILE)],
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


def load_row_vector(ref):
  """A float32 SMEM vector with one value per row of a score block (for row_broadcast)."""
  return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1))


def load_col_vector(ref):
  """A float32 SMEM vector with one value per column of a score block (for col_broadcast)."""
  return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))


def scores(q_smem, k_smem, shape):
  """q @ k^T into a fresh float32 accumulator of `shape`."""
  def body(acc):
    plgpu.wgmma(acc, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
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
