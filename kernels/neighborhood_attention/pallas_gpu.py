"""Neighborhood attention on GPU: Pallas (Triton lowering) forward and backward kernels.

Design (figures and versions in benchmarks/NOTES.md):
* One program per (2-D tile of block_h x block_w queries, head, batch); tiles vary fastest, so
  programs running together share their key halos in L2.
* The program walks its key halo (rows [start(r0), start(r1) + k), columns likewise; NATTEN
  windows stay inside the map, so the halo is never padded) in blocks of kv_rows x kv_cols keys
  gathered by index from the native (B, H, W, heads, dim) layout: no transposes in HBM. For k = 7
  and 8 x 8 query tiles, 16 x 16 keys (4 blocks of 4 x 16) cover the 14 x 14 halo: 5.2x the 49
  useful scores per query, against 13-37x for 1-D block-sparse tiles (na_kernel_notes.md).
* Online softmax in base 2 (exp2), float32 accumulation; the lse is saved for the backward
  (pallas_gpu_backward.py).
* Outputs are allocated over whole tiles so that stores need no mask (cropped afterwards, a no-op
  when the tiles divide the map).

Layout: q, k, v (B, H, W, heads, head_dim); lse (B, H, W, heads) float32; dilation 1.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hdit_kernels.neighborhood_attention import autodiff
from hdit_kernels.neighborhood_attention import pallas_common as common
from hdit_kernels.neighborhood_attention import pallas_gpu_backward as backward_kernels
from hdit_kernels.neighborhood_attention import pallas_gpu_tiles as tiles


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile shapes (powers of two) and Triton launch parameters.

  Attributes:
    block_h, block_w: query tile (forward, dq) and key tile (dk/dv).
    kv_rows, kv_cols: key block per step of the forward and dq loops.
    q_rows, q_cols: query block per step of the dk/dv loop.
    num_warps, num_stages: Triton launch parameters of the forward.
    num_warps_bwd, num_stages_bwd: the same for the backward.
    fused_backward: one kernel for dq, dk, dv (else a dq kernel and a dk/dv kernel).
    interpret: run in interpret mode (CPU tests).
  """
  block_h: int = 8
  block_w: int = 8
  kv_rows: int = 4
  kv_cols: int = 16
  q_rows: int = 2
  q_cols: int = 16
  num_warps: int = 4
  num_stages: int = 3
  num_warps_bwd: int = 4
  num_stages_bwd: int = 3
  fused_backward: bool = True
  interpret: bool = False

  def block_sizes(self) -> tuple[int, ...]:
    return (self.block_h, self.block_w, self.kv_rows, self.kv_cols, self.q_rows, self.q_cols)


def unsupported(shape, dtype, kernel_size: int, config: Config | None) -> str | None:
  """Why this kernel cannot run the case, or None."""
  del kernel_size  # Any window: the halo loops run as long as needed.
  config = config or Config()
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"dtype {jnp.dtype(dtype)}"
  if not all(s > 0 and s & (s - 1) == 0 for s in config.block_sizes()):
    return f"Triton needs power-of-two block sizes, got {config.block_sizes()}"
  if (config.block_h * config.block_w < 16 or config.kv_rows * config.kv_cols < 16
      or config.q_rows * config.q_cols < 16):
    return "tl.dot needs blocks of at least 16 tokens"
  if shape[-1] > 256:
    return f"head_dim {shape[-1]} > 256"
  return None


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg, geo, scale, precision):
  height, width, ks = geo
  h, b = pl.program_id(1), pl.program_id(2)
  r0, c0 = tiles.tile_origin(width, cfg.block_h, cfg.block_w)
  rows, cols, qr, qc = tiles.tile_tokens(r0, c0, cfg.block_h, cfg.block_w, height, width)
  q = tiles.load(q_ref, b, qr, qc, h)

  def body(k_rows, k_cols, k_rows_c, k_cols_c, carry):
    acc, m, l = carry
    keys = tiles.load(k_ref, b, k_rows_c, k_cols_c, h)
    values = tiles.load(v_ref, b, k_rows_c, k_cols_c, h)
    # Keys past the map fall in no window (windows lie inside it), so clamped copies drop out.
    mask = tiles.in_window(rows, cols, k_rows, k_cols, height, width, ks)
    s = jnp.where(mask, tiles.dot(q, keys, precision, trans_b=True) * (scale * tiles.LOG2E),
                  common.MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + tiles.dot(p.astype(values.dtype), values, precision)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:1], -jnp.inf, jnp.float32),
          jnp.zeros(q.shape[:1], jnp.float32))
  acc, m, l = tiles.key_halo_loop(r0, c0, geo, cfg, body, init)
  plgpu.store(tiles.at(o_ref, b, rows, cols, h), (acc / l[:, None]).astype(o_ref.dtype))
  plgpu.store(lse_ref.at[b, rows, cols, h], (m + jnp.log2(l)) * tiles.LN2)


def _call(kernel, q, out_shape, config, kernel_size, scale, backward, name):
  b, height, width, n, _ = q.shape
  grid = (pl.cdiv(height, config.block_h) * pl.cdiv(width, config.block_w), n, b)
  precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  params = plgpu.CompilerParams(
      num_warps=config.num_warps_bwd if backward else config.num_warps,
      num_stages=config.num_stages_bwd if backward else config.num_stages)
  return pl.pallas_call(
      functools.partial(kernel, cfg=config, geo=(height, width, kernel_size), scale=scale,
                        precision=precision),
      grid=grid, out_shape=out_shape, interpret=config.interpret, name=name,
      compiler_params=params)


def _pad_dim(x: jax.Array) -> jax.Array:
  extra = tiles.padded_dim(x.shape[-1]) - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, [(0, 0)] * 4 + [(0, extra)])


def _out_shape(x: jax.Array, config: Config, stats: bool = False) -> jax.ShapeDtypeStruct:
  """Outputs cover whole tiles (each store then has distinct in-bounds indices)."""
  b, height, width, n, d = x.shape
  shape = (b, common.round_up(height, config.block_h), common.round_up(width, config.block_w), n)
  return jax.ShapeDtypeStruct(shape if stats else shape + (tiles.padded_dim(d),),
                              jnp.float32 if stats else x.dtype)


def _crop(x: jax.Array, like: jax.Array) -> jax.Array:
  _, height, width, _, d = like.shape
  return x[:, :height, :width, :, :d] if x.ndim == 5 else x[:, :height, :width]


def forward(q, k, v, kernel_size, scale, config):
  """Returns out (B, H, W, n, d) in q's dtype and lse (B, H, W, n) float32."""
  out, lse = _call(_fwd_kernel, q, [_out_shape(q, config), _out_shape(q, config, stats=True)],
                   config, kernel_size, scale, False, "na2d_fwd_gpu",
                   )(_pad_dim(q), _pad_dim(k), _pad_dim(v))
  return _crop(out, q), _crop(lse, q)


def backward(q, k, v, out, lse, dout, kernel_size, scale, config):
  """Returns (dq, dk, dv) in the inputs' dtypes."""
  args = tuple(_pad_dim(t) for t in (q, k, v, out, dout)) + (lse,)
  call = functools.partial(_call, q=q, config=config, kernel_size=kernel_size, scale=scale,
                           backward=True)
  if config.fused_backward:
    dq, dk, dv = call(backward_kernels.fused_kernel, out_shape=[
        _out_shape(q, config), _out_shape(k, config), _out_shape(v, config)],
                      name="na2d_bwd_gpu")(*args)
  else:
    dq = call(backward_kernels.dq_kernel, out_shape=_out_shape(q, config),
              name="na2d_dq_gpu")(*args)
    dk, dv = call(backward_kernels.dkv_kernel, out_shape=[
        _out_shape(k, config), _out_shape(v, config)], name="na2d_dkv_gpu")(*args)
  return _crop(dq, q), _crop(dk, k), _crop(dv, v)


na2d = autodiff.with_lse_vjp(forward, backward)
