"""Dense (global) softmax attention with an explicit logit scale, layout (batch, tokens, heads, dim)."""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def _xla_attention(q, k, v, scale):
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bnqk,bknd->bqnd", probs, v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def _cudnn_usable(q) -> bool:
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                          implementation: str | None = None) -> jax.Array:
  """softmax(scale * q k^T) v over all tokens, q/k/v of shape (batch, tokens, heads, head_dim).

  `implementation`: None picks cuDNN's fused kernel on GPU for 16-bit inputs and the XLA path
  otherwise; 'xla' computes logits and softmax in float32; 'cudnn' forces the fused kernel.
  """
  if implementation not in (None,) + IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; expected one of "
                     f"{(None,) + IMPLEMENTATIONS}")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if implementation == "cudnn" or (implementation is None and _cudnn_usable(q)):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  return _xla_attention(q, k, v, scale)
