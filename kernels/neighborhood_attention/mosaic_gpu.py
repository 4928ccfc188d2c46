"""Neighborhood attention on Hopper GPUs: Pallas Mosaic GPU forward and backward kernels.

Design (figures and versions in benchmarks/NOTES.md):
* One program (one warpgroup) per (8 x 8 query tile, head, batch); tiles vary fastest, so the
  programs running together share their halos in L2.
* TMA brings the tile and its key halo (16 x 24 keys, 7.8x the 49 useful for k = 7; see
  mosaic_gpu_tiles.py) from the native (B, H, W, heads, dim) layout into swizzled SMEM, with
  separate barriers for q, k and v so that q k^T starts before v has landed; no index gathers.
* The halo is walked in blocks of `block_keys` keys: wgmma q k^T, NATTEN's window as a mask on
  the scores, online softmax in base 2, wgmma p v with p from registers.
* The log-sum-exp of the base-2 logits is saved (B, heads, H, W), float32, for the backward
  (mosaic_gpu_backward.py).

Supported: bfloat16 / float16, head_dim 64 (HDiT's), maps whose sides are multiples of 8 and at
least 16, windows whose halos fit 16 rows (k <= 7 everywhere; k = 9 only on maps 16 high, where
the query halo of an inner tile would need 20 rows); `unsupported` says why for other cases,
which go to another kernel.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hdit_kernels.neighborhood_attention import autodiff
from hdit_kernels.neighborhood_attention import mosaic_gpu_backward as backward_kernels
from hdit_kernels.neighborhood_attention import mosaic_gpu_tiles as tiles


@dataclasses.dataclass(frozen=True)
class Config:
  """Attributes:
    block_keys: keys (or, in the dk/dv kernel, queries) per step through a halo of 384 (256 on
      maps 16 wide): a multiple of 64 (wgmma's contraction) of at most 256 (wgmma's width) that
      divides the halo; 0 picks 192 (384-token halos) or 128.
    interpret: Mosaic GPU kernels have no CPU interpret mode here; a config asking for it is
      unsupported, so tests lower these kernels (jax.export) instead of running them.
  """
  block_keys: int = 0
  interpret: bool = False

  def block(self, geo: tiles.Geometry) -> int:
    if self.block_keys:
      return self.block_keys
    return 192 if geo.halo_tokens % 192 == 0 else 128


def unsupported(shape, dtype, kernel_size: int, config: Config | None) -> str | None:
  """Why this kernel cannot run the case, or None."""
  config = config or Config()
  if config.interpret:
    return "Mosaic GPU kernels do not run in interpret mode"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"dtype {jnp.dtype(dtype)} (wgmma takes bfloat16 or float16)"
  if shape[-1] != 64:
    return f"head_dim {shape[-1]} (64 only)"
  if kernel_size + tiles.TILE - 1 > tiles.HALO_ROWS:
    return f"kernel_size {kernel_size} > {tiles.HALO_ROWS - tiles.TILE + 1}"
  geo = tiles.Geometry(shape[1], shape[2], kernel_size)
  reason = geo.covers()
  block = config.block(geo)
  if reason is None and (block % 64 or block > 256 or geo.halo_tokens % block):
    reason = (f"block_keys {block} (a multiple of 64, at most 256, dividing the halo's "
              f"{geo.halo_tokens} tokens)")
  return reason


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, q_bar,
                k_bar, v_bar, *, geo, block, scale):
  tile, h, b = tiles.grid_axes()
  r0, c0 = geo.tile_origin(tile)
  k_origin = geo.key_halo_origin(r0, c0)
  tiles.copy_tile_in(q_ref, b, r0, c0, h, q_smem, tiles.single(q_bar))
  tiles.copy_halo_in(k_ref, b, *k_origin, h, k_smem, tiles.single(k_bar), geo)
  tiles.copy_halo_in(v_ref, b, *k_origin, h, v_smem, tiles.single(v_bar), geo)
  plgpu.barrier_wait(tiles.single(q_bar))
  plgpu.barrier_wait(tiles.single(k_bar))

  shape = (tiles.TILE ** 2, block)
  acc = tiles.zeros((tiles.TILE ** 2, q_ref.shape[-1]))
  m = tiles.full_vector(tiles.TILE ** 2, -jnp.inf)
  l = tiles.full_vector(tiles.TILE ** 2, 0.0)
  for i in range(geo.halo_tokens // block):
    keys = pl.ds(i * block, block)
    s = tiles.scores(q_smem, k_smem.at[keys], shape) * (scale * tiles.LOG2E)
    mask = tiles.window_mask(shape, geo, 0, (r0, c0), tiles.TILE, 0, k_origin, geo.halo_cols,
                             i * block)
    s = jnp.where(mask, s, tiles.MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - tiles.row_broadcast(m_new, shape))
    l = l * alpha + p.sum(axis=1)
    m = m_new
    if i == 0:
      plgpu.barrier_wait(tiles.single(v_bar))
    acc = acc * tiles.row_broadcast(alpha, acc.shape)
    acc = tiles.accumulate(acc, p.astype(q_ref.dtype), v_smem.at[keys])

  q_smem[...] = (acc * tiles.row_broadcast(1.0 / l, acc.shape)).astype(q_ref.dtype)
  lse_smem[...] = m + jnp.log2(l)
  plgpu.commit_smem()
  tiles.copy_tile_out(q_smem, o_ref, b, r0, c0, h)
  tiles.copy_stats_tile_out(lse_smem, lse_ref, b, h, r0, c0)
  plgpu.commit_smem_to_gmem_group()
  plgpu.wait_smem_to_gmem(0)


def _geometry(q, kernel_size) -> tiles.Geometry:
  geo = tiles.Geometry(q.shape[1], q.shape[2], kernel_size)
  if (reason := geo.covers()) is not None:   # also for callers that bypass api.na2d
    raise NotImplementedError(f"mosaic_gpu does not support this case: {reason}")
  return geo


def forward(q, k, v, kernel_size, scale, config):
  """Returns out (B, H, W, n, d) in q's dtype and the base-2 lse (B, n, H, W) float32."""
  b, height, width, n, d = q.shape
  geo = _geometry(q, kernel_size)
  kernel = functools.partial(_fwd_kernel, geo=geo, block=config.block(geo), scale=scale)
  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((b, n, height, width), jnp.float32))
  tile_tokens = tiles.TILE ** 2
  scratch = (tiles.smem_matrix(tile_tokens, d, q.dtype),
             tiles.smem_matrix(geo.halo_tokens, d, q.dtype),
             tiles.smem_matrix(geo.halo_tokens, d, q.dtype),
             plgpu.SMEM((tile_tokens,), jnp.float32),
             plgpu.Barrier(num_arrivals=tiles.TILE),
             plgpu.Barrier(num_arrivals=geo.halo_rows),
             plgpu.Barrier(num_arrivals=geo.halo_rows))
  return tiles.call(kernel, q, out_type, scratch, geo, "na2d_fwd_mgpu")(q, k, v)


def backward(q, k, v, out, lse, dout, kernel_size, scale, config):
  """Returns (dq, dk, dv) in the inputs' dtypes."""
  geo = _geometry(q, kernel_size)
  return backward_kernels.backward(q, k, v, out, lse, dout, geo, config.block(geo), scale)


na2d = autodiff.with_lse_vjp(forward, backward)
