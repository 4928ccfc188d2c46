"""The DiT baseline (Peebles & Xie 2023, adaLN-Zero) in pixel space, in Flax NNX.

Follows the official `facebookresearch/DiT` models.py; the HDiT paper compares against it in
pixel space. Attribute paths mirror the PyTorch state_dict up to these renames:
`*.adaLN_modulation.1` -> `*.adaLN_modulation` (the SiLU is applied in the call),
`t_embedder.mlp.{0,2}` -> `t_embedder.mlp.{0,1}`, `y_embedder.embedding_table.weight` ->
`y_embedder.embedding_table`, and `x_embedder.proj.weight` [D, C, p, p] becomes the kernel
[p*p*C, D] of a linear on pixel-unshuffled patches (rows ordered (dy, dx, c)).
"""

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hdit_jax.models.attention import global_attention
from hdit_jax.models.hdit import pixel_shuffle, pixel_unshuffle
from hdit_jax.models.layers import Dtype, Linear, param

# variant letter -> (depth, width, num_heads), table 1 of the DiT paper.
DIT_VARIANTS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (2, 4, 8)
MODEL_KEYS = frozenset({
    "type", "variant", "depth", "width", "num_heads", "patch_size", "input_size",
    "input_channels", "num_classes", "learn_sigma", "mlp_ratio", "frequency_embedding_size",
    "dtype", "param_dtype", "remat"})

_xavier = jax.nn.initializers.xavier_uniform()
_normal_002 = jax.nn.initializers.normal(0.02)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class DiTSpec:
  """DiT architecture. `num_classes` counts dataset classes; a conditional model's table has one
  more row, the null class `num_classes` (classifier-free guidance). 0 means unconditional."""
  depth: int
  width: int
  num_heads: int
  patch_size: int
  mlp_ratio: float = 4.0
  in_channels: int = 3
  learn_sigma: bool = False
  num_classes: int = 0
  frequency_embedding_size: int = 256

  def __post_init__(self):
    _check(self.depth >= 1, f"model.depth must be >= 1, got {self.depth}")
    _check(self.width >= 1 and self.num_heads >= 1,
           f"model.width {self.width} and model.num_heads {self.num_heads} must be positive")
    _check(self.width % self.num_heads == 0,
           f"model.width {self.width} is not divisible by model.num_heads {self.num_heads}")
    _check(self.width % 4 == 0,
           f"model.width {self.width} must be a multiple of 4 (2-D sin-cos position embedding)")
    _check(self.patch_size >= 1, f"model.patch_size must be >= 1, got {self.patch_size}")
    _check(self.mlp_ratio > 0, f"model.mlp_ratio must be positive, got {self.mlp_ratio}")
    _check(self.in_channels >= 1, f"model.input_channels must be >= 1, got {self.in_channels}")
    _check(self.num_classes >= 0, f"model.num_classes must be >= 0, got {self.num_classes}")
    _check(self.frequency_embedding_size >= 2,
           f"model.frequency_embedding_size must be >= 2, got {self.frequency_embedding_size}")

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def mlp_hidden(self) -> int:
    return int(self.width * self.mlp_ratio)  # timm's Mlp truncates the same way


def dit_spec_from_config(cfg: Mapping[str, Any]) -> DiTSpec:
  """DiTSpec from a config's `model` section; explicit depth/width/num_heads/patch_size override
  the `variant` ('S/2', 'B/4', 'XL/8', ...)."""
  unknown = set(cfg.keys()) - MODEL_KEYS
  _check(not unknown, f"unknown model config keys: {sorted(unknown)}; known: {sorted(MODEL_KEYS)}")
  _check(cfg.get("type", "dit") == "dit", f"model.type must be 'dit', got {cfg.get('type')!r}")
  arch = {}
  variant = cfg.get("variant")
  if variant:
    name = str(variant).removeprefix("DiT-")
    size, _, patch = name.partition("/")
    if size not in DIT_VARIANTS or patch not in tuple(str(p) for p in PATCH_SIZES):
      raise ValueError(f"model.variant {variant!r} is not <size>/<patch> with size in "
                       f"{sorted(DIT_VARIANTS)} and patch in {PATCH_SIZES} (e.g. 'B/4')")
    arch = dict(zip(("depth", "width", "num_heads"), DIT_VARIANTS[size]), patch_size=int(patch))
  for key in ("depth", "width", "num_heads", "patch_size"):
    if cfg.get(key) is not None:
      arch[key] = int(cfg.get(key))
  missing = [k for k in ("depth", "width", "num_heads", "patch_size") if k not in arch]
  _check(not missing, f"model.variant is not set, so model.{missing} must be given")
  spec = DiTSpec(**arch, mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
                 in_channels=int(cfg.get("input_channels", 3)),
                 learn_sigma=bool(cfg.get("learn_sigma", False)),
                 num_classes=int(cfg.get("num_classes", 0)),
                 frequency_embedding_size=int(cfg.get("frequency_embedding_size", 256)))
  size = cfg.get("input_size")
  if size is not None:
    size = (size, size) if isinstance(size, int) else tuple(size)
    _check(all(int(s) % spec.patch_size == 0 for s in size),
           f"model.input_size {size} is not divisible by model.patch_size {spec.patch_size}")
  return spec


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Official DiT/MAE 2-D sin-cos embedding, float64 [grid_h * grid_w, embed_dim], row-major.

  The first half encodes the column index, the second the row index (the official meshgrid puts
  w first); each half is [sin, cos] of position * 10000^(-k / (D/4)).
  """
  def one_d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
  return np.concatenate([one_d(embed_dim // 2, cols), one_d(embed_dim // 2, rows)], axis=1)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Official sinusoidal embedding [B, dim] of t [B]: cos first, then sin (zero-padded if odd)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters over the last axis, in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
  return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nnx.Module):
  """Stride-p p x p convolution as pixel-unshuffle + linear: [B, H, W, C] -> [B, H/p, W/p, D]."""

  def __init__(self, patch_size: int, in_channels: int, width: int, *, rngs: nnx.Rngs, **kw):
    self.patch_size = patch_size
    # Xavier on the flattened conv weight, as the official initialize_weights.
    self.proj = Linear(patch_size * patch_size * in_channels, width, rngs=rngs,
                       axes=(None, "embed"), use_bias=True, kernel_init=_xavier, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(pixel_unshuffle(x, self.patch_size, self.patch_size))


class TimestepEmbedder(nnx.Module):
  """Sinusoidal features of t then Linear -> SiLU -> Linear: t [B] -> [B, D]."""

  def __init__(self, width: int, frequency_embedding_size: int, *, rngs: nnx.Rngs, **kw):
    self.frequency_embedding_size = frequency_embedding_size
    self.mlp = nnx.List([
        Linear(frequency_embedding_size, width, rngs=rngs, axes=(None, "embed"), use_bias=True,
               kernel_init=_normal_002, **kw),
        Linear(width, width, rngs=rngs, axes=(None, "embed"), use_bias=True,
               kernel_init=_normal_002, **kw)])

  def __call__(self, t: jax.Array) -> jax.Array:
    h = self.mlp[0](timestep_embedding(t, self.frequency_embedding_size))
    return self.mlp[1](jax.nn.silu(h))


class LabelEmbedder(nnx.Module):
  """Class embedding table [num_classes + 1, D] (last row: null class), N(0, 0.02^2) init."""

  def __init__(self, num_classes: int, width: int, *, rngs: nnx.Rngs, param_dtype: Dtype):
    table = _normal_002(rngs.params(), (num_classes + 1, width), param_dtype)
    self.embedding_table = param(table, (None, "embed"), ())

  def __call__(self, labels: jax.Array) -> jax.Array:
    return jnp.take(self.embedding_table[...], labels, axis=0).astype(jnp.float32)


class Attention(nnx.Module):
  """timm multi-head softmax attention, qkv outputs ordered (q|k|v, head, head_dim)."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, **kw):
    self.num_heads = num_heads
    self.qkv = Linear(width, (3, num_heads, width // num_heads), rngs=rngs,
                      axes=("embed", None, "heads", None), use_bias=True, kernel_init=_xavier,
                      **kw)
    self.proj = Linear(width, width, rngs=rngs, axes=("qkv", "embed"), use_bias=True,
                       kernel_init=_xavier, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    qkv = self.qkv(x)   # [B, N, 3, heads, head_dim]
    out = global_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
  """fc1 -> GELU (tanh approximation) -> fc2."""

  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, **kw):
    self.fc1 = Linear(width, hidden, rngs=rngs, axes=("embed", "mlp"), use_bias=True,
                      kernel_init=_xavier, **kw)
    self.fc2 = Linear(hidden, width, rngs=rngs, axes=("mlp", "embed"), use_bias=True,
                      kernel_init=_xavier, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
  """adaLN-Zero block: x [B, N, D] float32, c [B, D] -> x + gate * f(modulate(norm(x)))."""

  def __init__(self, width: int, num_heads: int, mlp_hidden: int, *, rngs: nnx.Rngs, **kw):
    self.attn = Attention(width, num_heads, rngs=rngs, **kw)
    self.mlp = Mlp(width, mlp_hidden, rngs=rngs, **kw)
    self.adaLN_modulation = Linear(width, 6 * width, rngs=rngs, axes=("embed", None),
                                   use_bias=True, zero_init=True, **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mods = self.adaLN_modulation(jax.nn.silu(c)).astype(jnp.float32)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=-1)
    x = x + gate_msa[:, None] * self.attn(
        modulate(layer_norm(x), shift_msa, scale_msa)).astype(jnp.float32)
    x = x + gate_mlp[:, None] * self.mlp(
        modulate(layer_norm(x), shift_mlp, scale_mlp)).astype(jnp.float32)
    return x


class FinalLayer(nnx.Module):
  """norm -> modulate -> zero-initialised linear: [B, N, D] -> [B, N, p*p*C_out]."""

  def __init__(self, width: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs, **kw):
    self.adaLN_modulation = Linear(width, 2 * width, rngs=rngs, axes=("embed", None),
                                   use_bias=True, zero_init=True, **kw)
    self.linear = Linear(width, patch_size * patch_size * out_channels, rngs=rngs,
                         axes=("embed", None), use_bias=True, zero_init=True, **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)).astype(jnp.float32), 2, -1)
    return self.linear(modulate(layer_norm(x), shift, scale))


class DiT(nnx.Module):
  """Diffusion Transformer with adaLN-Zero blocks, on pixels, driven like `HDiT`.

  Call: model(x [B, H, W, C] (already multiplied by c_in), sigma [B], aug_cond=None,
  class_cond [B] int or None, mapping_cond=None) -> F [B, H, W, C_out] float32. The model takes
  raw sigma like HDiT and feeds the EDM noise conditioning c_noise = log(sigma) / 4 to the
  sinusoidal timestep embedder (EDM practice) in place of DDPM's integer timestep. aug_cond and
  mapping_cond are accepted for interface compatibility and ignored (DiT has no such inputs).
  Labels lie in [0, num_classes], num_classes being the null class; label dropout is done by the
  training code. `dtype` is the compute dtype; the residual stream, LayerNorm statistics and
  adaLN modulations stay float32. `remat` rematerialises every block in the backward pass.
  """

  def __init__(self, spec: DiTSpec, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: bool = False):
    self.spec = spec
    self.remat = remat
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    d = spec.width
    self.x_embedder = PatchEmbed(spec.patch_size, spec.in_channels, d, rngs=rngs, **kw)
    self.t_embedder = TimestepEmbedder(d, spec.frequency_embedding_size, rngs=rngs, **kw)
    self.y_embedder = LabelEmbedder(spec.num_classes, d, rngs=rngs, param_dtype=param_dtype) \
        if spec.num_classes else None
    self.blocks = nnx.List([DiTBlock(d, spec.num_heads, spec.mlp_hidden, rngs=rngs, **kw)
                            for _ in range(spec.depth)])
    self.final_layer = FinalLayer(d, spec.patch_size, spec.out_channels, rngs=rngs, **kw)

  def __call__(self, x: jax.Array, sigma: jax.Array, aug_cond: jax.Array | None = None,
               class_cond: jax.Array | None = None,
               mapping_cond: jax.Array | None = None) -> jax.Array:
    del aug_cond, mapping_cond  # not part of DiT
    spec, p = self.spec, self.spec.patch_size
    if x.ndim != 4 or x.shape[-1] != spec.in_channels:
      raise ValueError(f"expected NHWC images with {spec.in_channels} channels, got shape "
                       f"{x.shape}")
    b, height, width, _ = x.shape
    if height % p or width % p:
      raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}")
    if self.y_embedder is not None and class_cond is None:
      raise ValueError("this model is class-conditional: pass class_cond (labels in "
                       f"[0, {spec.num_classes}], {spec.num_classes} = null class)")
    if self.y_embedder is None and class_cond is not None:
      raise ValueError("class_cond given, but this model is unconditional (num_classes = 0)")

    gh, gw = height // p, width // p
    pos = get_2d_sincos_pos_embed(spec.width, gh, gw).astype(np.float32)
    h = self.x_embedder(x).reshape(b, gh * gw, spec.width).astype(jnp.float32) + pos
    c_noise = jnp.log(sigma.astype(jnp.float32)) / 4
    c = self.t_embedder(c_noise).astype(jnp.float32)
    if self.y_embedder is not None:
      c = c + self.y_embedder(class_cond)
    for block in self.blocks:
      if self.remat:
        # A pure function of the block's weights (no RNG streams): nnx.remat writes them back,
        # which fails where the model is a constant of an inner trace (the sampler's scan).
        graphdef, state = nnx.split(block)
        h = jax.checkpoint(lambda s, h_, c_: nnx.merge(graphdef, s)(h_, c_))(state, h, c)
      else:
        h = block(h, c)
    out = self.final_layer(h, c).reshape(b, gh, gw, -1)
    return pixel_shuffle(out, p, p).astype(jnp.float32)
