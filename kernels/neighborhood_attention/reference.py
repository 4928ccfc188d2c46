"""Neighborhood attention in plain jnp: the fallback, and the truth every kernel is tested against.

Layout everywhere: q, k, v, out are (batch, height, width, heads, head_dim).
"""

import jax
import jax.numpy as jnp

from hdit_kernels.neighborhood_attention import windows


def na2d_reference(q: jax.Array, k: jax.Array, v: jax.Array, kernel_size: int,
                   dilation: int = 1, scale: float | None = None) -> jax.Array:
  """2-D neighborhood attention with NATTEN semantics, by gathering every window.

  Memory is kernel_size**2 times that of k and v: use it for tests and small maps.
  The softmax runs in float32 whatever the input dtype; the result has q's dtype.
  """
  _, height, width, _, head_dim = q.shape
  if k.shape != q.shape[:-1] + (k.shape[-1],) or v.shape[:-1] != k.shape[:-1]:
    raise ValueError(f"q, k, v shapes do not match: {q.shape}, {k.shape}, {v.shape}")
  windows.check_window(height, kernel_size, dilation, "height")
  windows.check_window(width, kernel_size, dilation, "width")
  scale = head_dim ** -0.5 if scale is None else scale
  rows = jnp.asarray(windows.window_indices(height, kernel_size, dilation))  # (H, k)
  cols = jnp.asarray(windows.window_indices(width, kernel_size, dilation))   # (W, k)
  # (B, H, k, W, k, n, d): every query row's key rows, then every query column's key columns.
  k_win = k[:, rows][:, :, :, cols]
  v_win = v[:, rows][:, :, :, cols]
  logits = jnp.einsum("bhwnd,bhawcnd->bhwnac", q, k_win,
                      preferred_element_type=jnp.float32) * scale
  b, h, w, n = logits.shape[:4]
  probs = jax.nn.softmax(logits.reshape(b, h, w, n, -1), axis=-1)
  probs = probs.reshape(logits.shape).astype(v.dtype)
  out = jnp.einsum("bhwnac,bhawcnd->bhwnd", probs, v_win,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)
