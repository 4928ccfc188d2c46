"""The tiling of the Mosaic GPU neighborhood-attention kernels: tiles, halos, and the steps
by which a kernel walks a halo (Stream).

A tile is 64 tokens of the map, 8 x 8 or 4 x 16 (the 64 rows of a warpgroup's wgmma). Its halo
is the rectangle of keys its queries attend to (forward, dq) or of the queries attending its
keys (dk/dv: NATTEN's inverse neighborhood). Mosaic GPU lays (tokens, dim) wgmma operands out in
SMEM tiles of 8 tokens, and a TMA copy into such tiles must start on a multiple of 8 tokens
(jax 0.11 checks this; 0.10 would copy the wrong tokens): a halo's columns start on a multiple
of 8, its rows anywhere (each row is one copy), and it holds a multiple of 64 tokens (wgmma's
contraction). Of the rectangles with those properties that hold every tile's window on the map
(origins clamped inside it), a geometry takes the smallest: for k = 7 on wide maps 10 x 32 keys
per 4 x 16 tile (6.5x the 49 useful) or 16 x 24 per 8 x 8 tile (7.8x). The tile shape is the one
whose halos sum to the fewest tokens over the three kernels (forward, dq, dk/dv). In SMEM, halo
token t is (t // cols, t % cols) of the halo, tile token t is (t // tile_cols, t % tile_cols) of
the tile.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hdit_kernels.neighborhood_attention.windows import attending_range, window_start

TILE_TOKENS = 64
TILE_ROWS = (8, 4)      # 8 x 8 or 4 x 16 tiles; ties go to the first
ALIGN = 8               # a halo's first column is a multiple of this
MIN_SIDE = 16


class Halo(NamedTuple):
  rows: int
  cols: int

  @property
  def tokens(self) -> int:
    return self.rows * self.cols


def _smallest_halo(rows_needed: int, cols_needed: int, height: int, width: int) -> Halo:
  """The fewest tokens of at least rows_needed x cols_needed (cols a multiple of ALIGN), a
  multiple of TILE_TOKENS in all, inside the map (whose sides are multiples of ALIGN: the whole
  map always qualifies)."""
  best = Halo(height, width)
  for cols in range(width, cols_needed - 1, -ALIGN):
    rows = rows_needed
    while (rows * cols) % TILE_TOKENS:
      rows += 1
    if rows <= height and rows * cols < best.tokens:   # ties: the widest (fewest copies)
      best = Halo(rows, cols)
  return best


def shape_reason(height: int, width: int, tile_rows: int) -> str | None:
  """Why tiles of tile_rows x (64 / tile_rows) cannot tile the map, or None."""
  if tile_rows not in TILE_ROWS:
    return f"tile_rows {tile_rows} (one of {TILE_ROWS})"
  for length, axis, side in ((height, "height", tile_rows),
                             (width, "width", TILE_TOKENS // tile_rows)):
    if length % ALIGN or length < MIN_SIDE:
      return f"{axis} {length} must be a multiple of {ALIGN} and >= {MIN_SIDE}"
    if length % side:
      return f"{axis} {length} is not a multiple of the tile's {side}"
  return None


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static shapes of a call: map size, window and tile shape (`choose` picks the tile)."""
  height: int
  width: int
  kernel_size: int
  tile_rows: int = 8

  @classmethod
  def choose(cls, height: int, width: int, kernel_size: int, tile_rows: int = 0) -> "Geometry":
    """The geometry with the fewest halo tokens over the three kernels, of the tile shapes
    that tile the map (only tile_rows' where given); ValueError names why none does."""
    candidates = [tile_rows] if tile_rows else list(TILE_ROWS)
    reasons = {r: shape_reason(height, width, r) for r in candidates}
    fitting = [cls(height, width, kernel_size, r) for r in candidates if reasons[r] is None]
    if not fitting:
      raise ValueError(reasons[candidates[0]])
    return min(fitting, key=lambda g: 2 * g.key_halo.tokens + g.query_halo.tokens)

  @property
  def tile_cols(self) -> int:
    return TILE_TOKENS // self.tile_rows

  @property
  def num_tiles(self) -> int:
    return (self.height // self.tile_rows) * (self.width // self.tile_cols)

  def tile_origin(self, tile):
    tiles_w = self.width // self.tile_cols
    return (tile // tiles_w) * self.tile_rows, (tile % tiles_w) * self.tile_cols

  def needs(self, kind: str):
    """[lo, hi) of the rows and of the columns that each row / column of tiles needs, for
    kind 'key' (the keys its queries attend) or 'query' (the queries attending its keys):
    ((row_lo, row_hi), (col_lo, col_hi)), numpy arrays over tile rows / tile columns."""
    ks = self.kernel_size

    def span(x0, side, length):
      x1 = x0 + side - 1
      if kind == "key":
        return window_start(x0, length, ks), window_start(x1, length, ks) + ks
      return attending_range(x0, x1, length, ks)

    with jax.ensure_compile_time_eval():  # concrete even when asked under a trace
      rows = span(np.arange(0, self.height, self.tile_rows), self.tile_rows, self.height)
      cols = span(np.arange(0, self.width, self.tile_cols), self.tile_cols, self.width)
      return tuple(tuple(np.asarray(x) for x in pair) for pair in (rows, cols))

  def _halo(self, kind: str) -> Halo:
    (row_lo, row_hi), (col_lo, col_hi) = self.needs(kind)
    cols = int((col_hi - col_lo // ALIGN * ALIGN).max())
    return _smallest_halo(int((row_hi - row_lo).max()), -(-cols // ALIGN) * ALIGN,
                          self.height, self.width)

  @functools.cached_property
  def key_halo(self) -> Halo:
    """The keys of a query tile (forward, dq)."""
    return self._halo("key")

  @functools.cached_property
  def query_halo(self) -> Halo:
    """The queries attending a key tile (dk/dv)."""
    return self._halo("query")

  def _origin(self, halo: Halo, row_lo, col_lo):
    # (x // 8) * 8 and min of multiples of 8: Mosaic GPU proves the column tile-aligned.
    return (jnp.minimum(row_lo, self.height - halo.rows),
            jnp.minimum((col_lo // ALIGN) * ALIGN, self.width - halo.cols))

  def key_halo_origin(self, r0, c0):
    """Top-left key of the halo of the query tile at (r0, c0); its column a multiple of 8."""
    ks = self.kernel_size
    return self._origin(self.key_halo, window_start(r0, self.height, ks),
                        window_start(c0, self.width, ks))

  def query_halo_origin(self, r0, c0):
    """Top-left query of the halo of queries attending the key tile at (r0, c0)."""
    ks = self.kernel_size
    row_lo, _ = attending_range(r0, r0 + self.tile_rows - 1, self.height, ks)
    col_lo, _ = attending_range(c0, c0 + self.tile_cols - 1, self.width, ks)
    return self._origin(self.query_halo, row_lo, col_lo)

  @functools.cache   # asked by the dispatcher and by each kernel, for every call traced
  def covers(self) -> str | None:
    """Why a clamped halo would miss a needed token or leave the map, or None (host check)."""
    with jax.ensure_compile_time_eval():
      for kind, halo, origin in (("key", self.key_halo, self.key_halo_origin),
                                 ("query", self.query_halo, self.query_halo_origin)):
        (row_lo, row_hi), (col_lo, col_hi) = self.needs(kind)
        r0 = np.arange(0, self.height, self.tile_rows)
        c0 = np.arange(0, self.width, self.tile_cols)
        hr, hc = (np.asarray(x) for x in origin(r0, c0))
        for axis, lo, hi, start, span, length in (
            ("rows", row_lo, row_hi, hr, halo.rows, self.height),
            ("columns", col_lo, col_hi, hc, halo.cols, self.width)):
          bad = ~((0 <= start) & (start <= lo) & (hi <= start + span) & (start + span <= length))
          if axis == "columns":
            bad |= start % ALIGN != 0
          if bad.any():
            x = int((r0 if axis == "rows" else c0)[bad.argmax()])
            return (f"the {kind} halo ({halo.rows} x {halo.cols}) of the tiles at {axis[:-1]} "
                    f"{x} misses {axis} for kernel_size {self.kernel_size}")
    return None


def blocks(tokens: int, block: int) -> tuple[tuple[int, int], ...]:
  """(start, size) of the steps through `tokens` halo tokens, `block` at a time (the last step
  takes the rest; both multiples of 64)."""
  return tuple((start, min(block, tokens - start)) for start in range(0, tokens, block))


@dataclasses.dataclass(frozen=True)
class Stream:
  """How a kernel walks a halo: its steps, their TMA loads and where they land in SMEM.

  Steps of whole halo rows are loaded one by one, each on its own barrier, so a step starts as
  soon as its rows have landed. With slots = 0 the whole halo stays resident; with slots = n,
  SMEM holds n step-sized buffers and step i + n is loaded into step i's buffer once step i is
  done (less SMEM per program, so more programs per SM hide each other's loads). Steps that cut
  halo rows are loaded as one group (slots must be 0).
  """
  halo: Halo
  steps: tuple[tuple[int, int], ...]
  slots: int = 0

  def __post_init__(self):
    if self.slots < 0 or (self.slots and not self.whole_rows):
      raise ValueError(f"slots {self.slots} need steps of whole rows of the {self.halo.rows} x "
                       f"{self.halo.cols} halo, got {self.steps}")

  @property
  def whole_rows(self) -> bool:
    return all(start % self.halo.cols == 0 and size % self.halo.cols == 0
               for start, size in self.steps)

  @property
  def groups(self) -> tuple[tuple[int, int], ...]:
    """(first halo row, rows) of each load."""
    cols = self.halo.cols
    if self.whole_rows:
      return tuple((start // cols, size // cols) for start, size in self.steps)
    return ((0, self.halo.rows),)

  def group_of(self, step: int) -> int:
    return step if self.whole_rows else 0

  @property
  def slot_tokens(self) -> int:
    return max(size for _, size in self.steps)

  @property
  def buffer_tokens(self) -> int:
    return self.slots * self.slot_tokens if self.slots else self.halo.tokens

  def offset(self, group: int) -> int:
    """First token of a load group in its buffer."""
    if self.slots:
      return (group % self.slots) * self.slot_tokens
    return self.groups[group][0] * self.halo.cols

  def preloaded(self) -> int:
    """Load groups issued before the first step."""
    return min(self.slots, len(self.groups)) if self.slots else len(self.groups)

  def location(self, step: int) -> tuple[int, int]:
    """(first token, tokens) of step `step` in its buffer."""
    start, size = self.steps[step]
    group = self.group_of(step)
    return self.offset(group) + start - self.groups[group][0] * self.halo.cols, size

  def view(self, buffer, step: int):
    """The SMEM of step `step`'s tokens in `buffer`."""
    return buffer.at[pl.ds(*self.location(step))]

  def starts_group(self, step: int) -> bool:
    """Whether step `step` is the first of its load group (the kernel waits for it there)."""
    return step == 0 or self.group_of(step - 1) != self.group_of(step)

  def refill_after(self, step: int) -> int | None:
    """The load group to issue into the buffer step `step` has just finished with, or None."""
    if not self.slots:
      return None
    group = step + self.slots   # slots need whole-row steps: group i is step i
    return group if group < len(self.groups) else None

  def barriers(self, extra_arrivals: int = 0):
    """One barrier per load group: a TMA copy per row (plus extra_arrivals copies)."""
    return tuple(plgpu.Barrier(num_arrivals=rows + extra_arrivals) for _, rows in self.groups)
