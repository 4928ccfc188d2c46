"""Backward kernels of the Mosaic GPU neighborhood attention: dq (with D), then dk/dv.

FlashAttention-2's backward, with NATTEN's window as the mask:
  P = exp(S - lse), dP = dO V^T, dS = P * (dP - D), dQ = scale dS K, dK = scale dS^T Q,
  dV = P^T dO, with D = rowsum(dO * O).
* dq kernel (per query tile): D of the tile from O and dO in registers (written out for the
  next kernel), then the key halo in steps (its own halos.Stream, like the forward's).
* dk/dv kernel (per key tile): the halo of queries attending the tile (NATTEN's inverse
  neighborhood: for k = 7 and 4 x 16 tiles, up to 11 rows, in a 12 x 32 halo) in blocks,
  transposed scores S^T = K Q^T so that dK and dV accumulate in registers; no atomics.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from hdit_kernels.neighborhood_attention import mosaic_gpu_halos as halos
from hdit_kernels.neighborhood_attention import mosaic_gpu_tiles as tiles

_TOKENS = halos.TILE_TOKENS


def _dq_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, delta_ref, q_smem, o_smem,
               do_smem, k_smem, v_smem, lse_smem, delta_smem, tile_bar, k_bars, v_bars, *, geo,
               stream, scale):
  tile, h, b = tiles.grid_axes()
  r0, c0 = geo.tile_origin(tile)
  k_origin = geo.key_halo_origin(r0, c0)

  load = tiles.halo_loader((k_ref, v_ref), b, k_origin, h, (k_smem, v_smem), (k_bars, v_bars),
                           stream)

  for src, dst in ((q_ref, q_smem), (o_ref, o_smem), (do_ref, do_smem)):
    tiles.copy_tile_in(src, b, r0, c0, h, dst, tiles.single(tile_bar), geo)
  tiles.copy_stats_in(lse_ref, b, h, r0, c0, lse_smem, tiles.single(tile_bar), geo.tile_rows,
                      geo.tile_cols)
  for group in range(stream.preloaded()):
    load(group)
  plgpu.barrier_wait(tiles.single(tile_bar))

  o = tiles.load(o_smem, plgpu.Layout.WGMMA).astype(jnp.float32)
  do = tiles.load(do_smem, plgpu.Layout.WGMMA).astype(jnp.float32)
  delta = (o * do).sum(axis=1)
  lse2 = tiles.load_row_vector(lse_smem)
  delta_smem[...] = delta

  dq = tiles.zeros((_TOKENS, q_ref.shape[-1]))
  for i, (start, size) in enumerate(stream.steps):
    shape, group = (_TOKENS, size), stream.group_of(i)
    if stream.starts_group(i):
      plgpu.barrier_wait(tiles.single(k_bars[group]))
    k_step, v_step = stream.view(k_smem, i), stream.view(v_smem, i)
    s = tiles.scores(q_smem, k_step, shape) * (scale * tiles.LOG2E)
    mask = tiles.window_mask(shape, geo, 0, (r0, c0), geo.tile_cols, 0, k_origin,
                             stream.halo.cols, start)
    p = jnp.where(mask, jnp.exp2(s - tiles.row_broadcast(lse2, shape)), 0.0)
    if stream.starts_group(i):
      plgpu.barrier_wait(tiles.single(v_bars[group]))
    dp = tiles.scores(do_smem, v_step, shape)
    ds = p * (dp - tiles.row_broadcast(delta, shape))
    dq = tiles.accumulate(dq, ds.astype(q_ref.dtype), k_step)
    tiles.refill(stream, i, load)

  q_smem[...] = (dq * scale).astype(q_ref.dtype)
  plgpu.commit_smem()
  tiles.copy_tile_out(q_smem, dq_ref, b, r0, c0, h, geo)
  tiles.copy_stats_tile_out(delta_smem, delta_ref, b, h, r0, c0, geo)
  plgpu.commit_smem_to_gmem_group()
  plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem,
                q_smem, do_smem, lse_smem, delta_smem, tile_bar, q_bars, do_bars, *, geo,
                stream, scale):
  tile, h, b = tiles.grid_axes()
  r0, c0 = geo.tile_origin(tile)
  q_origin = geo.query_halo_origin(r0, c0)

  def load(group):
    q_bar, do_bar = tiles.single(q_bars[group]), tiles.single(do_bars[group])
    tiles.copy_group_in(q_ref, b, q_origin, h, q_smem, q_bar, stream, group)
    tiles.copy_group_stats_in(lse_ref, b, q_origin, h, lse_smem, q_bar, stream, group)
    tiles.copy_group_in(do_ref, b, q_origin, h, do_smem, do_bar, stream, group)
    tiles.copy_group_stats_in(delta_ref, b, q_origin, h, delta_smem, do_bar, stream, group)

  tiles.copy_tile_in(k_ref, b, r0, c0, h, k_smem, tiles.single(tile_bar), geo)
  tiles.copy_tile_in(v_ref, b, r0, c0, h, v_smem, tiles.single(tile_bar), geo)
  for group in range(stream.preloaded()):
    load(group)
  plgpu.barrier_wait(tiles.single(tile_bar))

  dk = tiles.zeros((_TOKENS, q_ref.shape[-1]))
  dv = tiles.zeros((_TOKENS, q_ref.shape[-1]))
  for i, (start, size) in enumerate(stream.steps):
    shape, group = (_TOKENS, size), stream.group_of(i)
    if stream.starts_group(i):
      plgpu.barrier_wait(tiles.single(q_bars[group]))
    q_step, do_step = stream.view(q_smem, i), stream.view(do_smem, i)
    st = tiles.scores(k_smem, q_step, shape) * (scale * tiles.LOG2E)
    lse2 = tiles.load_col_vector(stream.view(lse_smem, i))
    mask = tiles.window_mask(shape, geo, 1, q_origin, stream.halo.cols, start, (r0, c0),
                             geo.tile_cols, 0)
    pt = jnp.where(mask, jnp.exp2(st - tiles.col_broadcast(lse2, shape)), 0.0)
    if stream.starts_group(i):
      plgpu.barrier_wait(tiles.single(do_bars[group]))
    dv = tiles.accumulate(dv, pt.astype(q_ref.dtype), do_step)
    dpt = tiles.scores(v_smem, do_step, shape)
    delta = tiles.load_col_vector(stream.view(delta_smem, i))
    dst = pt * (dpt - tiles.col_broadcast(delta, shape))
    dk = tiles.accumulate(dk, dst.astype(q_ref.dtype), q_step)
    tiles.refill(stream, i, load)

  k_smem[...] = (dk * scale).astype(k_ref.dtype)
  v_smem[...] = dv.astype(v_ref.dtype)
  plgpu.commit_smem()
  tiles.copy_tile_out(k_smem, dk_ref, b, r0, c0, h, geo)
  tiles.copy_tile_out(v_smem, dv_ref, b, r0, c0, h, geo)
  plgpu.commit_smem_to_gmem_group()
  plgpu.wait_smem_to_gmem(0)


def dq_and_delta(q, k, v, out, lse, dout, geo: halos.Geometry, stream: halos.Stream,
                 scale: float):
  """dq and D = rowsum(dO * O) (B, heads, H, W) float32; stream: the key halo's walk."""
  d, dtype = q.shape[-1], q.dtype
  matrix = functools.partial(tiles.smem_matrix, head_dim=d, dtype=dtype)
  scratch = (matrix(_TOKENS), matrix(_TOKENS), matrix(_TOKENS), matrix(stream.buffer_tokens),
             matrix(stream.buffer_tokens), plgpu.SMEM((_TOKENS,), jnp.float32),
             plgpu.SMEM((_TOKENS,), jnp.float32),
             plgpu.Barrier(num_arrivals=3 * geo.tile_rows + 1),
             stream.barriers(), stream.barriers())
  kernel = functools.partial(_dq_kernel, geo=geo, stream=stream, scale=scale)
  out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct(lse.shape, jnp.float32))
  return tiles.call(kernel, q, out_type, scratch, geo, "na2d_dq_mgpu")(q, k, v, out, dout, lse)


def dk_dv(q, k, v, dout, lse, delta, geo: halos.Geometry, stream: halos.Stream, scale: float):
  """dk and dv; stream: the query halo's walk."""
  d, dtype = q.shape[-1], q.dtype
  matrix = functools.partial(tiles.smem_matrix, head_dim=d, dtype=dtype)
  tokens = stream.buffer_tokens
  scratch = (matrix(_TOKENS), matrix(_TOKENS), matrix(tokens), matrix(tokens),
             plgpu.SMEM((tokens,), jnp.float32), plgpu.SMEM((tokens,), jnp.float32),
             plgpu.Barrier(num_arrivals=2 * geo.tile_rows),
             stream.barriers(extra_arrivals=1), stream.barriers(extra_arrivals=1))
  kernel = functools.partial(_dkv_kernel, geo=geo, stream=stream, scale=scale)
  out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
  return tiles.call(kernel, q, out_type, scratch, geo, "na2d_dkv_mgpu")(
      q, k, v, dout, lse, delta)


def backward(q, k, v, out, lse, dout, geo: halos.Geometry, key_stream: halos.Stream,
             query_stream: halos.Stream, scale: float):
  """Returns (dq, dk, dv); lse is the forward's base-2 log-sum-exp, (B, heads, H, W) float32."""
  dq, delta = dq_and_delta(q, k, v, out, lse, dout, geo, key_stream, scale)
  dk, dv = dk_dv(q, k, v, dout, lse, delta, geo, query_stream, scale)
  return dq, dk, dv
