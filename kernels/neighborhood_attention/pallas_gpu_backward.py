"""Backward kernels of the Triton neighborhood attention: dq, dk/dv, and both fused.

FlashAttention-2's backward, with NATTEN's window as the mask:
  P = exp(S - lse), dP = dO V^T, dS = P * (dP - D), dQ = scale dS K, dK = scale dS^T Q,
  dV = P^T dO, with D = rowsum(dO * O).
* dq phase (per query tile): walks the tile's key halo, as the forward does.
* dk/dv phase (per key tile): walks the halo of queries attending the tile (inverse
  neighborhood); no atomics.
* D is computed where it is needed from O and dO (the dk/dv phase needs it for halo queries
  too), so no separate pass over O and dO.
The fused kernel runs both phases in one program (dq of query tile t, then dk/dv of key tile t):
q, k, v, o, dO are then read from HBM once, the halo re-reads hitting L2.
"""

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hdit_kernels.neighborhood_attention import pallas_gpu_tiles as tiles


def _dq_phase(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, b, h, cfg, geo, scale,
              precision):
  height, width, ks = geo
  r0, c0 = tiles.tile_origin(width, cfg.block_h, cfg.block_w)
  rows, cols, qr, qc = tiles.tile_tokens(r0, c0, cfg.block_h, cfg.block_w, height, width)
  q = tiles.load(q_ref, b, qr, qc, h)
  do = tiles.load(do_ref, b, qr, qc, h)
  o = tiles.load(o_ref, b, qr, qc, h)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=1)
  lse2 = plgpu.load(lse_ref.at[b, qr, qc, h]) * tiles.LOG2E

  def body(k_rows, k_cols, k_rows_c, k_cols_c, dq):
    keys = tiles.load(k_ref, b, k_rows_c, k_cols_c, h)
    values = tiles.load(v_ref, b, k_rows_c, k_cols_c, h)
    mask = tiles.in_window(rows, cols, k_rows, k_cols, height, width, ks)
    s = tiles.dot(q, keys, precision, trans_b=True) * (scale * tiles.LOG2E)
    p = jnp.where(mask, jnp.exp2(s - lse2[:, None]), 0.0)
    dp = tiles.dot(do, values, precision, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + tiles.dot(ds.astype(keys.dtype), keys, precision)

  dq = tiles.key_halo_loop(r0, c0, geo, cfg, body, jnp.zeros(q.shape, jnp.float32))
  plgpu.store(tiles.at(dq_ref, b, rows, cols, h), (dq * scale).astype(dq_ref.dtype))


def _dkv_phase(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dk_ref, dv_ref, b, h, cfg, geo,
               scale, precision):
  height, width, ks = geo
  r0, c0 = tiles.tile_origin(width, cfg.block_h, cfg.block_w)
  kr, kc, kr_c, kc_c = tiles.tile_tokens(r0, c0, cfg.block_h, cfg.block_w, height, width)
  keys = tiles.load(k_ref, b, kr_c, kc_c, h)
  values = tiles.load(v_ref, b, kr_c, kc_c, h)

  def body(q_rows, q_cols, q_rows_c, q_cols_c, carry):
    dk, dv = carry
    q = tiles.load(q_ref, b, q_rows_c, q_cols_c, h)
    do = tiles.load(do_ref, b, q_rows_c, q_cols_c, h)
    o = tiles.load(o_ref, b, q_rows_c, q_cols_c, h)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=1)
    lse2 = plgpu.load(lse_ref.at[b, q_rows_c, q_cols_c, h]) * tiles.LOG2E
    # (keys, queries); clamped query indices would repeat a query: keep in-map ones only.
    mask = tiles.in_window(q_rows, q_cols, kr, kc, height, width, ks, keys_first=True) & (
        (q_rows < height) & (q_cols < width))[None, :]
    st = tiles.dot(keys, q, precision, trans_b=True) * (scale * tiles.LOG2E)
    pt = jnp.where(mask, jnp.exp2(st - lse2[None, :]), 0.0)
    dv = dv + tiles.dot(pt.astype(do.dtype), do, precision)
    dpt = tiles.dot(values, do, precision, trans_b=True)
    dst = pt * (dpt - delta[None, :])
    return dk + tiles.dot(dst.astype(q.dtype), q, precision), dv

  zeros = jnp.zeros(keys.shape, jnp.float32)
  dk, dv = tiles.query_halo_loop(r0, c0, geo, cfg, body, (zeros, zeros))
  plgpu.store(tiles.at(dk_ref, b, kr, kc, h), (dk * scale).astype(dk_ref.dtype))
  plgpu.store(tiles.at(dv_ref, b, kr, kc, h), dv.astype(dv_ref.dtype))


def dq_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, *, cfg, geo, scale,
              precision):
  h, b = pl.program_id(1), pl.program_id(2)
  _dq_phase(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, b, h, cfg, geo, scale,
            precision)


def dkv_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dk_ref, dv_ref, *, cfg, geo, scale,
               precision):
  h, b = pl.program_id(1), pl.program_id(2)
  _dkv_phase(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dk_ref, dv_ref, b, h, cfg, geo, scale,
             precision)


def fused_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, dk_ref, dv_ref, *, cfg,
                 geo, scale, precision):
  h, b = pl.program_id(1), pl.program_id(2)
  _dq_phase(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, b, h, cfg, geo, scale,
            precision)
  _dkv_phase(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dk_ref, dv_ref, b, h, cfg, geo, scale,
             precision)
