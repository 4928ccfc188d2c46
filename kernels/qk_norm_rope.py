"""HDiT's query/key preparation in one pass: cosine-similarity normalisation and axial RoPE.

For q and k of every head (d channels), with R = d / 4 rotated pairs (channel c with c + R):

    u = gain[h] * x / sqrt(sum(x^2) + eps)
    out[c] = u[c] cos(theta[c]) - u[c + R] sin(theta[c]),
    out[c + R] = u[c + R] cos(theta[c]) + u[c] sin(theta[c]),   out[2R:] = u[2R:].

XLA computes this in four kernels that read q and k twice (the norm's reduction, then the
rotation's concatenate): 1.7-1.85x the memory-bound time of its bytes on an H200
(benchmarks/NOTES.md). The Mosaic GPU kernels here read the fused qkv projection's output once
and write q, k and v; the backward reads it and the three gradients once and writes the qkv
gradient. Every value is computed in float32 and rounded once.

`qk_norm_rope(..., implementation='xla')` is the same computation in jnp (and the reference
of the tests); 'mosaic_gpu' runs the kernels (Hopper), or on the CPU in Pallas's GPU interpreter
with `interpret=True`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

IMPLEMENTATIONS = ("xla", "mosaic_gpu")
BLOCK_TOKENS = 64   # one warpgroup's rows in the wgmma register layout
# jax 0.10's plgpu.load requires an index; jax 0.11 gives it a default and deprecates passing it.
_LOAD_NEEDS_INDEX = not plgpu.load.__defaults__


def qk_norm_rope(qkv: jax.Array, gain: jax.Array, cos: jax.Array, sin: jax.Array, *,
                 eps: float = 1e-6, implementation: str = "xla",
                 interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k (normalised, scaled by gain and rotated) and v of a fused qkv projection's output.

  Args:
    qkv: (batch, height, width, 3, heads, d), q then k then v.
    gain: (heads,) float32, the factor of the unit-norm q and k (HDiT: sqrt of its scale).
    cos, sin: (height, width, heads, d // 4) float32, of the rotation angles.
    eps: added to the sum of squares.
    implementation: 'xla' or 'mosaic_gpu' (bfloat16 / float16, d a multiple of 64,
      height * width a multiple of 64); `unsupported` says why a case cannot run.
    interpret: run the Mosaic GPU kernels in Pallas's GPU interpreter (for tests on the CPU).

  Returns:
    q, k, v: (batch, height, width, heads, d) in qkv's dtype. Differentiable in qkv and gain
    (and in cos and sin, through jnp).
  """
  _check(qkv, gain, cos, sin)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}")
  if implementation == "xla":
    return reference(qkv, gain, cos, sin, eps)
  if (reason := unsupported(qkv.shape, qkv.dtype)) is not None:
    raise NotImplementedError(f"mosaic_gpu does not support this case: {reason}")
  return _fused(qkv, gain, cos, sin, eps, interpret)


def default_implementation(device: jax.Device | None = None) -> str:
  """'mosaic_gpu' on Hopper GPUs (compute capability 9.x, where it was measured faster), else
  'xla'. `device` defaults to the first of the default backend."""
  device = device or jax.devices()[0]
  if device.platform != "gpu":
    return "xla"
  return "mosaic_gpu" if str(getattr(device, "compute_capability", "")).startswith("9.") else "xla"


def unsupported(shape: tuple[int, ...], dtype) -> str | None:
  """Why the Mosaic GPU kernels cannot run qkv of this shape and dtype, or None."""
  _, height, width, _, _, d = shape
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} (bfloat16 or float16 only)"
  if d % 64:
    return f"head dim {d} (a multiple of 64: each d / 4 channels at least 32 bytes, a swizzle)"
  if (height * width) % BLOCK_TOKENS:
    return f"{height} x {width} tokens (a multiple of {BLOCK_TOKENS} per image)"
  return None


def _check(qkv, gain, cos, sin):
  if qkv.ndim != 6 or qkv.shape[3] != 3:
    raise ValueError(f"qkv must be (batch, height, width, 3, heads, d), got {qkv.shape}")
  _, height, width, _, heads, d = qkv.shape
  if d % 4:
    raise ValueError(f"head dim {d} is not a multiple of 4")
  if gain.shape != (heads,):
    raise ValueError(f"gain must be ({heads},), got {gain.shape}")
  angles = (height, width, heads, d // 4)
  if cos.shape != angles or sin.shape != angles:
    raise ValueError(f"cos and sin must be {angles}, got {cos.shape} and {sin.shape}")


def _rotate(x1, x2, cos, sin):
  return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def reference(qkv, gain, cos, sin, eps: float = 1e-6):
  """The jnp computation (float32 inside, one rounding)."""
  r = qkv.shape[-1] // 4
  x = qkv.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.sum(jnp.square(x[:, :, :, :2]), axis=-1, keepdims=True) + eps)
  u = x[:, :, :, :2] * (gain.astype(jnp.float32)[:, None] * inv)
  o1, o2 = _rotate(u[..., :r], u[..., r:2 * r], cos[None, :, :, None], sin[None, :, :, None])
  out = jnp.concatenate([o1, o2, u[..., 2 * r:]], axis=-1).astype(qkv.dtype)
  return out[:, :, :, 0], out[:, :, :, 1], qkv[:, :, :, 2]


# The kernels. A program takes BLOCK_TOKENS tokens of one head (tokens of one image: the
# angles' rows repeat every height * width tokens). Channels come in three TMA boxes, [0, R),
# [R, 2R) and [2R, d), so that the rotation pairs meet in registers without slicing them.


def _parts(d: int):
  r = d // 4
  return ((0, r), (r, r), (2 * r, d - 2 * r))


def _smem(cols: int, dtype):
  """SMEM for a (BLOCK_TOKENS, cols) block in the wgmma register layout's swizzle."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(cols * itemsize * 8)
  return plgpu.SMEM((BLOCK_TOKENS, cols), dtype,
                    transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                plgpu.SwizzleTransform(swizzle)))


def _load(ref, interpret: bool, layout=None):
  """All of an SMEM ref in registers, in `layout` (default the wgmma layout, whose rows a
  warpgroup reduces and broadcasts); Pallas's GPU interpreter reads refs plainly."""
  if interpret:
    return ref[...]
  layout = plgpu.Layout.WGMMA if layout is None else layout
  return plgpu.load(ref, (), layout=layout) if _LOAD_NEEDS_INDEX else plgpu.load(ref, layout=layout)


def _single(barrier):
  """The one barrier of a Barrier ref: shape (1,) in jax 0.10, a scalar ref in 0.11."""
  return barrier.at[0] if barrier.shape else barrier


def _row(x, shape):
  return jax.lax.broadcast_in_dim(x, shape, [0])


def _sum_rows(parts):
  return functools.reduce(lambda a, b: a + b, [p.sum(axis=1) for p in parts])


def _program(angle_rows: int):
  """(token offset, angle-row offset, head) of this program."""
  block, h = jax.lax.axis_index("block"), jax.lax.axis_index("head")
  t0 = block * BLOCK_TOKENS
  return t0, jax.lax.rem(block, angle_rows // BLOCK_TOKENS) * BLOCK_TOKENS, h


def _copy_in(src, dst, barrier):
  plgpu.copy_gmem_to_smem(src, dst, barrier)


def _copy_angles_in(cos_ref, sin_ref, gain_ref, a0, h, cos_smem, sin_smem, gain_smem, barrier):
  """TMA copies of the block's cos and sin rows and the head's gain (three arrivals)."""
  _copy_in(cos_ref.at[pl.ds(a0, BLOCK_TOKENS), h], cos_smem, barrier)
  _copy_in(sin_ref.at[pl.ds(a0, BLOCK_TOKENS), h], sin_smem, barrier)
  _copy_in(gain_ref.at[h], gain_smem, barrier)
  return cos_smem, sin_smem, gain_smem


def _load_angles(cos_smem, sin_smem, gain_smem, interpret):
  """cos and sin (wgmma layout) and the gain (one value per row), in registers."""
  return (_load(cos_smem, interpret), _load(sin_smem, interpret),
          _load(gain_smem, interpret, plgpu.Layout.WGMMA.reduce(1)))


def _fwd_kernel(qkv_ref, cos_ref, sin_ref, gain_ref, q_ref, k_ref, v_ref, *scratch, d, eps,
                angle_rows, interpret):
  x_smem, v_smem, cos_smem, sin_smem, gain_smem, bar = scratch
  t0, a0, h = _program(angle_rows)
  rows, parts = pl.ds(t0, BLOCK_TOKENS), _parts(d)
  barrier = _single(bar)
  for j in range(2):
    for p, (c0, cols) in enumerate(parts):
      _copy_in(qkv_ref.at[rows, j, h, pl.ds(c0, cols)], x_smem[j][p], barrier)
  _copy_in(qkv_ref.at[rows, 2, h], v_smem, barrier)
  angles = _copy_angles_in(cos_ref, sin_ref, gain_ref, a0, h, cos_smem, sin_smem, gain_smem,
                           barrier)
  plgpu.barrier_wait(barrier)

  cos, sin, gain = _load_angles(*angles, interpret)
  for j in range(2):
    x = [_load(s, interpret).astype(jnp.float32) for s in x_smem[j]]
    f = gain * jax.lax.rsqrt(_sum_rows([xi * xi for xi in x]) + eps)
    u = [xi * _row(f, xi.shape) for xi in x]
    o1, o2 = _rotate(u[0], u[1], cos, sin)
    for s, o in zip(x_smem[j], (o1, o2, u[2])):
      s[...] = o.astype(q_ref.dtype)
  plgpu.commit_smem()
  for j, out_ref in enumerate((q_ref, k_ref)):
    for p, (c0, cols) in enumerate(parts):
      plgpu.copy_smem_to_gmem(x_smem[j][p], out_ref.at[rows, h, pl.ds(c0, cols)],
                              commit_group=False)
  plgpu.copy_smem_to_gmem(v_smem, v_ref.at[rows, h], commit_group=False)
  plgpu.commit_smem_to_gmem_group()
  plgpu.wait_smem_to_gmem(0)


def _bwd_kernel(qkv_ref, dq_ref, dk_ref, dv_ref, cos_ref, sin_ref, gain_ref, dqkv_ref,
                dgain_ref, *scratch, d, eps, angle_rows, interpret):
  x_smem, g_smem, v_smem, cos_smem, sin_smem, gain_smem, dgain_smem, bar = scratch
  t0, a0, h = _program(angle_rows)
  rows, parts = pl.ds(t0, BLOCK_TOKENS), _parts(d)
  barrier = _single(bar)
  for j, grad_ref in enumerate((dq_ref, dk_ref)):
    for p, (c0, cols) in enumerate(parts):
      _copy_in(qkv_ref.at[rows, j, h, pl.ds(c0, cols)], x_smem[j][p], barrier)
      _copy_in(grad_ref.at[rows, h, pl.ds(c0, cols)], g_smem[j][p], barrier)
  _copy_in(dv_ref.at[rows, h], v_smem, barrier)
  angles = _copy_angles_in(cos_ref, sin_ref, gain_ref, a0, h, cos_smem, sin_smem, gain_smem,
                           barrier)
  plgpu.barrier_wait(barrier)

  cos, sin, gain = _load_angles(*angles, interpret)
  for j in range(2):
    x = [_load(s, interpret).astype(jnp.float32) for s in x_smem[j]]
    g = [_load(s, interpret).astype(jnp.float32) for s in g_smem[j]]
    # The rotation's transpose is the rotation by -theta.
    gu = [g[0] * cos + g[1] * sin, g[1] * cos - g[0] * sin, g[2]]
    inv = jax.lax.rsqrt(_sum_rows([xi * xi for xi in x]) + eps)
    dot = _sum_rows([a * b for a, b in zip(gu, x)])
    # u = gain * inv * x: dx = gain * inv * (gu - inv^2 (gu . x) x); dgain = inv (gu . x).
    f, c = gain * inv, gain * inv * inv * inv * dot
    for s, gi, xi in zip(g_smem[j], gu, x):
      s[...] = (gi * _row(f, gi.shape) - xi * _row(c, xi.shape)).astype(dqkv_ref.dtype)
    dgain_smem[j][...] = inv * dot
  plgpu.commit_smem()
  for j in range(2):
    for p, (c0, cols) in enumerate(parts):
      plgpu.copy_smem_to_gmem(g_smem[j][p], dqkv_ref.at[rows, j, h, pl.ds(c0, cols)],
                              commit_group=False)
    plgpu.copy_smem_to_gmem(dgain_smem[j], dgain_ref.at[j, h, rows], commit_group=False)
  plgpu.copy_smem_to_gmem(v_smem, dqkv_ref.at[rows, 2, h], commit_group=False)
  plgpu.commit_smem_to_gmem_group()
  plgpu.wait_smem_to_gmem(0)


def _call(kernel, out_type, scratch, tokens: int, heads: int, name: str, interpret: bool):
  kwargs = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=import-outside-toplevel
    kwargs["interpret"] = params.InterpretGPUParams()
  return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch,
                      grid=(tokens // BLOCK_TOKENS, heads), grid_names=("block", "head"),
                      compiler_params=plgpu.CompilerParams(approx_math=True), kernel_name=name,
                      **kwargs)


def _flat(qkv, cos, sin, gain):
  """Token-major views: qkv (tokens, 3, heads, d), angles (H * W, heads, R), gain rows."""
  b, height, width, _, heads, d = qkv.shape
  tokens, angle_rows = b * height * width, height * width
  flat_angles = lambda a: a.astype(jnp.float32).reshape(angle_rows, heads, d // 4)
  gain_rows = jnp.broadcast_to(gain.astype(jnp.float32)[:, None], (heads, BLOCK_TOKENS))
  return (qkv.reshape(tokens, 3, heads, d), flat_angles(cos), flat_angles(sin), gain_rows,
          tokens, angle_rows)


def _scratch_x(d, dtype):
  return [[_smem(cols, dtype) for _, cols in _parts(d)] for _ in range(2)]


def _forward(qkv, gain, cos, sin, eps, interpret):
  b, height, width, _, heads, d = qkv.shape
  flat, cos_f, sin_f, gain_rows, tokens, angle_rows = _flat(qkv, cos, sin, gain)
  r = d // 4
  one = jax.ShapeDtypeStruct((tokens, heads, d), qkv.dtype)
  scratch = (_scratch_x(d, qkv.dtype), _smem(d, qkv.dtype), _smem(r, jnp.float32),
             _smem(r, jnp.float32), plgpu.SMEM((BLOCK_TOKENS,), jnp.float32),
             plgpu.Barrier(num_arrivals=3 * 2 + 4))
  kernel = functools.partial(_fwd_kernel, d=d, eps=eps, angle_rows=angle_rows,
                             interpret=interpret)
  q, k, v = _call(kernel, (one, one, one), scratch, tokens, heads, "qk_norm_rope_fwd_mgpu",
                  interpret)(flat, cos_f, sin_f, gain_rows)
  shape = (b, height, width, heads, d)
  return q.reshape(shape), k.reshape(shape), v.reshape(shape)


def _backward(qkv, gain, cos, sin, dq, dk, dv, eps, interpret):
  b, height, width, _, heads, d = qkv.shape
  flat, cos_f, sin_f, gain_rows, tokens, angle_rows = _flat(qkv, cos, sin, gain)
  r = d // 4
  out_type = (jax.ShapeDtypeStruct(flat.shape, qkv.dtype),
              jax.ShapeDtypeStruct((2, heads, tokens), jnp.float32))
  scratch = (_scratch_x(d, qkv.dtype), _scratch_x(d, qkv.dtype), _smem(d, qkv.dtype),
             _smem(r, jnp.float32), _smem(r, jnp.float32),
             plgpu.SMEM((BLOCK_TOKENS,), jnp.float32),
             [plgpu.SMEM((BLOCK_TOKENS,), jnp.float32) for _ in range(2)],
             plgpu.Barrier(num_arrivals=3 * 4 + 4))
  kernel = functools.partial(_bwd_kernel, d=d, eps=eps, angle_rows=angle_rows,
                             interpret=interpret)
  grads = [g.astype(qkv.dtype).reshape(tokens, heads, d) for g in (dq, dk, dv)]
  dqkv, dgain_rows = _call(kernel, out_type, scratch, tokens, heads,
                           "qk_norm_rope_bwd_mgpu", interpret)(flat, *grads, cos_f, sin_f,
                                                               gain_rows)
  return dqkv.reshape(qkv.shape), dgain_rows.sum(axis=(0, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(qkv, gain, cos, sin, eps, interpret):
  return _forward(qkv, gain, cos, sin, eps, interpret)


def _fused_fwd(qkv, gain, cos, sin, eps, interpret):
  return _forward(qkv, gain, cos, sin, eps, interpret), (qkv, gain, cos, sin)


def _fused_bwd(eps, interpret, residuals, grads):
  qkv, gain, cos, sin = residuals
  dqkv, dgain = _backward(qkv, gain, cos, sin, *grads, eps, interpret)
  # The angles' gradient through jnp: XLA drops it where the angles need none (HDiT's).
  _, angle_vjp = jax.vjp(lambda c, s: reference(qkv, gain, c, s, eps)[:2], cos, sin)
  dcos, dsin = angle_vjp(grads[:2])
  return dqkv, dgain.astype(gain.dtype), dcos, dsin


_fused.defvjp(_fused_fwd, _fused_bwd)
