"""Neighborhood attention on Hopper GPUs: Pallas Mosaic GPU forward and backward kernels.

Design (figures and versions in benchmarks/NOTES.md):
* One program (one warpgroup) per (64-token query tile, head, batch): 4 x 16 or 8 x 8 tokens,
  whichever gives the smaller halos (mosaic_gpu_halos.py; 4 x 16 at HDiT's levels). Tiles vary
  fastest, so the programs running together share halos in L2.
* TMA brings the tile and its key halo (10 x 32 keys for 4 x 16 tiles at k = 7, 6.5x the 49
  useful: columns start on multiples of 8) from the native (B, H, W, heads, dim) layout into
  swizzled SMEM; no index gathers. Steps of whole halo rows each land on their own barrier, so
  a step starts when its rows have landed (one barrier for the halo where steps cut rows).
* The halo is walked in steps: wgmma q k^T, NATTEN's window as a mask on the scores, online
  softmax in base 2, wgmma p v with p from registers. A kernel whose resident halo would leave
  room for one program per SM streams it through two step-sized buffers instead (the dk/dv
  kernel at HDiT's shapes, 128-token steps; Config).
* The log-sum-exp of the base-2 logits is saved (B, heads, H, W), float32, for the backward
  (mosaic_gpu_backward.py).

Supported: bfloat16 / float16, head_dim 64 (HDiT's), maps whose sides are multiples of 8 and at
least 16, windows whose halos fit in SMEM (k up to 13 and beyond on large maps); `unsupported`
says why for other cases, which go to another kernel.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from hdit_kernels.neighborhood_attention import autodiff
from hdit_kernels.neighborhood_attention import mosaic_gpu_backward as backward_kernels
from hdit_kernels.neighborhood_attention import mosaic_gpu_halos as halos
from hdit_kernels.neighborhood_attention import mosaic_gpu_tiles as tiles


# H100 / H200: 227 KiB of shared memory per block, 228 KiB per SM with 1 KiB reserved per block.
SMEM_BYTES = 227 * 1024
TWO_PER_SM_BYTES = 113 * 1024
KERNELS = ("forward", "dq", "dk/dv")
# Per kernel: the (64, d) tiles it holds besides its two halo buffers (k, v or q, dO).
_TILES = {"forward": 1, "dq": 3, "dk/dv": 2}


def kernel_smem_bytes(kernel: str, stream: halos.Stream, head_dim: int, itemsize: int) -> int:
  """Shared memory of a kernel's scratch: its tiles, its two halo buffers (each
  stream.buffer_tokens) and float32 statistics, each buffer aligned to 1 KiB as Pallas
  allocates them."""
  aligned = lambda size: -(-size // 1024) * 1024
  matrix = lambda tokens: aligned(tokens * head_dim * itemsize)
  stats = {"forward": aligned(4 * halos.TILE_TOKENS),
           "dq": 2 * aligned(4 * halos.TILE_TOKENS),
           "dk/dv": 2 * aligned(4 * stream.buffer_tokens)}[kernel]
  return _TILES[kernel] * matrix(halos.TILE_TOKENS) + 2 * matrix(stream.buffer_tokens) + stats


@dataclasses.dataclass(frozen=True)
class Config:
  """Attributes:
    block_keys: halo tokens (keys; queries in the dk/dv kernel) per step, the last step taking
      the rest: a multiple of 64 (wgmma's contraction) of at most 256 (wgmma's width).
    slots: 0 keeps a halo resident in SMEM; n > 0 streams it through n step-sized buffers
      (halos.Stream; steps must be whole halo rows).
      With neither given, each kernel keeps its halo resident in steps of at most 192 tokens,
      unless that leaves room for only one program per SM: then it streams it through two
      buffers of steps of whole halo rows (128 tokens on 32-column halos), where that takes
      less SMEM (the dk/dv kernel at HDiT's shapes: 0.63 -> 0.45 ms at ImageNet level 0 on an
      H200).
    tile_rows: 8 (8 x 8 tiles) or 4 (4 x 16); 0 takes the shape with the smaller halos.
    interpret: Mosaic GPU kernels have no CPU interpret mode here; a config asking for it is
      unsupported, so tests lower these kernels (jax.export) instead of running them.
  """
  block_keys: int = 0
  slots: int | None = None
  tile_rows: int = 0
  interpret: bool = False

  def stream(self, halo: halos.Halo, kernel: str, head_dim: int = 64,
             itemsize: int = 2) -> halos.Stream:
    """How `kernel` walks `halo`."""
    if self.block_keys or self.slots is not None:
      block = self.block_keys or _balanced_block(halo.tokens)
      return halos.Stream(halo, halos.blocks(halo.tokens, block), self.slots or 0)
    resident = halos.Stream(halo, halos.blocks(halo.tokens, _balanced_block(halo.tokens)))
    used = kernel_smem_bytes(kernel, resident, head_dim, itemsize)
    step = _row_step(halo)
    if used <= TWO_PER_SM_BYTES or step is None:
      return resident
    streamed = halos.Stream(halo, halos.blocks(halo.tokens, step), slots=2)
    smaller = kernel_smem_bytes(kernel, streamed, head_dim, itemsize) < used
    return streamed if smaller else resident

  def streams(self, geo: halos.Geometry, head_dim: int = 64,
              itemsize: int = 2) -> dict[str, halos.Stream]:
    """Each kernel's walk through its halo (key halos for forward and dq, query halos for
    dk/dv)."""
    return {kernel: self.stream(geo.query_halo if kernel == "dk/dv" else geo.key_halo, kernel,
                                head_dim, itemsize) for kernel in KERNELS}


def _row_step(halo: halos.Halo) -> int | None:
  """The smallest step of at least 128 tokens that is whole halo rows and a multiple of 64 (at
  most 256), or None."""
  unit = math.lcm(64, halo.cols)
  step = -(-128 // unit) * unit
  return step if step <= 256 else None


def _balanced_block(tokens: int) -> int:
  """Steps of at most 192 tokens, as few and as even as multiples of 64 allow."""
  steps = -(-tokens // 192)
  return -(-tokens // steps // 64) * 64


def smem_bytes(geo: halos.Geometry, config: Config, head_dim: int,
               itemsize: int) -> dict[str, int]:
  """Shared memory of each kernel."""
  streams = config.streams(geo, head_dim, itemsize)
  return {kernel: kernel_smem_bytes(kernel, streams[kernel], head_dim, itemsize)
          for kernel in KERNELS}


def geometry(shape, kernel_size: int, config: Config | None = None) -> halos.Geometry:
  """The tiling of a (B, H, W, heads, dim) call; ValueError says why there is none."""
  return halos.Geometry.choose(shape[1], shape[2], kernel_size, (config or Config()).tile_rows)


def unsupported(shape, dtype, kernel_size: int, config: Config | None) -> str | None:
  """Why this kernel cannot run the case, or None."""
  config = config or Config()
  if config.interpret:
    return "Mosaic GPU kernels do not run in interpret mode"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"dtype {jnp.dtype(dtype)} (wgmma takes bfloat16 or float16)"
  if shape[-1] != 64:
    return f"head_dim {shape[-1]} (64 only)"
  try:
    geo = geometry(shape, kernel_size, config)
  except ValueError as e:
    return str(e)
  if (reason := geo.covers()) is not None:
    return reason
  block = config.block_keys
  if block and (block % 64 or block > 256):
    return f"block_keys {block} (a multiple of 64, at most 256)"
  if config.slots is not None and config.slots < 0:
    return f"slots {config.slots} (0, or the number of step buffers)"
  try:
    config.streams(geo, shape[-1], jnp.dtype(dtype).itemsize)
  except ValueError as e:   # slots over steps that cut halo rows
    return str(e)
  for kernel, used in smem_bytes(geo, config, shape[-1], jnp.dtype(dtype).itemsize).items():
    if used > SMEM_BYTES:
      kind, halo = ("query", geo.query_halo) if kernel == "dk/dv" else ("key", geo.key_halo)
      return (f"kernel_size {kernel_size}: the {kernel} kernel with its {halo.rows} x "
              f"{halo.cols} {kind} halo needs {used / 1024:.0f} KiB of shared memory "
              f"(at most {SMEM_BYTES // 1024})")
  return None


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, q_bar,
                k_bars, v_bars, *, geo, stream, scale):
  tile, h, b = tiles.grid_axes()
  r0, c0 = geo.tile_origin(tile)
  k_origin = geo.key_halo_origin(r0, c0)

  load = tiles.halo_loader((k_ref, v_ref), b, k_origin, h, (k_smem, v_smem), (k_bars, v_bars),
                           stream)

  tiles.copy_tile_in(q_ref, b, r0, c0, h, q_smem, tiles.single(q_bar), geo)
  for group in range(stream.preloaded()):
    load(group)
  plgpu.barrier_wait(tiles.single(q_bar))

  rows = halos.TILE_TOKENS
  acc = tiles.zeros((rows, q_ref.shape[-1]))
  m = tiles.full_vector(rows, -jnp.inf)
  l = tiles.full_vector(rows, 0.0)
  for i, (start, size) in enumerate(stream.steps):
    shape, group = (rows, size), stream.group_of(i)
    if stream.starts_group(i):
      plgpu.barrier_wait(tiles.single(k_bars[group]))
    s = tiles.scores(q_smem, stream.view(k_smem, i), shape) * (scale * tiles.LOG2E)
    mask = tiles.window_mask(shape, geo, 0, (r0, c0), geo.tile_cols, 0, k_origin,
                             stream.halo.cols, start)
    s = jnp.where(mask, s, tiles.MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - tiles.row_broadcast(m_new, shape))
    l = l * alpha + p.sum(axis=1)
    m = m_new
    if stream.starts_group(i):
      plgpu.barrier_wait(tiles.single(v_bars[group]))
    acc = acc * tiles.row_broadcast(alpha, acc.shape)
    acc = tiles.accumulate(acc, p.astype(q_ref.dtype), stream.view(v_smem, i))
    tiles.refill(stream, i, load)

  q_smem[...] = (acc * tiles.row_broadcast(1.0 / l, acc.shape)).astype(q_ref.dtype)
  lse_smem[...] = m + jnp.log2(l)
  plgpu.commit_smem()
  tiles.copy_tile_out(q_smem, o_ref, b, r0, c0, h, geo)
  tiles.copy_stats_tile_out(lse_smem, lse_ref, b, h, r0, c0, geo)
  plgpu.commit_smem_to_gmem_group()
  plgpu.wait_smem_to_gmem(0)


def _geometry(q, kernel_size, config) -> halos.Geometry:
  try:
    geo = geometry(q.shape, kernel_size, config)
  except ValueError as e:   # also for callers that bypass api.na2d
    raise NotImplementedError(f"mosaic_gpu does not support this case: {e}") from None
  if (reason := geo.covers()) is not None:
    raise NotImplementedError(f"mosaic_gpu does not support this case: {reason}")
  return geo


def forward(q, k, v, kernel_size, scale, config):
  """Returns out (B, H, W, n, d) in q's dtype and the base-2 lse (B, n, H, W) float32."""
  b, height, width, n, d = q.shape
  geo = _geometry(q, kernel_size, config)
  stream = config.streams(geo, d, q.dtype.itemsize)["forward"]
  kernel = functools.partial(_fwd_kernel, geo=geo, stream=stream, scale=scale)
  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((b, n, height, width), jnp.float32))
  tokens = halos.TILE_TOKENS
  scratch = (tiles.smem_matrix(tokens, d, q.dtype),
             tiles.smem_matrix(stream.buffer_tokens, d, q.dtype),
             tiles.smem_matrix(stream.buffer_tokens, d, q.dtype),
             plgpu.SMEM((tokens,), jnp.float32),
             plgpu.Barrier(num_arrivals=geo.tile_rows),
             stream.barriers(), stream.barriers())
  return tiles.call(kernel, q, out_type, scratch, geo, "na2d_fwd_mgpu")(q, k, v)


def backward(q, k, v, out, lse, dout, kernel_size, scale, config):
  """Returns (dq, dk, dv) in the inputs' dtypes."""
  geo = _geometry(q, kernel_size, config)
  streams = config.streams(geo, q.shape[-1], q.dtype.itemsize)
  return backward_kernels.backward(q, k, v, out, lse, dout, geo, streams["dq"],
                                   streams["dk/dv"], scale)


na2d = autodiff.with_lse_vjp(forward, backward)
