"""The one-pass q/k normalisation + RoPE kernels (hdit_kernels.qk_norm_rope).

The Mosaic GPU kernels run here in Pallas's GPU interpreter (TMA copies, barriers and SMEM
simulated on the CPU; register layouts are not), against the jnp reference, which is checked
against the model's own two-step computation (scale_for_cosine_sim, then apply_rope) in
float32. Their CUDA lowering is checked at HDiT's shapes; speed and the real device are for
benchmarks/fusion_floor.py on a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_l2
from hdit_jax.config import hdit_model
from hdit_jax.models import attention, build_model, positions
from hdit_kernels import qk_norm_rope as qn

F32 = jnp.float32


def inputs(batch, height, width, heads, d, dtype=jnp.bfloat16, seed=0):
  """qkv with rows of different norms, gains sqrt(scale) and the model's own angles."""
  ks = jax.random.split(jax.random.key(seed), 3)
  qkv = jax.random.normal(ks[0], (batch, height, width, 3, heads, d), F32)
  qkv = qkv * jnp.exp(jax.random.normal(ks[1], qkv.shape[:-1] + (1,)))
  gain = jnp.sqrt(jnp.linspace(4.0, 12.0, heads))
  theta = positions.rope_angles(positions.make_axial_pos(height, width),
                                positions.rope_freqs(d, heads))
  return qkv.astype(dtype), gain, jnp.cos(theta), jnp.sin(theta)


interpreted = functools.partial(qn.qk_norm_rope, implementation="mosaic_gpu", interpret=True)


def test_reference_is_the_models_two_step_computation():
  """Float32: the reference equals scale_for_cosine_sim followed by apply_rope."""
  qkv, gain, cos, sin = inputs(2, 8, 12, 3, 64, F32)
  theta = jnp.arctan2(sin, cos)
  q, k = attention.scale_for_cosine_sim(qkv[:, :, :, 0], qkv[:, :, :, 1], gain ** 2)
  expected = positions.apply_rope(q, theta), positions.apply_rope(k, theta), qkv[:, :, :, 2]
  for got, want in zip(qn.qk_norm_rope(qkv, gain, cos, sin), expected):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


# (batch, height, width, heads, d): odd batch, non-square maps, HDiT's d 64, and d 128.
SHAPES = [(3, 8, 8, 2, 64), (1, 8, 24, 3, 64), (2, 16, 4, 1, 128)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_the_reference(shape, dtype):
  qkv, gain, cos, sin = inputs(*shape, dtype)
  got = interpreted(qkv, gain, cos, sin)
  want = qn.reference(qkv, gain, cos, sin)
  for g, w in zip(got, want):
    assert g.dtype == dtype and g.shape == shape
    # Both round float32 once; the kernel's sums run in another order.
    np.testing.assert_allclose(g.astype(F32), w.astype(F32), rtol=1e-2, atol=1e-2)
    assert rel_l2(g, w) < 1e-3
  np.testing.assert_array_equal(got[2], qkv[:, :, :, 2])   # v is copied


def cotangents(shape, seed=5):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, shape, F32).astype(jnp.bfloat16) for k in keys]


def gradients(fn, qkv, gain, cos, sin, cts):
  def loss(qkv, gain):
    outs = fn(qkv, gain, cos, sin)
    return sum(jnp.sum(o.astype(F32) * c.astype(F32)) for o, c in zip(outs, cts))
  return jax.grad(loss, argnums=(0, 1))(qkv, gain)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_backward_matches_float32_autodiff(shape):
  qkv, gain, cos, sin = inputs(*shape)
  cts = cotangents(shape)
  dqkv, dgain = gradients(interpreted, qkv, gain, cos, sin, cts)
  want_dqkv, want_dgain = gradients(qn.reference, qkv.astype(F32), gain, cos, sin, cts)
  assert dqkv.dtype == jnp.bfloat16 and dgain.dtype == gain.dtype
  assert rel_l2(dqkv, want_dqkv) < 5e-3
  np.testing.assert_array_equal(dqkv[:, :, :, 2], cts[2])   # v's gradient passes through
  np.testing.assert_allclose(dgain, want_dgain, rtol=2e-3)
  assert float(jnp.abs(want_dgain).min()) > 1e-2   # a gain gradient of zero would not pass


def test_angle_gradient_is_the_references():
  qkv, gain, cos, sin = inputs(1, 8, 8, 2, 64)
  cts = cotangents((1, 8, 8, 2, 64))

  def angle_grads(fn):
    def loss(c, s):
      outs = fn(qkv, gain, c, s)
      return sum(jnp.sum(o.astype(F32) * t.astype(F32)) for o, t in zip(outs, cts))
    return jax.grad(loss, argnums=(0, 1))(cos, sin)

  for got, want in zip(angle_grads(interpreted), angle_grads(qn.reference)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, dtype, words", [
    ((1, 8, 8, 3, 2, 64), F32, "dtype float32"),
    ((1, 8, 8, 3, 2, 32), jnp.bfloat16, "head dim 32"),
    ((1, 4, 4, 3, 2, 64), jnp.bfloat16, "4 x 4 tokens"),
])
def test_unsupported_cases_say_why(shape, dtype, words):
  reason = qn.unsupported(shape, dtype)
  assert reason is not None and words in reason
  b, h, w, _, n, d = shape
  qkv, gain = jnp.zeros(shape, dtype), jnp.ones((n,))
  angles = jnp.zeros((h, w, n, d // 4))
  with pytest.raises(NotImplementedError, match=words):
    interpreted(qkv, gain, angles, angles)
  assert qn.unsupported((1, 64, 64, 3, 6, 64), jnp.bfloat16) is None


def test_bad_arguments_are_errors():
  qkv, gain, cos, sin = inputs(1, 8, 8, 2, 64)
  with pytest.raises(ValueError, match="unknown implementation"):
    qn.qk_norm_rope(qkv, gain, cos, sin, implementation="triton")
  with pytest.raises(ValueError, match="gain must be"):
    qn.qk_norm_rope(qkv, gain[:1], cos, sin)
  with pytest.raises(ValueError, match="cos and sin must be"):
    qn.qk_norm_rope(qkv, gain, cos[:4], sin)
  with pytest.raises(ValueError, match="qkv must be"):
    qn.qk_norm_rope(qkv[:, :, :, :2], gain, cos, sin)


# (batch, height, width, heads) of HDiT's attention levels (d 64): ImageNet-256 0-2, FFHQ 0.
LOWERING_SHAPES = [(1, 64, 64, 6), (1, 32, 32, 12), (1, 16, 16, 24), (1, 256, 256, 2)]


@pytest.mark.gpu_lowering
@pytest.mark.parametrize("shape", LOWERING_SHAPES)
def test_kernels_lower_for_cuda(shape):
  b, h, w, n = shape
  spec = jax.ShapeDtypeStruct
  angles = spec((h, w, n, 16), F32)

  def fwd_bwd(qkv, gain, cos, sin, cts):
    outs, vjp = jax.vjp(
        lambda a, g: qn.qk_norm_rope(a, g, cos, sin, implementation="mosaic_gpu"), qkv, gain)
    return outs, vjp(cts)

  exported = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"])(
      spec((b, h, w, 3, n, 64), jnp.bfloat16), spec((n,), F32), angles, angles,
      tuple(spec((b, h, w, n, 64), jnp.bfloat16) for _ in range(3)))
  assert exported.mlir_module().count("@mosaic_gpu_v2(") == 2   # forward, backward


def tiny_model(qk_implementation):
  """Two attention levels: 8 x 8 tokens (neighborhood, kernel) and 4 x 4 (global, too few
  tokens for the kernel: jnp)."""
  cfg = hdit_model(input_size=(16, 16), input_channels=3, patch_size=(2, 2), depths=(1, 1),
                   widths=(64, 128), d_heads=(64, 64), kernel_sizes=(3, 3), mapping_width=16,
                   mapping_depth=1, mapping_d_ff=32, num_classes=0, dtype="bfloat16",
                   qk_implementation=qk_implementation)
  model = build_model(cfg, rngs=nnx.Rngs(0))
  # Live zero-initialised output projections, so that every path carries a gradient.
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]))
  return model


def test_model_with_the_kernel_matches_the_jnp_model(monkeypatch):
  monkeypatch.setattr(qn, "qk_norm_rope", functools.partial(qn.qk_norm_rope, interpret=True))
  x = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
  sigma = jnp.array([0.1, 1.0, 10.0])
  results = []
  for impl in ("xla", "mosaic_gpu"):
    model = tiny_model(impl)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
      out = nnx.merge(graphdef, p, rest)(x, sigma)
      return jnp.mean((out - x) ** 2), out

    (value, out), grad = jax.value_and_grad(loss, has_aux=True)(params)
    jaxpr = str(jax.make_jaxpr(loss)(params))
    results.append((value, out, grad, jaxpr))
  (v0, o0, g0, j0), (v1, o1, g1, j1) = results
  calls = lambda jaxpr: jaxpr.count("kernel_name='qk_norm_rope_fwd_mgpu'")
  assert calls(j0) == 0 and calls(j1) == 2   # level 0's two layers; level 1 (4 x 4) is jnp
  assert rel_l2(o1, o0) < 2e-2
  np.testing.assert_allclose(v1, v0, rtol=2e-2)
  flat0 = jax.tree_util.tree_leaves_with_path(g0)
  scales = [float(jnp.abs(g).max()) for path, g in flat0 if "scale" in jax.tree_util.keystr(path)
            and "self_attn" in jax.tree_util.keystr(path)]
  assert len(scales) == 3 and min(scales) > 0   # two layers at level 0, one at level 1
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert rel_l2(b, a) < 5e-2


@pytest.mark.parametrize("platform, capability, expected", [
    ("gpu", "9.0", "mosaic_gpu"), ("gpu", "8.0", "xla"), ("gpu", "10.0", "xla"),
    ("tpu", None, "xla"), ("cpu", None, "xla")])
def test_the_kernel_is_the_default_on_hopper_alone(platform, capability, expected):
  device = type("Device", (), {"platform": platform, "compute_capability": capability})()
  assert qn.default_implementation(device) == expected
  assert qn.default_implementation() == "xla"   # this CPU
