"""The Hourglass Diffusion Transformer (k-diffusion `ImageTransformerDenoiserModelV2`) in Flax NNX.

Images are NHWC at the API. The network output F is returned in float32; the EDM wrapper in
`hdit_jax.diffusion` turns it into a denoised image. Attribute paths mirror the PyTorch
state_dict (`down_levels.0.1.self_attn.qkv_proj`), which makes weight conversion a rename.
"""


import jax
import jax.numpy as jnp
from flax import nnx

from hdit_jax.models import positions, recording
from hdit_jax.models.attention import SelfAttention
from hdit_jax.models.layers import (Dtype, FeedForward, FourierFeatures, Linear, MappingNetwork,
                                    RMSNorm, param)
from hdit_jax.models.spec import HDiTSpec, LevelSpec

AUG_COND_DIM = 9


def pixel_unshuffle(x: jax.Array, ph: int, pw: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/ph, W/pw, ph*pw*C], features ordered (dy, dx, c) with c fastest."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // ph, w // pw, ph * pw * c)


def pixel_shuffle(x: jax.Array, ph: int, pw: int) -> jax.Array:
  """Inverse of `pixel_unshuffle`: [B, H, W, ph*pw*C] -> [B, H*ph, W*pw, C]."""
  b, h, w, f = x.shape
  c = f // (ph * pw)
  x = x.reshape(b, h, w, ph, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * ph, w * pw, c)


class TokenMerge(nnx.Module):
  """Pixel-unshuffle by `patch` then a linear projection (patch embedding and level merges)."""

  def __init__(self, in_features: int, out_features: int, patch: tuple[int, int], *,
               rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
    self.patch = tuple(patch)
    self.proj = Linear(in_features * patch[0] * patch[1], out_features, rngs=rngs,
                       axes=(None, "embed"), dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(pixel_unshuffle(x, *self.patch))


class TokenSplitWithoutSkip(nnx.Module):
  """Linear projection then pixel-shuffle (the output head; zero-initialised)."""

  def __init__(self, in_features: int, out_features: int, patch: tuple[int, int], *,
               rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
    self.patch = tuple(patch)
    self.proj = Linear(in_features, out_features * patch[0] * patch[1], rngs=rngs,
                       axes=("embed", None), zero_init=True, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return pixel_shuffle(self.proj(x), *self.patch)


class TokenSplit(nnx.Module):
  """2x2 split from the coarser level, merged with the skip of the down path.

  'lerp' (HDiT): skip + fac * (up - skip) with a learnable scalar fac (init 0.5, unconstrained).
  'add' and 'concat' (+ linear) are the paper's skip ablations.
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, skip: str = "lerp",
               dtype: Dtype, param_dtype: Dtype):
    self.skip = skip
    self.proj = Linear(in_features, out_features * 4, rngs=rngs, axes=("embed", None),
                       dtype=dtype, param_dtype=param_dtype)
    self.fac = param(jnp.full((1,), 0.5, param_dtype), (None,)) if skip == "lerp" else None
    self.skip_proj = Linear(2 * out_features, out_features, rngs=rngs, axes=(None, "embed"),
                            dtype=dtype, param_dtype=param_dtype) if skip == "concat" else None

  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    x = pixel_shuffle(self.proj(x), 2, 2)
    if self.skip == "lerp":
      fac = self.fac[...].astype(x.dtype)
      return skip.astype(x.dtype) + fac * (x - skip.astype(x.dtype))
    if self.skip == "add":
      return x + skip.astype(x.dtype)
    return self.skip_proj(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1))


class TransformerLayer(nnx.Module):
  """One attention block (absent for 'none' levels) followed by one feed-forward block."""

  def __init__(self, level: LevelSpec, cond_features: int, *, rngs: nnx.Rngs, index: int,
               use_rope: bool, feed_forward: str, implementation: str | None, dtype: Dtype,
               param_dtype: Dtype, qk_implementation: str = "xla"):
    a = level.attention
    shift = a.window_size // 2 if (a.kind == "shifted-window" and index % 2) else 0
    self.self_attn = None if a.kind == "none" else SelfAttention(
        level.width, cond_features, a, rngs=rngs, dropout=level.dropout, use_rope=use_rope,
        shift=shift, implementation=implementation, qk_implementation=qk_implementation,
        dtype=dtype, param_dtype=param_dtype)
    self.ff = FeedForward(level.width, level.d_ff, rngs=rngs, cond_features=cond_features,
                          dropout=level.dropout, activation=feed_forward, dtype=dtype,
                          param_dtype=param_dtype)

  def __call__(self, x: jax.Array, pos: jax.Array, cond: jax.Array) -> jax.Array:
    if self.self_attn is not None:
      x = self.self_attn(x, pos, cond)
    return self.ff(x, cond)


def _run_level(model: nnx.Module, layers: nnx.List, x: jax.Array, pos: jax.Array,
               cond: jax.Array, path: str) -> jax.Array:
  for layer in layers:
    if model.remat:
      x = _rematerialised(layer, x, pos, cond)
    else:
      x = layer(x, pos, cond)
  recording.note_output(model, path, x)
  return x


def _rematerialised(layer: nnx.Module, x: jax.Array, pos: jax.Array,
                    cond: jax.Array) -> jax.Array:
  """layer(x), recomputed in the backward pass: a pure function of the layer's state under
  jax.checkpoint (nnx.remat writes the whole state back, which fails where the model is a
  constant of an inner trace: the sampler's scan). Only active dropout draws keys, so only then
  are the advanced RNG counts written back, as the plain call would."""
  graphdef, state = nnx.split(layer)

  def run(s, x_):
    lyr = nnx.merge(graphdef, s)
    return lyr(x_, pos, cond), nnx.state(lyr, nnx.RngState)

  y, rng_state = jax.checkpoint(run)(state, x)
  if _draws_keys(layer):
    nnx.update(layer, rng_state)
  return y


def _draws_keys(layer: nnx.Module) -> bool:
  """Whether a call draws from the layer's RNG streams: some dropout has a stream and is not
  deterministic (the sampler's view of the model is)."""
  return any(isinstance(m, nnx.Dropout) and m.rate > 0 and m.rngs is not None
             and not m.deterministic for _, m in nnx.iter_modules(layer))


class HDiT(nnx.Module):
  """Hourglass Diffusion Transformer.

  Call: model(x [B, H, W, C] (already multiplied by c_in), sigma [B], aug_cond [B, 9] or None,
  class_cond [B] int or None, mapping_cond [B, k] or None) -> F [B, H, W, C_out] float32.
  `dtype` is the compute dtype (bfloat16 for training), parameters stay in `param_dtype`.
  `remat` rematerialises every transformer layer in the backward pass. `qk_implementation`
  computes the q/k normalisation with RoPE in jnp ('xla') or in one Mosaic GPU kernel each way
  ('mosaic_gpu', Hopper; levels whose shapes it does not support use jnp).
  """

  def __init__(self, spec: HDiTSpec, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: bool = False,
               attention_implementation: str | None = None, qk_implementation: str = "xla"):
    self.spec = spec
    self.remat = remat
    self.dtype = dtype
    m = spec.mapping.width
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    d0 = spec.levels[0].width
    self.patch_in = TokenMerge(spec.in_channels, d0, spec.patch_size, rngs=rngs, **kw)
    self.time_emb = FourierFeatures(1, m, rngs=rngs)
    self.time_in_proj = Linear(m, m, rngs=rngs, axes=(None, "mapping"), tags=(), **kw)
    self.aug_emb = FourierFeatures(AUG_COND_DIM, m, rngs=rngs)
    self.aug_in_proj = Linear(m, m, rngs=rngs, axes=(None, "mapping"), tags=(), **kw)
    self.class_emb = Embedding(spec.num_classes + 1, m, rngs=rngs, param_dtype=param_dtype) \
        if spec.num_classes else None
    self.mapping_cond_in_proj = Linear(spec.mapping_cond_dim, m, rngs=rngs,
                                       axes=(None, "mapping"), tags=(), **kw) \
        if spec.mapping_cond_dim else None
    self.mapping = MappingNetwork(spec.mapping.depth, m, spec.mapping.d_ff, rngs=rngs,
                                  dropout=spec.mapping.dropout, **kw)

    use_rope = spec.position_embedding == "rope"

    def make_level(level: LevelSpec, first_index: int) -> nnx.List:
      return nnx.List([
          TransformerLayer(level, m, rngs=rngs, index=first_index + j, use_rope=use_rope,
                           feed_forward=spec.feed_forward,
                           implementation=attention_implementation,
                           qk_implementation=qk_implementation, **kw)
          for j in range(level.depth)])

    inner, mid = spec.levels[:-1], spec.levels[-1]
    self.down_levels = nnx.List([make_level(lv, 0) for lv in inner])
    self.up_levels = nnx.List([make_level(lv, lv.depth) for lv in inner])
    self.mid_level = make_level(mid, 0)
    widths = [lv.width for lv in spec.levels]
    self.merges = nnx.List([
        TokenMerge(widths[i], widths[i + 1], (2, 2), rngs=rngs, **kw) for i in range(len(inner))])
    self.splits = nnx.List([
        TokenSplit(widths[i + 1], widths[i], rngs=rngs, skip=spec.skip, **kw)
        for i in range(len(inner))])
    self.out_norm = RMSNorm(d0, axis_name="embed", param_dtype=param_dtype)
    self.patch_out = TokenSplitWithoutSkip(d0, spec.out_channels, spec.patch_size, rngs=rngs,
                                           **kw)

  def conditioning(self, sigma, aug_cond=None, class_cond=None, mapping_cond=None):
    """The mapping network's output `cond` [B, m] that modulates every AdaRMSNorm."""
    batch = sigma.shape[0]
    c_noise = jnp.log(sigma.astype(jnp.float32)) / 4
    time_emb = self.time_emb(c_noise[:, None])
    if aug_cond is None:
      aug_cond = jnp.zeros((batch, AUG_COND_DIM), jnp.float32)
    aug_emb = self.aug_emb(aug_cond)
    mapping_in = (self.time_in_proj(time_emb).astype(jnp.float32) +
                  self.aug_in_proj(aug_emb).astype(jnp.float32))
    if self.class_emb is not None:
      if class_cond is None:
        raise ValueError("this model is class-conditional: pass class_cond (labels in "
                         f"[0, {self.spec.num_classes}], {self.spec.num_classes} = null class)")
      mapping_in = mapping_in + self.class_emb(class_cond)
    elif class_cond is not None:
      raise ValueError("class_cond given, but this model is unconditional (num_classes = 0)")
    if self.mapping_cond_in_proj is not None:
      if mapping_cond is None:
        raise ValueError(f"this model needs mapping_cond of width {self.spec.mapping_cond_dim}")
      mapping_in = mapping_in + self.mapping_cond_in_proj(mapping_cond).astype(jnp.float32)
    return self.mapping(mapping_in)

  def __call__(self, x: jax.Array, sigma: jax.Array, aug_cond: jax.Array | None = None,
               class_cond: jax.Array | None = None, mapping_cond: jax.Array | None = None):
    if x.ndim != 4 or x.shape[-1] != self.spec.in_channels:
      raise ValueError(f"expected NHWC images with {self.spec.in_channels} channels, got shape "
                       f"{x.shape}")
    grids = self.spec.token_grids(x.shape[1], x.shape[2])
    cond = self.conditioning(sigma, aug_cond, class_cond, mapping_cond)

    x = self.patch_in(x)
    pos = positions.make_axial_pos(*grids[0])
    if self.spec.position_embedding == "sincos":
      x = x + positions.sincos_embedding_2d(pos, x.shape[-1]).astype(x.dtype)

    skips, poses = [], []
    for i, (level, merge) in enumerate(zip(self.down_levels, self.merges)):
      x = _run_level(self, level, x, pos, cond, f"down_levels.{i}")
      skips.append(x)
      poses.append(pos)
      x = merge(x)
      pos = positions.downscale_pos(pos)

    x = _run_level(self, self.mid_level, x, pos, cond, "mid_level")

    ups = list(zip(range(len(self.up_levels)), self.up_levels, self.splits, skips, poses))
    for i, level, split, skip, pos in reversed(ups):
      x = split(x, skip)
      x = _run_level(self, level, x, pos, cond, f"up_levels.{i}")

    x = self.out_norm(x)
    return self.patch_out(x).astype(jnp.float32)


class Embedding(nnx.Module):
  """Class embedding table [num_embeddings, features], N(0, 1) init; the last row is the null class."""

  def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs,
               param_dtype: Dtype = jnp.float32):
    self.embedding = param(jax.random.normal(rngs.params(), (num_embeddings, features),
                                             param_dtype), ("classes", "mapping"))

  def __call__(self, labels: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], labels, axis=0).astype(jnp.float32)
