"""Tests of the DiT baseline (hdit_jax.models.dit) on tiny configs, CPU."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hdit_jax.models import dit

TINY = dict(depth=2, width=64, num_heads=4, patch_size=4)


def make(rngs_seed=0, **overrides):
  kw = dict(TINY, num_classes=10)
  model_kw = {k: overrides.pop(k) for k in ("dtype", "remat") if k in overrides}
  kw.update(overrides)
  return dit.DiT(dit.DiTSpec(**kw), rngs=nnx.Rngs(rngs_seed), **model_kw)


def perturb(model, seed=1, std=0.1):
  """Adds N(0, std^2) noise to every parameter, so that zero-initialised paths become live."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))


def inputs(b=2, h=16, w=16, c=3, seed=0):
  kx, ks = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (b, h, w, c))
  sigma = jnp.exp(jax.random.normal(ks, (b,)))
  return x, sigma


@pytest.mark.parametrize("learn_sigma,h,w,dtype", [
    (False, 16, 16, jnp.float32), (True, 16, 16, jnp.float32), (False, 16, 24, jnp.float32),
    (True, 16, 24, jnp.bfloat16)])
def test_output_shape_and_dtype(learn_sigma, h, w, dtype):
  model = make(learn_sigma=learn_sigma, dtype=dtype)
  perturb(model)
  x, sigma = inputs(h=h, w=w)
  out = model(x, sigma, class_cond=jnp.array([0, 10]))
  assert out.shape == (2, h, w, 6 if learn_sigma else 3)
  assert out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.abs(out).max()) > 0


def test_remat_matches():
  x, sigma = inputs()
  labels = jnp.array([1, 2])
  outs = []
  for remat in (False, True):
    model = make(remat=remat)
    perturb(model)
    outs.append(model(x, sigma, class_cond=labels))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_zero_init_outputs_zero():
  model = make()
  x, sigma = inputs()
  out = model(x, sigma, class_cond=jnp.array([3, 10]))
  assert bool(jnp.all(out == 0))


def test_output_depends_on_label_and_sigma():
  model = make()
  perturb(model)
  x, sigma = inputs(b=1)
  with jax.default_matmul_precision("highest"):
    run = lambda label, s=sigma: model(x, s, class_cond=jnp.array([label]))
    out0, out1, null = run(0), run(1), run(10)
    assert model.y_embedder.embedding_table[...].shape == (11, 64)
    assert bool(jnp.all(jnp.isfinite(null)))
    # jnp.take clamps out-of-range labels; with a missing null row label 10 would equal label 9.
    assert float(jnp.abs(null - run(9)).max()) > 1e-4
    assert float(jnp.abs(out0 - out1).max()) > 1e-4
    assert float(jnp.abs(out0 - run(0, sigma * 3)).max()) > 1e-4


def test_ignores_aug_and_mapping_cond():
  model = make()
  perturb(model)
  x, sigma = inputs()
  y = jnp.array([0, 1])
  np.testing.assert_array_equal(
      model(x, sigma, class_cond=y),
      model(x, sigma, jnp.ones((2, 9)), class_cond=y, mapping_cond=jnp.ones((2, 4))))


def test_block_is_identity_at_init():
  block = dit.DiTBlock(64, 4, 256, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 12, 64))
  c = jax.random.normal(jax.random.key(1), (2, 64))
  np.testing.assert_array_equal(block(x, c), x)
  # The zero gates are what make it so: f itself is not zero.
  h = dit.layer_norm(x)
  assert float(jnp.abs(block.attn(h)).max()) > 0 and float(jnp.abs(block.mlp(h)).max()) > 0


def test_param_count_dit_b4():
  spec = dit.dit_spec_from_config(dict(type="dit", variant="B/4", input_size=256,
                                       input_channels=3, num_classes=1000, learn_sigma=False))
  model = nnx.eval_shape(lambda: dit.DiT(spec, rngs=nnx.Rngs(0)))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  d, p, c, depth, n_cls, freq = 768, 4, 3, 12, 1000, 256
  hidden = 4 * d
  linear = lambda i, o: i * o + o
  patch = linear(p * p * c, d)
  t_emb = linear(freq, d) + linear(d, d)
  y_emb = (n_cls + 1) * d
  block = linear(d, 3 * d) + linear(d, d) + linear(d, hidden) + linear(hidden, d) + linear(d, 6 * d)
  final = linear(d, 2 * d) + linear(d, p * p * c)
  expected = patch + t_emb + y_emb + depth * block + final
  assert expected == 130_352_688
  assert count == expected


def _official_pos_embed(embed_dim, gh, gw):
  """MAE/DiT get_2d_sincos_pos_embed, generalised to a gh x gw grid, in float64."""
  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64)
    omega /= dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
  grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
  return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("dim,gh,gw", [(64, 4, 4), (64, 4, 6), (1152, 16, 16)])
def test_pos_embed_matches_official(dim, gh, gw):
  ours = dit.get_2d_sincos_pos_embed(dim, gh, gw)
  ref = _official_pos_embed(dim, gh, gw)
  assert ours.shape == ref.shape == (gh * gw, dim)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
  # Token (row 1, col 0) has the column half of token 0 and the row half of token (0, 1).
  np.testing.assert_array_equal(ours[gw, : dim // 2], ours[0, : dim // 2])


def test_pos_embed_is_added(monkeypatch):
  model = make()
  x, _ = inputs(h=16, w=24)
  tokens = model.x_embedder(x).reshape(2, 24, 64)
  pos = dit.get_2d_sincos_pos_embed(64, 4, 6)
  # With zero gates the blocks are identity, so the final layer sees patch embedding + position.
  captured = {}
  orig = dit.FinalLayer.__call__

  def spy(self, h, c):
    captured["h"] = h
    return orig(self, h, c)

  monkeypatch.setattr(dit.FinalLayer, "__call__", spy)
  model(x, jnp.ones((2,)), class_cond=jnp.array([0, 1]))
  np.testing.assert_allclose(captured["h"], tokens + pos, rtol=1e-6, atol=1e-6)


def test_patch_embed_equals_strided_conv():
  p, c, d = 4, 3, 64
  embed = dit.PatchEmbed(p, c, d, rngs=nnx.Rngs(0))
  embed.proj.bias[...] = jax.random.normal(jax.random.key(2), (d,))
  x = jax.random.normal(jax.random.key(1), (2, 16, 24, c))
  kernel = embed.proj.kernel[...].reshape(p, p, c, d)  # rows are ordered (dy, dx, c): HWIO
  with jax.default_matmul_precision("highest"):
    ref = jax.lax.conv_general_dilated(x, kernel, (p, p), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ref = ref + embed.proj.bias[...]
    np.testing.assert_allclose(embed(x), ref, rtol=1e-5, atol=1e-5)
  # Xavier-uniform bound of the flattened conv weight.
  bound = math.sqrt(6 / (p * p * c + d))
  assert float(jnp.abs(embed.proj.kernel[...]).max()) <= bound


def test_timestep_embedding_cos_first():
  t = jnp.array([0.0, 1.5])
  emb = dit.timestep_embedding(t, 8)
  freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
  args = np.asarray(t)[:, None] * freqs
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], 1), atol=1e-6)


def test_param_metadata():
  model = make()
  assert model.blocks[0].attn.qkv.kernel.out_sharding == ("embed", None, "heads", None)
  assert model.blocks[0].mlp.fc1.kernel.out_sharding == ("embed", "mlp")
  assert model.blocks[0].attn.qkv.kernel.tags == ("wd",)
  assert model.blocks[0].attn.qkv.bias.tags == ()
  assert model.y_embedder.embedding_table.tags == ()


def test_spec_from_config():
  spec = dit.dit_spec_from_config({"variant": "XL/2", "num_classes": 1000, "learn_sigma": True})
  assert (spec.depth, spec.width, spec.num_heads, spec.patch_size) == (28, 1152, 16, 2)
  assert spec.out_channels == 6
  spec = dit.dit_spec_from_config({"variant": "S/8", "depth": 3})
  assert (spec.depth, spec.width, spec.patch_size) == (3, 384, 8)
  spec = dit.dit_spec_from_config(TINY)
  assert spec.width == 64 and spec.num_classes == 0


@pytest.mark.parametrize("variant", ["B4", "Q/4", "B/3", "B/", "/4"])
def test_bad_variant(variant):
  with pytest.raises(ValueError, match="model.variant"):
    dit.dit_spec_from_config({"variant": variant})


def test_config_errors():
  with pytest.raises(ValueError, match="unknown model config keys.*widths"):
    dit.dit_spec_from_config({"variant": "B/4", "widths": [1]})
  with pytest.raises(ValueError, match="model.width 770 is not divisible by model.num_heads 12"):
    dit.dit_spec_from_config({"variant": "B/4", "width": 770})
  with pytest.raises(ValueError, match="model.input_size"):
    dit.dit_spec_from_config({"variant": "B/8", "input_size": 36})
  with pytest.raises(ValueError, match="patch_size"):
    dit.dit_spec_from_config({"depth": 2, "width": 64, "num_heads": 4})


def test_class_cond_errors():
  x, sigma = inputs()
  with pytest.raises(ValueError, match="class-conditional"):
    make()(x, sigma)
  with pytest.raises(ValueError, match="unconditional"):
    make(num_classes=0)(x, sigma, class_cond=jnp.array([0, 1]))
  out = make(num_classes=0)(x, sigma)
  assert out.shape == x.shape


def test_indivisible_image_size():
  x, sigma = inputs(h=18, w=16)
  with pytest.raises(ValueError, match="18x16"):
    make()(x, sigma, class_cond=jnp.array([0, 1]))


def test_build_model():
  from hdit_jax.models import build_model
  model = build_model({"type": "dit", **TINY, "num_classes": 5, "dtype": "bfloat16",
                       "remat": True}, rngs=nnx.Rngs(0))
  assert isinstance(model, dit.DiT) and model.remat
  x, sigma = inputs()
  assert model(x, sigma, class_cond=jnp.array([5, 0])).dtype == jnp.float32
