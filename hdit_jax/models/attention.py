"""Cosine-similarity self-attention blocks of HDiT: global, neighborhood and shifted-window.

Tokens are [B, H, W, d]. Heads are split as (head, d_head) in the channel axis, and the fused
qkv projection's outputs are (q|k|v, head, d_head), as in the official code, kept as three axes
so that a tensor-parallel split divides the heads.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hdit_jax.models import partitioning, positions
from hdit_jax.models.layers import AdaRMSNorm, Buffer, Dtype, Linear, param
from hdit_jax.models.spec import AttentionSpec
from hdit_kernels import dense_attention, qk_norm_rope
from hdit_kernels.neighborhood_attention import na2d


def scale_for_cosine_sim(q: jax.Array, k: jax.Array, scale: jax.Array,
                         eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Normalise q and k per head and multiply each by sqrt(scale[h]): q.k = scale[h] * cos(q, k).

  q, k: [..., n_heads, d_head]; scale: [n_heads]. eps is added to the sum of squares.
  """
  sqrt_scale = jnp.sqrt(scale.astype(jnp.float32))[:, None]

  def normalise(x):
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 * (sqrt_scale * inv)).astype(x.dtype)

  return normalise(q), normalise(k)


def shifted_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, window_size: int,
                             shift: int) -> jax.Array:
  """Swin-style attention in non-overlapping windows after a cyclic shift, logit scale 1.

  Tokens that the roll brought from the opposite border may not attend across the seam: in the
  first window row (column), query and key must lie on the same side of row (column) `shift`.
  """
  b, h, w, n, d = q.shape
  ws = window_size
  if shift:
    q, k, v = (jnp.roll(t, (shift, shift), axis=(1, 2)) for t in (q, k, v))

  def to_windows(t):
    t = t.reshape(b, h // ws, ws, w // ws, ws, n, d).transpose(0, 1, 3, 2, 4, 5, 6)
    return t.reshape(b, h // ws, w // ws, ws * ws, n, d)

  qw, kw, vw = to_windows(q), to_windows(k), to_windows(v)
  logits = jnp.einsum("bijqnd,bijknd->bijnqk", qw, kw, preferred_element_type=jnp.float32)
  local = jnp.arange(ws * ws)
  row_side, col_side = (local // ws) < shift, (local % ws) < shift
  same_row = row_side[:, None] == row_side[None, :]
  same_col = col_side[:, None] == col_side[None, :]
  first_row = (jnp.arange(h // ws) == 0)[:, None, None, None]
  first_col = (jnp.arange(w // ws) == 0)[None, :, None, None]
  allowed = (~first_row | same_row) & (~first_col | same_col)   # [nh, nw, ws2, ws2]
  logits = jnp.where(allowed[None, :, :, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bijnqk,bijknd->bijqnd", probs, vw, preferred_element_type=jnp.float32)
  out = out.astype(q.dtype).reshape(b, h // ws, w // ws, ws, ws, n, d)
  out = out.transpose(0, 1, 3, 2, 4, 5, 6).reshape(b, h, w, n, d)
  if shift:
    out = jnp.roll(out, (-shift, -shift), axis=(1, 2))
  return out


class AxialRoPE(nnx.Module):
  """Holds the fixed frequencies [n_heads, d_head // 8] (a buffer, saved with the weights)."""

  def __init__(self, d_head: int, n_heads: int):
    self.freqs = Buffer(positions.rope_freqs(d_head, n_heads))

  def __call__(self, pos: jax.Array) -> jax.Array:
    return positions.rope_angles(pos, self.freqs[...])


class SelfAttention(nnx.Module):
  """x + out_proj(dropout(attention(rope(cos_sim(qkv_proj(AdaRMSNorm(x, cond))))))).

  `shift` is the cyclic shift of shifted-window levels (0 or window_size // 2).
  """

  def __init__(self, d_model: int, cond_features: int, spec: AttentionSpec, *, rngs: nnx.Rngs,
               dropout: float = 0.0, use_rope: bool = True, shift: int = 0,
               implementation: str | None = None, qk_implementation: str = "xla",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    if qk_implementation not in qk_norm_rope.IMPLEMENTATIONS:
      raise ValueError(f"qk_implementation must be one of {qk_norm_rope.IMPLEMENTATIONS}, "
                       f"got {qk_implementation!r}")
    self.n_heads = d_model // spec.d_head
    self.spec = spec
    self.shift = shift
    self.implementation = implementation
    self.qk_implementation = qk_implementation
    self.norm = AdaRMSNorm(d_model, cond_features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.qkv_proj = Linear(d_model, (3, self.n_heads, spec.d_head), rngs=rngs,
                           axes=("embed", None, "heads", None), dtype=dtype,
                           param_dtype=param_dtype)
    self.scale = param(jnp.full((self.n_heads,), 10.0, param_dtype), ("heads",))
    self.pos_emb = AxialRoPE(spec.d_head, self.n_heads) if use_rope else None
    self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
    self.out_proj = Linear(d_model, d_model, rngs=rngs, axes=("qkv", "embed"), zero_init=True,
                           dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array, pos: jax.Array, cond: jax.Array) -> jax.Array:
    b, h, w, d = x.shape
    qkv = self.qkv_proj(self.norm(x, cond))   # [B, H, W, 3, n_heads, d_head]
    if self._fused_qk(qkv):
      theta = self.pos_emb(pos)
      prepare = lambda *a: qk_norm_rope.qk_norm_rope(*a, implementation=self.qk_implementation)
      q, k, v = partitioning.on_shards(
          prepare, qkv, jnp.sqrt(self.scale[...].astype(jnp.float32)), jnp.cos(theta),
          jnp.sin(theta), layouts=("b...h.", "h", "..h.", "..h."), out_layouts=("b..h.",) * 3)
    else:
      q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
      q, k = scale_for_cosine_sim(q, k, self.scale[...])
      if self.pos_emb is not None:
        theta = self.pos_emb(pos)   # [H, W, n_heads, d_head // 4]
        q, k = positions.apply_rope(q, theta), positions.apply_rope(k, theta)
    out = self._attend(q, k, v)
    out = self.dropout(out.reshape(b, h, w, d))
    return x + self.out_proj(out).astype(x.dtype)

  def _fused_qk(self, qkv) -> bool:
    """Whether the q/k preparation runs as one kernel (a named one that supports the shape)."""
    return (self.qk_implementation != "xla" and self.pos_emb is not None
            and qk_norm_rope.unsupported(qkv.shape, qkv.dtype) is None)

  def _attend(self, q, k, v):
    kind = self.spec.kind
    if kind == "neighborhood":
      attend = lambda q, k, v: na2d(q, k, v, self.spec.kernel_size, scale=1.0,
                                    implementation=self.implementation)
      return partitioning.on_shards(attend, q, k, v, layouts=("b..h.",) * 3,
                                    out_layouts="b..h.")
    if kind == "shifted-window":
      return shifted_window_attention(q, k, v, self.spec.window_size, self.shift)
    b, h, w, n, dh = q.shape
    flat = lambda t: t.reshape(b, h * w, n, dh)
    out = global_attention(flat(q), flat(k), flat(v), scale=1.0)
    return out.reshape(b, h, w, n, dh)


def global_attention(q: jax.Array, k: jax.Array, v: jax.Array, **kw) -> jax.Array:
  """Dense attention over all tokens, q/k/v [B, tokens, heads, d], per shard on a mesh."""
  attend = lambda q, k, v: dense_attention.dot_product_attention(q, k, v, **kw)
  return partitioning.on_shards(attend, q, k, v, layouts=("b.h.",) * 3, out_layouts="b.h.")
