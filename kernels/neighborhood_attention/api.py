"""The public neighborhood-attention op and its dispatch over implementations."""

import jax

from hdit_kernels.neighborhood_attention import reference

IMPLEMENTATIONS = ("xla",)


def na2d(q: jax.Array, k: jax.Array, v: jax.Array, kernel_size: int, dilation: int = 1, *,
         scale: float | None = None, implementation: str | None = None) -> jax.Array:
  """2-D neighborhood attention (NATTEN semantics), layout (batch, height, width, heads, head_dim).

  Each query attends to the kernel_size x kernel_size keys of its window, shifted inward at the
  borders (no padding), within its dilation group. `scale` multiplies the logits (default
  head_dim**-0.5; HDiT passes 1.0). `implementation`: None picks the best available, 'xla' is
  the pure-jnp path.
  """
  if implementation not in (None,) + IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; expected one of "
                     f"{(None,) + IMPLEMENTATIONS}")
  return reference.na2d_reference(q, k, v, kernel_size, dilation, scale)
