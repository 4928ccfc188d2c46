"""Static tile plans for halo-tiled neighborhood attention (dilation 1), computed in numpy.

Every implementation tiles each spatial axis the same way:

* forward and dq: a tile of `tile` consecutive queries needs the keys from the window start of
  its first query to the window end of its last one. Window starts are non-decreasing, so this is
  one contiguous range of at most tile + kernel_size - 1 keys (NATTEN's inward-shifted windows
  stay inside the map, so no padding is ever read).
* dk and dv: a tile of keys is attended by a contiguous range of queries (the inverse
  neighborhood), at most tile + 2 * (kernel_size - 1) long near the borders.

Each range is widened to a common static `span` and its start clamped so that
[start, start + span) lies inside the axis: kernels then load fixed-size halos at per-tile
offsets (scalar tables) and mask per query with the exact window rule.
"""

import dataclasses

import numpy as np

from hdit_kernels.neighborhood_attention import windows


@dataclasses.dataclass(frozen=True)
class AxisPlan:
  """Tiling of one spatial axis.

  Attributes:
    length: axis length L.
    kernel_size: window size k (<= L).
    tile: queries (or keys) per tile along this axis.
    num_tiles: ceil(L / tile); the last tile may be partial.
    kv_span: keys loaded per query tile (static), <= L.
    kv_starts: (num_tiles,) int32, first key loaded for each query tile.
    q_span: queries loaded per key tile (static), <= L.
    q_starts: (num_tiles,) int32, first query loaded for each key tile.
  """
  length: int
  kernel_size: int
  tile: int
  num_tiles: int
  kv_span: int
  kv_starts: np.ndarray
  q_span: int
  q_starts: np.ndarray


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _fit(lo: np.ndarray, hi: np.ndarray, length: int, align: int,
         multiple: int = 1) -> tuple[int, np.ndarray]:
  """Common span covering every [lo, hi) with starts aligned down to `align`, inside [0, L).

  The span is rounded up to a multiple of `align` and of `multiple` where the axis allows.
  """
  starts = (lo // align) * align
  span = _round_up(int(np.max(hi - starts)), align)
  if _round_up(span, multiple) <= length:
    span = _round_up(span, multiple)
  span = min(span, length)
  # Shifting a start down keeps [lo, hi) covered because hi <= length.
  starts = np.minimum(starts, length - span)
  if align > 1 and span < length and np.any(starts % align):
    # Only reachable when length % align != 0: fall back to the whole axis.
    span, starts = length, np.zeros_like(starts)
  return span, starts.astype(np.int32)


def axis_plan(length: int, kernel_size: int, tile: int, align: int = 1,
              q_span_multiple: int = 1) -> AxisPlan:
  """Tiles an axis of `length` positions into tiles of `tile`, for windows of `kernel_size`.

  `align` rounds halo starts down (and spans up) to a multiple, for hardware whose memory
  layout tiles this axis (TPU sublanes); `q_span_multiple` rounds the query-halo span up where
  the axis is long enough. Spans never exceed the axis.
  """
  windows.check_window(length, kernel_size, 1)
  tile = min(tile, length)
  starts = windows.window_starts(length, kernel_size, 1).astype(np.int64)
  num_tiles = -(-length // tile)
  first = np.arange(num_tiles) * tile
  last = np.minimum(first + tile, length) - 1
  kv_span, kv_starts = _fit(starts[first], starts[last] + kernel_size, length, align)
  # Queries attending key j: start[i] <= j < start[i] + k; starts are sorted, so searchsorted.
  q_lo = np.searchsorted(starts + kernel_size - 1, first, side="left")
  q_hi = np.searchsorted(starts, last, side="right")
  q_span, q_starts = _fit(q_lo, q_hi, length, align, q_span_multiple)
  return AxisPlan(length, kernel_size, tile, num_tiles, kv_span, kv_starts, q_span, q_starts)
