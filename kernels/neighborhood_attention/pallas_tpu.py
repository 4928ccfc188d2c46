"""Neighborhood attention on TPU: Pallas (Mosaic) forward, dq and dk/dv kernels.

Design (figures and versions in benchmarks/NOTES.md):
* Tokens are viewed as (B, H, W, C) with C = heads * head_dim on lanes (a free reshape), so a
  block is lane-dense whatever the head count. One grid step takes a (block_h x block_w) tile of
  queries with all heads and the key/value halo of that tile, loaded by the Pallas pipeline
  (double-buffered) through `pl.Element` block dims at per-tile offsets from scalar-prefetch
  tables (see tiling.py). Halo column starts are aligned to the sublane tiling (16 rows for
  16-bit, 8 for 32-bit types) so the DMAs never start mid-tile.
* Heads are processed from lane groups of 128 (two heads of 64): instead of slicing a head's 64
  lanes (a relayout), the other head's lanes of q are zeroed, which costs nothing on a 128-deep
  MXU, and each head's output lanes are selected from a full-width P @ V.
* The whole halo fits in VMEM (e.g. 14 x 48 keys for an 8 x 16 tile, k = 7), so the softmax is
  exact in one pass, masked per query with NATTEN's window rule; no online rescaling.
* Backward: dq per query tile over the key halo (as the forward), dk/dv per key tile over the
  halo of queries that attend to it (inverse neighborhood), recomputing P from the saved lse.

Layout: q, k, v (B, H, W, heads, head_dim); lse (B, H, W, heads) float32; dilation 1.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hdit_kernels.neighborhood_attention import autodiff, tiling
from hdit_kernels.neighborhood_attention import pallas_common as common

_TRANS_B = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Config:
  """Block sizes and compiler limits.

  Attributes:
    block_h, block_w: query (forward, dq) and key (dk/dv) tile; block_w is a multiple of 8.
    col_align: halo column alignment (None: 16 for 16-bit dtypes, 8 for 32-bit).
    vmem_limit_bytes: scoped VMEM limit passed to Mosaic (fits v5e, v6e and v7x).
    interpret: run in interpret mode (CPU tests).
  """
  block_h: int = 8
  block_w: int = 16
  col_align: int | None = None
  vmem_limit_bytes: int = 48 * 1024 * 1024
  interpret: bool = False


def _align(dtype, config: Config) -> int:
  return config.col_align or (16 if jnp.dtype(dtype).itemsize == 2 else 8)


def _plans(shape, dtype, kernel_size: int, config: Config):
  _, height, width = shape[:3]
  block_w = min(config.block_w, common.round_up(width, 8))
  plan_w = tiling.axis_plan(width, kernel_size, block_w, _align(dtype, config))
  # dk/dv transposes (query halo, key tile) blocks: keep the halo's token count a multiple of
  # 128 (whole lane tiles once transposed) where the map allows, e.g. 16 x 48 rather than 14 x 48.
  rows_multiple = 128 // math.gcd(plan_w.q_span, 128)
  return tiling.axis_plan(height, kernel_size, config.block_h,
                          q_span_multiple=rows_multiple), plan_w


def _vmem_bytes(shape, dtype, kernel_size: int, config: Config) -> int:
  """Rough VMEM need of the largest kernel (dk/dv): double-buffered blocks + f32 temporaries."""
  plan_h, plan_w = _plans(shape, dtype, kernel_size, config)
  channels = shape[3] * shape[4]
  tokens = plan_h.tile * plan_w.tile
  halo = max(plan_h.kv_span * plan_w.kv_span, plan_h.q_span * plan_w.q_span)
  isz = jnp.dtype(dtype).itemsize
  blocks = 2 * (4 * tokens + 2 * halo) * channels * isz + 2 * 2 * halo * 128 * 4
  return blocks + 6 * tokens * halo * 4 + 4 * tokens * channels * 4


def unsupported(shape, dtype, kernel_size: int, config: Config | None) -> str | None:
  """Why this kernel cannot run the case, or None."""
  config = config or Config()
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"dtype {jnp.dtype(dtype)}"
  if config.block_w % 8:
    return f"block_w={config.block_w} is not a multiple of 8"
  need = _vmem_bytes(shape, dtype, kernel_size, config)
  if need > config.vmem_limit_bytes:
    return f"needs ~{need >> 20} MiB of VMEM > limit {config.vmem_limit_bytes >> 20} MiB"
  return None


def _heads(num_heads: int, head_dim: int, lane_group: int):
  """(head, lane-group slice, index of the head inside its group) for each head."""
  per_group = lane_group // head_dim
  return [(h, slice((h // per_group) * lane_group, (h // per_group + 1) * lane_group),
           h % per_group) for h in range(num_heads)]


def _column(stats, head: int):
  """Column `head` of a (tokens, heads) float32 block as (tokens, 1), without a lane slice."""
  lane = jax.lax.broadcasted_iota(jnp.int32, stats.shape, 1)
  return jnp.sum(jnp.where(lane == head, stats, 0.0), axis=1, keepdims=True)


def _fwd_kernel(rows_ref, cols_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, geom, scale):
  i, j = pl.program_id(1), pl.program_id(2)
  g = geom
  mask = g.mask_queries_tile(i, j, rows_ref[i], cols_ref[j])   # (tq, sk)
  lse = jnp.zeros((g.tq, g.num_heads), jnp.float32)
  outs = {}
  for h, lanes, slot in _heads(g.num_heads, g.head_dim, g.lane_group):
    q = q_ref[:, :, lanes].reshape(g.tq, g.lane_group)
    k = k_ref[:, :, lanes].reshape(g.sk, g.lane_group)
    v = v_ref[:, :, lanes].reshape(g.sk, g.lane_group)
    own = g.head_lanes() == slot                               # (1, lane_group)
    s = jax.lax.dot_general(jnp.where(own, q, 0), k, _TRANS_B, precision=g.precision,
                            preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, common.MASK_VALUE)
    m = jnp.max(s, axis=1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, precision=g.precision,
                 preferred_element_type=jnp.float32)
    outs[lanes.start] = jnp.where(own, pv / l, outs.get(lanes.start, 0.0))
    lse = jnp.where(jax.lax.broadcasted_iota(jnp.int32, lse.shape, 1) == h,
                    m + jnp.log(l), lse)
  for start, o in outs.items():
    o_ref[:, :, start:start + g.lane_group] = o.reshape(
        g.th, g.tw, g.lane_group).astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(g.th, g.tw, g.num_heads)


def _dq_kernel(rows_ref, cols_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               geom, scale):
  i, j = pl.program_id(1), pl.program_id(2)
  g = geom
  mask = g.mask_queries_tile(i, j, rows_ref[i], cols_ref[j])
  lse = lse_ref[...].reshape(g.tq, g.num_heads)
  delta = delta_ref[...].reshape(g.tq, g.num_heads)
  outs = {}
  for h, lanes, slot in _heads(g.num_heads, g.head_dim, g.lane_group):
    q = q_ref[:, :, lanes].reshape(g.tq, g.lane_group)
    do = do_ref[:, :, lanes].reshape(g.tq, g.lane_group)
    k = k_ref[:, :, lanes].reshape(g.sk, g.lane_group)
    v = v_ref[:, :, lanes].reshape(g.sk, g.lane_group)
    own = g.head_lanes() == slot
    s = jax.lax.dot_general(jnp.where(own, q, 0), k, _TRANS_B, precision=g.precision,
                            preferred_element_type=jnp.float32) * scale
    p = jnp.where(mask, jnp.exp(s - _column(lse, h)), 0.0)
    dp = jax.lax.dot_general(jnp.where(own, do, 0), v, _TRANS_B, precision=g.precision,
                             preferred_element_type=jnp.float32)
    ds = p * (dp - _column(delta, h))
    dq = jnp.dot(ds.astype(k.dtype), k, precision=g.precision,
                 preferred_element_type=jnp.float32) * scale
    outs[lanes.start] = jnp.where(own, dq, outs.get(lanes.start, 0.0))
  for start, dq in outs.items():
    dq_ref[:, :, start:start + g.lane_group] = dq.reshape(
        g.th, g.tw, g.lane_group).astype(dq_ref.dtype)


def _dkv_kernel(rows_ref, cols_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, geom, scale):
  i, j = pl.program_id(1), pl.program_id(2)
  g = geom
  mask = g.mask_keys_tile(i, j, rows_ref[i], cols_ref[j])      # (sq, tk): query attends key
  lse = lse_ref[...].reshape(g.sq, g.num_heads)
  delta = delta_ref[...].reshape(g.sq, g.num_heads)
  dks, dvs = {}, {}
  for h, lanes, slot in _heads(g.num_heads, g.head_dim, g.lane_group):
    k = k_ref[:, :, lanes].reshape(g.tq, g.lane_group)
    v = v_ref[:, :, lanes].reshape(g.tq, g.lane_group)
    q = q_ref[:, :, lanes].reshape(g.sq, g.lane_group)
    do = do_ref[:, :, lanes].reshape(g.sq, g.lane_group)
    own = g.head_lanes() == slot
    s = jax.lax.dot_general(jnp.where(own, q, 0), k, _TRANS_B, precision=g.precision,
                            preferred_element_type=jnp.float32) * scale
    p = jnp.where(mask, jnp.exp(s - _column(lse, h)), 0.0)
    dv = jnp.dot(p.T.astype(do.dtype), do, precision=g.precision,
                 preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(jnp.where(own, do, 0), v, _TRANS_B, precision=g.precision,
                             preferred_element_type=jnp.float32)
    ds = p * (dp - _column(delta, h))
    dk = jnp.dot(ds.T.astype(q.dtype), q, precision=g.precision,
                 preferred_element_type=jnp.float32) * scale
    dks[lanes.start] = jnp.where(own, dk, dks.get(lanes.start, 0.0))
    dvs[lanes.start] = jnp.where(own, dv, dvs.get(lanes.start, 0.0))
  for start in dks:
    dk_ref[:, :, start:start + g.lane_group] = dks[start].reshape(
        g.th, g.tw, g.lane_group).astype(dk_ref.dtype)
    dv_ref[:, :, start:start + g.lane_group] = dvs[start].reshape(
        g.th, g.tw, g.lane_group).astype(dv_ref.dtype)


def _call(kernel, grid, tables, in_specs, out_specs, out_shape, config, name):
  """pallas_call over `grid` with the halo-start tables as scalar prefetch; returns a callable."""
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs)
  call = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=config.interpret, name=name,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel"),
          vmem_limit_bytes=config.vmem_limit_bytes))
  tables = tuple(jnp.asarray(t, jnp.int32) for t in tables)
  return lambda *args: call(*tables, *args)


def _specs(geom):
  """BlockSpecs: the tile itself, and the halos (element offsets from the scalar tables)."""
  c, n = geom.channels, geom.num_heads
  tile = pl.BlockSpec((None, geom.th, geom.tw, c), lambda b, i, j, r, s: (b, i, j, 0))
  tile_stats = pl.BlockSpec((None, geom.th, geom.tw, n), lambda b, i, j, r, s: (b, i, j, 0))

  def halo(rows, cols, lanes):
    # Mosaic wants every non-squeezed dim of an element-offset block to be an Element.
    return pl.BlockSpec((None, pl.Element(rows), pl.Element(cols), pl.Element(lanes)),
                        lambda b, i, j, r, s: (b, r[i], s[j], 0))

  return tile, tile_stats, halo


def forward(q, k, v, kernel_size, scale, config):
  """Returns out (B, H, W, n, d) in q's dtype and lse (B, H, W, n) float32."""
  b, height, width, n, d = q.shape
  plan_h, plan_w = _plans(q.shape, q.dtype, kernel_size, config)
  geom = common.Geometry.create(plan_h, plan_w, n, d, q.dtype)
  tile, tile_stats, halo = _specs(geom)
  kv_halo = halo(plan_h.kv_span, plan_w.kv_span, geom.channels)
  qp = common.pad_to_tiles(q.reshape(b, height, width, -1), plan_h, plan_w)
  out, lse = _call(
      functools.partial(_fwd_kernel, geom=geom, scale=scale),
      (b, plan_h.num_tiles, plan_w.num_tiles), (plan_h.kv_starts, plan_w.kv_starts),
      [tile, kv_halo, kv_halo], [tile, tile_stats],
      [jax.ShapeDtypeStruct(qp.shape, q.dtype),
       jax.ShapeDtypeStruct(qp.shape[:3] + (n,), jnp.float32)], config, "na2d_fwd_tpu",
  )(qp, k.reshape(b, height, width, -1), v.reshape(b, height, width, -1))
  return (out[:, :height, :width].reshape(q.shape), lse[:, :height, :width])


def backward(q, k, v, out, lse, dout, kernel_size, scale, config):
  """Returns (dq, dk, dv) in the inputs' dtypes."""
  b, height, width, n, d = q.shape
  plan_h, plan_w = _plans(q.shape, q.dtype, kernel_size, config)
  geom = common.Geometry.create(plan_h, plan_w, n, d, q.dtype)
  tile, tile_stats, halo = _specs(geom)
  delta = autodiff.attention_delta(out, dout)
  flat = lambda t: t.reshape(b, height, width, -1)
  padded = lambda t: common.pad_to_tiles(t, plan_h, plan_w)
  grid = (b, plan_h.num_tiles, plan_w.num_tiles)

  kv_halo = halo(plan_h.kv_span, plan_w.kv_span, geom.channels)
  dq = _call(
      functools.partial(_dq_kernel, geom=geom, scale=scale), grid,
      (plan_h.kv_starts, plan_w.kv_starts),
      [tile, kv_halo, kv_halo, tile, tile_stats, tile_stats], tile,
      jax.ShapeDtypeStruct(padded(flat(q)).shape, q.dtype), config, "na2d_dq_tpu",
  )(padded(flat(q)), flat(k), flat(v), padded(flat(dout)), padded(lse), padded(delta))

  q_halo = halo(plan_h.q_span, plan_w.q_span, geom.channels)
  stats_halo = halo(plan_h.q_span, plan_w.q_span, n)
  kp = padded(flat(k))
  dk, dv = _call(
      functools.partial(_dkv_kernel, geom=geom, scale=scale), grid,
      (plan_h.q_starts, plan_w.q_starts),
      [tile, tile, q_halo, q_halo, stats_halo, stats_halo], [tile, tile],
      [jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(kp.shape, v.dtype)],
      config, "na2d_dkv_tpu",
  )(kp, padded(flat(v)), flat(q), flat(dout), lse, delta)
  crop = lambda t: t[:, :height, :width].reshape(q.shape)
  return crop(dq), crop(dk), crop(dv)


na2d = autodiff.with_lse_vjp(forward, backward)
