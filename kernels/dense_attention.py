"""Dense (global) softmax attention with an explicit logit scale, layout (batch, tokens, heads, dim).

Implementations: 'cudnn' (cuDNN's fused kernel through jax.nn.dot_product_attention, GPU,
16-bit), 'pallas_tpu' (jax's Pallas TPU flash attention, forward and backward kernels), 'xla'
(logits and softmax in float32, the fallback everywhere).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

IMPLEMENTATIONS = ("xla", "cudnn", "pallas_tpu")
# The TPU flash kernel's default sequence block: lengths must be whole blocks.
_TPU_BLOCK = 128


def _xla_attention(q, k, v, scale):
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bnqk,bknd->bqnd", probs, v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def _cudnn_usable(q) -> bool:
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def tpu_flash_unsupported(q, k) -> str | None:
  """Why the Pallas TPU flash kernel cannot run this case, or None."""
  if q.dtype not in (jnp.float32, jnp.bfloat16):
    return f"dtype {q.dtype}"
  for name, length in (("query", q.shape[1]), ("key", k.shape[1])):
    if length % _TPU_BLOCK:
      return f"{name} length {length} is not a multiple of {_TPU_BLOCK}"
  return None


def _tpu_flash_attention(q, k, v, scale):
  """jax's Pallas TPU flash attention on (B, S, n, d) inputs (it wants (B, n, S, d))."""
  heads_major = lambda t: jnp.swapaxes(t, 1, 2)
  b, sq, n, d = q.shape
  blocks = tpu_flash.BlockSizes.get_default(b, n, sq, k.shape[1], d)   # 128 everywhere
  out = tpu_flash.flash_attention(heads_major(q), heads_major(k), heads_major(v),
                                  sm_scale=scale, block_sizes=blocks)
  return heads_major(out)


def _interpreted(fn):
  """fn under TPU interpret mode, its backward kernels too (they are traced later, by grad)."""

  @jax.custom_vjp
  def wrapped(*args):
    with pltpu.force_tpu_interpret_mode():
      return fn(*args)

  def wrapped_fwd(*args):
    with pltpu.force_tpu_interpret_mode():
      return jax.vjp(fn, *args)

  def wrapped_bwd(vjp_fn, ct):
    with pltpu.force_tpu_interpret_mode():
      return vjp_fn(ct)

  wrapped.defvjp(wrapped_fwd, wrapped_bwd)
  return wrapped


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                          implementation: str | None = None, interpret: bool = False) -> jax.Array:
  """softmax(scale * q k^T) v over all tokens, q/k/v of shape (batch, tokens, heads, head_dim).

  `implementation`: None picks cuDNN's fused kernel on GPU for 16-bit inputs, the Pallas flash
  kernel on TPU where it supports the shape, and the XLA path otherwise; naming one forces it
  (NotImplementedError where it cannot run). HDiT passes scale=1.0 (cosine-similarity logits).
  `interpret` runs the Pallas TPU kernel in interpret mode (CPU tests).
  """
  if implementation not in (None,) + IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; expected one of "
                     f"{(None,) + IMPLEMENTATIONS}")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if implementation == "cudnn" or (implementation is None and _cudnn_usable(q)):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  reason = tpu_flash_unsupported(q, k)
  if implementation == "pallas_tpu" and reason is not None:
    raise NotImplementedError(f"pallas_tpu flash attention: {reason}")
  if implementation == "pallas_tpu" or (implementation is None and reason is None
                                        and jax.default_backend() == "tpu"):
    flash = lambda q, k, v: _tpu_flash_attention(q, k, v, scale)
    return (_interpreted(flash) if interpret else flash)(q, k, v)
  return _xla_attention(q, k, v, scale)
