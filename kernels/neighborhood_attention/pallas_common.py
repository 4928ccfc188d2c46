"""Pieces shared by the Pallas kernels: the in-kernel window rule, tile geometry, padding."""

import dataclasses

import jax
import jax.numpy as jnp

from hdit_kernels.neighborhood_attention import tiling

# Finite, so that exp(MASK_VALUE - max) is 0 without inf - inf; every query has k^2 valid keys.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def attends(query_pos, key_pos, length: int, kernel_size: int):
  """NATTEN's rule on one axis (dilation 1): key in [start, start + k), start clamped inside.

  Query positions past the end (padding) clamp like the last query, so their rows stay finite.
  """
  start = jnp.clip(query_pos - kernel_size // 2, 0, length - kernel_size)
  return (key_pos >= start) & (key_pos < start + kernel_size)


def divmod_small(x: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """(x // m, x % m) for int32 vectors 0 <= x < 2**22, through float32 (no vector int divide)."""
  if m & (m - 1) == 0:
    shift = m.bit_length() - 1
    return x >> shift, x & (m - 1)
  quot = jnp.floor((x.astype(jnp.float32) + 0.5) * (1.0 / m)).astype(jnp.int32)
  return quot, x - quot * m


def pad_to_tiles(x: jax.Array, plan_h: tiling.AxisPlan, plan_w: tiling.AxisPlan) -> jax.Array:
  """Zero-pads axes 1 and 2 of (B, H, W, ...) to whole tiles (a no-op when they divide)."""
  ph = plan_h.num_tiles * plan_h.tile - x.shape[1]
  pw = plan_w.num_tiles * plan_w.tile - x.shape[2]
  if ph == 0 and pw == 0:
    return x
  return jnp.pad(x, [(0, 0), (0, ph), (0, pw)] + [(0, 0)] * (x.ndim - 3))


def lane_group(num_heads: int, head_dim: int) -> int:
  """Lanes processed together: the fewest whole heads filling whole 128-lane tiles, else all."""
  for per_group in range(1, num_heads + 1):
    if num_heads % per_group == 0 and (per_group * head_dim) % 128 == 0:
      return per_group * head_dim
  return num_heads * head_dim


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static shapes of one grid step of the TPU kernels (tokens flattened row-major in a tile).

  th x tw is the tile, sh x sw the key halo of a query tile, sqh x sqw the query halo of a key
  tile; tq, sk, sq are their token counts.
  """
  height: int
  width: int
  kernel_size: int
  th: int
  tw: int
  sh: int
  sw: int
  sqh: int
  sqw: int
  num_heads: int
  head_dim: int
  lane_group: int
  precision: jax.lax.Precision | None

  @classmethod
  def create(cls, plan_h: tiling.AxisPlan, plan_w: tiling.AxisPlan, num_heads: int,
             head_dim: int, dtype) -> "Geometry":
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return cls(plan_h.length, plan_w.length, plan_h.kernel_size, plan_h.tile, plan_w.tile,
               plan_h.kv_span, plan_w.kv_span, plan_h.q_span, plan_w.q_span, num_heads,
               head_dim, lane_group(num_heads, head_dim), precision)

  @property
  def tq(self) -> int:
    return self.th * self.tw

  @property
  def sk(self) -> int:
    return self.sh * self.sw

  @property
  def sq(self) -> int:
    return self.sqh * self.sqw

  @property
  def channels(self) -> int:
    return self.num_heads * self.head_dim

  def head_lanes(self) -> jax.Array:
    """(1, lane_group) int32: which head of the lane group each lane belongs to."""
    return divmod_small(jax.lax.broadcasted_iota(jnp.int32, (1, self.lane_group), 1),
                        self.head_dim)[0]

  def _mask(self, shape, q_cols, q_r0, q_c0, k_cols, k_r0, k_c0):
    """(queries, keys) window mask; tokens are row-major in blocks q_cols / k_cols wide."""
    qr, qc = divmod_small(jax.lax.broadcasted_iota(jnp.int32, shape, 0), q_cols)
    kr, kc = divmod_small(jax.lax.broadcasted_iota(jnp.int32, shape, 1), k_cols)
    return (attends(q_r0 + qr, k_r0 + kr, self.height, self.kernel_size)
            & attends(q_c0 + qc, k_c0 + kc, self.width, self.kernel_size))

  def mask_queries_tile(self, i, j, halo_r0, halo_c0) -> jax.Array:
    """(tq, sk) bool for query tile (i, j) against its key halo starting at (halo_r0, halo_c0)."""
    return self._mask((self.tq, self.sk), self.tw, i * self.th, j * self.tw,
                      self.sw, halo_r0, halo_c0)

  def mask_keys_tile(self, i, j, halo_r0, halo_c0) -> jax.Array:
    """(sq, tk) bool: query halo (from (halo_r0, halo_c0)) against key tile (i, j).

    Halo queries always lie inside the map (tiling.py), so no in-map test is needed.
    """
    return self._mask((self.sq, self.tq), self.sqw, halo_r0, halo_c0,
                      self.tw, i * self.th, j * self.tw)
