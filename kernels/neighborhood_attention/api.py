"""The public neighborhood-attention op and its dispatch over implementations."""

import dataclasses
from typing import Any

import jax

from hdit_kernels.neighborhood_attention import dilation as dilation_lib
from hdit_kernels.neighborhood_attention import mosaic_gpu, pallas_gpu, pallas_tpu, windows, xla

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu", "mosaic_gpu")

_MODULES = {"xla": xla, "pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu,
            "mosaic_gpu": mosaic_gpu}


def default_implementation(backend: str | None = None) -> str:
  """The preferred implementation on `backend` (default: jax.default_backend())."""
  backend = backend or jax.default_backend()
  return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(backend, "xla")


def _unsupported(name: str, q: jax.Array, kernel_size: int, dilation: int,
                 config: Any) -> str | None:
  """Why implementation `name` cannot run this case, or None."""
  if name == "xla":
    return None
  # Dilation groups have ceil(L / dilation) or floor(L / dilation) positions per axis: every
  # size the kernel will see must pass.
  lengths = lambda n: sorted({-(-n // dilation), n // dilation})
  for height in lengths(q.shape[1]):
    for width in lengths(q.shape[2]):
      group_shape = (q.shape[0], height, width) + q.shape[3:]
      reason = _MODULES[name].unsupported(group_shape, q.dtype, kernel_size, config)
      if reason is not None:
        return f"dilation group {height} x {width}: {reason}" if dilation > 1 else reason
  return None


def na2d(q: jax.Array, k: jax.Array, v: jax.Array, kernel_size: int, dilation: int = 1, *,
         scale: float | None = None, implementation: str | None = None, config: Any = None,
         interpret: bool = False) -> jax.Array:
  """2-D neighborhood attention (NATTEN semantics), layout (batch, height, width, heads, head_dim).

  Each query attends to the kernel_size x kernel_size keys of its window, shifted inward at the
  borders (no padding), within its dilation group (positions i mod dilation). Differentiable in
  q, k and v (custom VJP saving only the float32 log-sum-exp besides inputs and output).

  Args:
    q, k, v: (batch, height, width, heads, head_dim), float32, bfloat16 or float16; softmax and
      accumulation run in float32, the result has q's dtype.
    kernel_size: window size per axis; kernel_size * dilation must not exceed either side.
    dilation: dilation of the window (>= 1).
    scale: multiplies the logits (default head_dim**-0.5; HDiT passes 1.0).
    implementation: 'xla' (portable jnp, halo-tiled), 'pallas_tpu' (Mosaic), 'pallas_gpu'
      (Triton), 'mosaic_gpu' (Pallas Mosaic GPU, Hopper), or None: the kernel of the current
      backend where it supports the case, otherwise 'xla'. A named kernel that cannot run the
      case raises NotImplementedError.
    config: the named implementation's Config of block sizes (None, or implementation None:
      its defaults for the backend).
    interpret: run a Pallas kernel in interpret mode (for tests on the CPU); without it a
      named Pallas kernel only runs (or lowers, under jax.export) for its own platform.

  Returns:
    (batch, height, width, heads, head_dim) in q's dtype.
  """
  if implementation not in (None,) + IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; expected one of "
                     f"{(None,) + IMPLEMENTATIONS}")
  if q.ndim != 5 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"q, k, v must share one (B, H, W, heads, dim) shape: {q.shape}, "
                     f"{k.shape}, {v.shape}")
  _, height, width, _, head_dim = q.shape
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  windows.check_window(height, kernel_size, dilation, "height")
  windows.check_window(width, kernel_size, dilation, "width")
  scale = float(head_dim ** -0.5 if scale is None else scale)

  # A named kernel is lowered for whatever platform the caller targets (jax.export can lower
  # for TPU from a CPU host); off its platform and without interpret, lowering itself fails.
  name = implementation or default_implementation()
  module = _MODULES[name]
  if config is None or implementation is None:
    config = module.Config()
  elif not isinstance(config, module.Config):
    raise TypeError(f"config for {name} must be a {module.__name__}.Config, got {config!r}")
  if name != "xla":
    config = dataclasses.replace(config, interpret=interpret)
  reason = _unsupported(name, q, kernel_size, dilation, config)
  if reason is not None:
    if implementation is not None:
      raise NotImplementedError(f"{name} does not support this case: {reason}")
    name, module, config = "xla", xla, xla.Config()
  fn = lambda q_, k_, v_: module.na2d(q_, k_, v_, kernel_size, scale, config)
  return dilation_lib.dilated(fn, q, k, v, dilation)
