"""Backward kernels of the Mosaic GPU neighborhood attention: dq (with D), then dk/dv.

FlashAttention-2's backward, with NATTEN's window as the mask:
  P = exp(S - lse), dP = dO V^T, dS = P * (dP - D), dQ = scale dS K, dK = scale dS^T Q,
  dV = P^T dO, with D = rowsum(dO * O).
* dq kernel (per query tile): D of the tile from O and dO in registers (written out for the
  next kernel), then the key halo in row blocks, as the forward walks it.
* dk/dv kernel (per key tile): the halo of queries attending the tile (NATTEN's inverse
  neighborhood; for k = 7, 14 rows and columns inside the map, fewer at its borders; in a
  16 x 24 halo) in blocks, transposed scores
  S^T = K Q^T so that dK and dV accumulate in registers; no atomics.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hdit_kernels.neighborhood_attention import mosaic_gpu_tiles as tiles

_TOKENS = tiles.TILE ** 2


def _dq_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, delta_ref, q_smem, o_smem,
               do_smem, k_smem, v_smem, lse_smem, delta_smem, tile_bar, k_bar, v_bar, *, geo,
               block, scale):
  tile, h, b = tiles.grid_axes()
  r0, c0 = geo.tile_origin(tile)
  k_origin = geo.key_halo_origin(r0, c0)
  for src, dst in ((q_ref, q_smem), (o_ref, o_smem), (do_ref, do_smem)):
    tiles.copy_tile_in(src, b, r0, c0, h, dst, tiles.single(tile_bar))
  tiles.copy_stats_in(lse_ref, b, h, r0, c0, lse_smem, tiles.single(tile_bar), tiles.TILE,
                      tiles.TILE)
  tiles.copy_halo_in(k_ref, b, *k_origin, h, k_smem, tiles.single(k_bar), geo)
  tiles.copy_halo_in(v_ref, b, *k_origin, h, v_smem, tiles.single(v_bar), geo)
  plgpu.barrier_wait(tiles.single(tile_bar))

  o = plgpu.load(o_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
  do = plgpu.load(do_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
  delta = (o * do).sum(axis=1)
  lse2 = tiles.load_row_vector(lse_smem)
  delta_smem[...] = delta
  plgpu.barrier_wait(tiles.single(k_bar))
  plgpu.barrier_wait(tiles.single(v_bar))

  shape = (_TOKENS, block)
  dq = tiles.zeros((_TOKENS, q_ref.shape[-1]))
  for i in range(geo.halo_tokens // block):
    keys = pl.ds(i * block, block)
    s = tiles.scores(q_smem, k_smem.at[keys], shape) * (scale * tiles.LOG2E)
    mask = tiles.window_mask(shape, geo, 0, (r0, c0), tiles.TILE, 0, k_origin, geo.halo_cols,
                             i * block)
    p = jnp.where(mask, jnp.exp2(s - tiles.row_broadcast(lse2, shape)), 0.0)
    dp = tiles.scores(do_smem, v_smem.at[keys], shape)
    ds = p * (dp - tiles.row_broadcast(delta, shape))
    dq = tiles.accumulate(dq, ds.astype(q_ref.dtype), k_smem.at[keys])

  q_smem[...] = (dq * scale).astype(q_ref.dtype)
  plgpu.commit_smem()
  tiles.copy_tile_out(q_smem, dq_ref, b, r0, c0, h)
  tiles.copy_stats_tile_out(delta_smem, delta_ref, b, h, r0, c0)
  plgpu.commit_smem_to_gmem_group()
  plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem,
                q_smem, do_smem, lse_smem, delta_smem, tile_bar, q_bar, do_bar, *, geo, block,
                scale):
  tile, h, b = tiles.grid_axes()
  r0, c0 = geo.tile_origin(tile)
  q_origin = geo.query_halo_origin(r0, c0)
  rows, cols = geo.halo_rows, geo.halo_cols
  tiles.copy_tile_in(k_ref, b, r0, c0, h, k_smem, tiles.single(tile_bar))
  tiles.copy_tile_in(v_ref, b, r0, c0, h, v_smem, tiles.single(tile_bar))
  tiles.copy_halo_in(q_ref, b, *q_origin, h, q_smem, tiles.single(q_bar), geo)
  tiles.copy_stats_in(lse_ref, b, h, *q_origin, lse_smem, tiles.single(q_bar), rows, cols)
  tiles.copy_halo_in(do_ref, b, *q_origin, h, do_smem, tiles.single(do_bar), geo)
  tiles.copy_stats_in(delta_ref, b, h, *q_origin, delta_smem, tiles.single(do_bar), rows, cols)
  plgpu.barrier_wait(tiles.single(tile_bar))
  plgpu.barrier_wait(tiles.single(q_bar))

  shape = (_TOKENS, block)
  dk = tiles.zeros((_TOKENS, q_ref.shape[-1]))
  dv = tiles.zeros((_TOKENS, q_ref.shape[-1]))
  for i in range(geo.halo_tokens // block):
    queries = pl.ds(i * block, block)
    st = tiles.scores(k_smem, q_smem.at[queries], shape) * (scale * tiles.LOG2E)
    lse2 = tiles.load_col_vector(lse_smem.at[queries])
    mask = tiles.window_mask(shape, geo, 1, q_origin, cols, i * block, (r0, c0), tiles.TILE, 0)
    pt = jnp.where(mask, jnp.exp2(st - tiles.col_broadcast(lse2, shape)), 0.0)
    if i == 0:
      plgpu.barrier_wait(tiles.single(do_bar))
    dv = tiles.accumulate(dv, pt.astype(q_ref.dtype), do_smem.at[queries])
    dpt = tiles.scores(v_smem, do_smem.at[queries], shape)
    delta = tiles.load_col_vector(delta_smem.at[queries])
    dst = pt * (dpt - tiles.col_broadcast(delta, shape))
    dk = tiles.accumulate(dk, dst.astype(q_ref.dtype), q_smem.at[queries])

  k_smem[...] = (dk * scale).astype(k_ref.dtype)
  v_smem[...] = dv.astype(v_ref.dtype)
  plgpu.commit_smem()
  tiles.copy_tile_out(k_smem, dk_ref, b, r0, c0, h)
  tiles.copy_tile_out(v_smem, dv_ref, b, r0, c0, h)
  plgpu.commit_smem_to_gmem_group()
  plgpu.wait_smem_to_gmem(0)


def backward(q, k, v, out, lse, dout, geo: tiles.Geometry, block: int, scale: float):
  """Returns (dq, dk, dv); lse is the forward's base-2 log-sum-exp, (B, heads, H, W) float32."""
  d, dtype = q.shape[-1], q.dtype
  stats = jax.ShapeDtypeStruct(lse.shape, jnp.float32)
  matrix = functools.partial(tiles.smem_matrix, head_dim=d, dtype=dtype)
  halo = functools.partial(matrix, geo.halo_tokens)
  dq_scratch = (matrix(_TOKENS), matrix(_TOKENS), matrix(_TOKENS), halo(), halo(),
                plgpu.SMEM((_TOKENS,), jnp.float32), plgpu.SMEM((_TOKENS,), jnp.float32),
                plgpu.Barrier(num_arrivals=3 * tiles.TILE + 1),
                plgpu.Barrier(num_arrivals=geo.halo_rows),
                plgpu.Barrier(num_arrivals=geo.halo_rows))
  dq_kernel = functools.partial(_dq_kernel, geo=geo, block=block, scale=scale)
  dq, delta = tiles.call(dq_kernel, q, (jax.ShapeDtypeStruct(q.shape, dtype), stats), dq_scratch,
                         geo, "na2d_dq_mgpu")(q, k, v, out, dout, lse)

  dkv_scratch = (matrix(_TOKENS), matrix(_TOKENS), halo(), halo(),
                 plgpu.SMEM((geo.halo_tokens,), jnp.float32),
                 plgpu.SMEM((geo.halo_tokens,), jnp.float32),
                 plgpu.Barrier(num_arrivals=2 * tiles.TILE),
                 plgpu.Barrier(num_arrivals=geo.halo_rows + 1),
                 plgpu.Barrier(num_arrivals=geo.halo_rows + 1))
  dkv_kernel = functools.partial(_dkv_kernel, geo=geo, block=block, scale=scale)
  grads = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
  dk, dv = tiles.call(dkv_kernel, q, grads, dkv_scratch, geo, "na2d_dkv_mgpu")(
      q, k, v, dout, lse, delta)
  return dq, dk, dv
