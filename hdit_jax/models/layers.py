"""Building blocks of HDiT (k-diffusion `image_transformer_v2`): linears, norms, GEGLU, mapping net.

Attribute names follow the PyTorch state_dict so that weight conversion is a mechanical rename
(`weight` [out, in] <-> `kernel` [in, out]). Parameters carry two kinds of metadata:
`tags` (`wd`, `mapping`), which drive the optimizer groups as in the official code, and
`out_sharding`, logical axis names that the training code maps to mesh axes.
"""

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any


class Buffer(nnx.Variable):
  """A fixed, non-trained array that is saved and loaded with the weights (PyTorch's buffers)."""


def param(value: jax.Array, axes: Sequence[str | None], tags: Sequence[str] = ()) -> nnx.Param:
  """A float parameter with logical axis names (for sharding) and optimizer tags."""
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False, tags=tuple(tags))


def torch_linear_init(key: jax.Array, in_features: int, out_features: int,
                      dtype: Dtype = jnp.float32) -> jax.Array:
  """PyTorch's default Linear init, U(-1/sqrt(in), 1/sqrt(in)), as an [in, out] kernel."""
  bound = 1.0 / math.sqrt(in_features)
  return jax.random.uniform(key, (in_features, out_features), dtype, -bound, bound)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias). Computes in `dtype`; the kernel is stored in `param_dtype`.

  `out_features` may be a shape: the kernel is then [in, *out] and y [..., *out], the same
  matrix as PyTorch's [prod(out), in] weight, with axes of its own, so that a fused projection
  (qkv as (3, heads, d_head), GEGLU as (value|gate, d_ff)) is split between devices by heads or
  hidden units, never through the middle of a q/k/v or value/gate pair. `axes` names the
  kernel's axes. `zero_init` zero-initialises the kernel (HDiT's residual outputs, AdaRMSNorm
  modulations).
  """

  def __init__(self, in_features: int, out_features: int | Sequence[int], *, rngs: nnx.Rngs,
               axes: Sequence[str | None] = (None, None), tags: Sequence[str] = ("wd",),
               zero_init: bool = False, use_bias: bool = False,
               kernel_init: Callable[..., jax.Array] | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    out_shape = (out_features,) if isinstance(out_features, int) else tuple(out_features)
    if len(axes) != 1 + len(out_shape):
      raise ValueError(f"Linear: {len(axes)} axis names for a kernel of shape "
                       f"{(in_features,) + out_shape}")
    flat = math.prod(out_shape)
    if zero_init:
      kernel = jnp.zeros((in_features, flat), param_dtype)
    elif kernel_init is not None:
      kernel = kernel_init(rngs.params(), (in_features, flat), param_dtype)
    else:
      kernel = torch_linear_init(rngs.params(), in_features, flat, param_dtype)
    self.kernel = param(kernel.reshape((in_features,) + out_shape), axes, tags)
    self.bias = (param(jnp.zeros(out_shape, param_dtype), tuple(axes[1:]), ())
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x * scale / sqrt(mean(x^2) + eps) over the last axis, in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * (scale.astype(jnp.float32) * inv)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with a learnable gain `scale` (init 1), eps 1e-6 added to the mean square."""

  def __init__(self, features: int, *, eps: float = 1e-6, axis_name: str | None = None,
               tags: Sequence[str] = (), param_dtype: Dtype = jnp.float32):
    self.scale = param(jnp.ones((features,), param_dtype), (axis_name,), tags)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


class AdaRMSNorm(nnx.Module):
  """RMSNorm whose per-sample gain is 1 + cond @ W (W zero-initialised, no bias, no shift).

  x: [B, ..., d], cond: [B, m]. The modulation linear is tagged `mapping` (lr/3) and `wd`.
  """

  def __init__(self, features: int, cond_features: int, *, rngs: nnx.Rngs, eps: float = 1e-6,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    self.linear = Linear(cond_features, features, rngs=rngs, axes=("mapping", "embed"),
                         tags=("wd", "mapping"), zero_init=True, dtype=dtype,
                         param_dtype=param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    scale = 1.0 + self.linear(cond).astype(jnp.float32)
    scale = scale.reshape(scale.shape[:1] + (1,) * (x.ndim - 2) + scale.shape[1:])
    return rms_norm(x, scale, self.eps)


class FourierFeatures(nnx.Module):
  """phi(u) = [cos(2 pi u W^T), sin(2 pi u W^T)], W a fixed N(0, std^2) buffer of shape [out/2, in]."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, std: float = 1.0):
    if out_features % 2:
      raise ValueError(f"FourierFeatures needs an even output width, got {out_features}")
    self.weight = Buffer(jax.random.normal(rngs.params(), (out_features // 2, in_features)) * std)

  def __call__(self, u: jax.Array) -> jax.Array:
    f = 2 * math.pi * jnp.dot(u.astype(jnp.float32), self.weight[...].T.astype(jnp.float32))
    return jnp.concatenate([jnp.cos(f), jnp.sin(f)], axis=-1)


@jax.custom_vjp
def geglu(x: jax.Array) -> jax.Array:
  """x: [..., 2, d_ff], the value then the gate: value * GELU(gate), exact (erf) GELU.

  The gradient is written out so that only x (the projection's output, kept anyway) is saved:
  autodiff would also keep GELU(gate), one more d_ff-sized tensor written and read per layer.
  """
  value = x[..., 0, :].astype(jnp.float32)
  gate = x[..., 1, :].astype(jnp.float32)
  # erf, not jax.nn.gelu's erfc: XLA's float32 erfc (two branches and an exp) made this
  # fusion compute-bound at a third of the memory rate. For very negative gates 1 + erf
  # cancels (to 0 below about -5.4), an absolute error of about 2e-8 |value * gate|: far
  # below bfloat16's resolution of the output.
  return (value * (0.5 * gate) * (1.0 + jax.lax.erf(gate * (1 / math.sqrt(2))))).astype(x.dtype)


def _geglu_fwd(x):
  return geglu(x), x


def _geglu_bwd(x, grad):
  value, gate = x[..., 0, :].astype(jnp.float32), x[..., 1, :].astype(jnp.float32)
  grad = grad.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(gate * (1 / math.sqrt(2))))
  pdf = jnp.exp(-0.5 * jnp.square(gate)) * (1 / math.sqrt(2 * math.pi))
  grad_value = grad * gate * cdf
  grad_gate = grad * value * (cdf + gate * pdf)
  return (jnp.stack([grad_value, grad_gate], axis=-2).astype(x.dtype),)


geglu.defvjp(_geglu_fwd, _geglu_bwd)


class FeedForward(nnx.Module):
  """Pre-norm residual feed-forward: x + down(dropout(act(up(norm(x))))).

  `activation` 'geglu' (HDiT: up to 2*d_ff, value * GELU(gate)) or 'gelu' (plain MLP, the
  ablations' baseline). With `cond_features` the norm is an AdaRMSNorm (backbone), without it a
  plain RMSNorm (mapping network).
  """

  def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, cond_features: int | None = None,
               dropout: float = 0.0, activation: str = "geglu", mapping: bool = False,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    if activation not in ("geglu", "gelu"):
      raise ValueError(f"feed-forward activation must be 'geglu' or 'gelu', got {activation!r}")
    tags = ("wd", "mapping") if mapping else ("wd",)
    if cond_features is None:
      self.norm = RMSNorm(d_model, axis_name="mapping" if mapping else "embed",
                          tags=("mapping",) if mapping else (), param_dtype=param_dtype)
    else:
      self.norm = AdaRMSNorm(d_model, cond_features, rngs=rngs, dtype=dtype,
                             param_dtype=param_dtype)
    embed = "mapping" if mapping else "embed"
    # GEGLU's up projection is (value|gate, d_ff): PyTorch's 2*d_ff outputs, value half first.
    up_shape, up_axes = (((2, d_ff), (embed, None, "mlp")) if activation == "geglu"
                         else (d_ff, (embed, "mlp")))
    self.up_proj = Linear(d_model, up_shape, rngs=rngs, axes=up_axes, tags=tags,
                          dtype=dtype, param_dtype=param_dtype)
    # Only a layer that drops anything holds an RNG stream (the step reseeds it).
    self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
    self.down_proj = Linear(d_ff, d_model, rngs=rngs, axes=("mlp", embed), tags=tags,
                            zero_init=True, dtype=dtype, param_dtype=param_dtype)
    self.activation = activation
    self.conditional = cond_features is not None

  def __call__(self, x: jax.Array, cond: jax.Array | None = None) -> jax.Array:
    h = self.norm(x, cond) if self.conditional else self.norm(x)
    h = self.up_proj(h)
    h = geglu(h) if self.activation == "geglu" else jax.nn.gelu(h, approximate=False)
    h = self.down_proj(self.dropout(h))
    return x + h.astype(x.dtype)


class MappingNetwork(nnx.Module):
  """cond = RMSNorm_out(blocks(RMSNorm_in(e))), each block a GEGLU feed-forward with RMSNorm."""

  def __init__(self, depth: int, width: int, d_ff: int, *, rngs: nnx.Rngs, dropout: float = 0.0,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    self.in_norm = RMSNorm(width, axis_name="mapping", tags=("mapping",), param_dtype=param_dtype)
    self.blocks = nnx.List([
        FeedForward(width, d_ff, rngs=rngs, dropout=dropout, mapping=True, dtype=dtype,
                    param_dtype=param_dtype) for _ in range(depth)])
    self.out_norm = RMSNorm(width, axis_name="mapping", tags=("mapping",),
                            param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.in_norm(x)
    for block in self.blocks:
      x = block(x)
    return self.out_norm(x)
