"""Rematerialisation: the jitted gradient is unchanged, and the backward pass really recomputes
(a `remat` flag that did nothing would pass an output comparison)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hdit_jax.config import dit_model, hdit_model
from hdit_jax.models import build_model
from hdit_jax.training.state import split_model

MODELS = {
    "hdit": hdit_model(input_size=(16, 24), input_channels=3, patch_size=(2, 2), depths=(1, 1),
                       widths=(16, 32), d_heads=(8, 8), kernel_sizes=(3, 3), mapping_width=16,
                       mapping_depth=1, mapping_d_ff=32, num_classes=10, dtype="float32"),
    "dit": dit_model(input_size=(16, 24), input_channels=3, patch_size=4, depth=2,
                     width=32, num_heads=2, num_classes=10, dtype="float32"),
}


def perturbed(params):
  """Live zero-initialised paths, so that every layer's gradient (and its dropout) shows."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
                                      for p, k in zip(leaves, keys)])


def dropout_hdit(remat):
  """The tiny HDiT with dropout in every layer, split as the train step merges it."""
  cfg = MODELS["hdit"].copy_and_resolve_references()
  cfg.update(remat=remat, dropout_rate=(0.2, 0.2))
  model_def, params, buffers = split_model(build_model(cfg, rngs=nnx.Rngs(0)))
  return model_def, perturbed(params), buffers


def gradient_and_jaxpr(cfg, remat):
  cfg = cfg.copy_and_resolve_references()
  cfg.remat = remat
  model = build_model(cfg, rngs=nnx.Rngs(0))
  model_def, params, buffers = split_model(model)   # as the train step merges it
  params = perturbed(params)
  x = jax.random.normal(jax.random.key(2), (3, 16, 24, 3))   # odd batch, non-square
  sigma = jnp.array([0.1, 1.0, 10.0])
  labels = jnp.array([0, 4, 9])

  def loss(p, b):
    out = model_def.merge(p, b)(x, sigma, class_cond=labels)
    return jnp.mean((out - x) ** 2)

  grad = jax.grad(loss)
  return jax.jit(grad)(params, buffers), str(jax.make_jaxpr(grad)(params, buffers))


@pytest.mark.parametrize("kind", list(MODELS))
def test_remat_keeps_the_gradient_and_recomputes(kind):
  with jax.default_matmul_precision("highest"):
    plain, plain_jaxpr = gradient_and_jaxpr(MODELS[kind], False)
    remat, remat_jaxpr = gradient_and_jaxpr(MODELS[kind], True)
  assert "checkpoint" not in plain_jaxpr and "remat" not in plain_jaxpr
  assert "checkpoint" in remat_jaxpr or "remat" in remat_jaxpr
  norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(plain)]
  assert min(norms) > 0
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def scanned(model, x, sigma, labels):
  """Two model calls inside a jitted lax.scan, the model a constant of it (as the sampler's)."""
  @jax.jit
  def run(x):
    step = lambda carry, _: (model(carry, sigma, class_cond=labels), None)
    return jax.lax.scan(step, x, None, length=2)[0]
  return run(x)


@pytest.mark.parametrize("kind", list(MODELS))
def test_remat_runs_inside_an_inner_trace(kind):
  """The sampler calls the model inside its lax.scan, the weights a constant of that trace:
  the rematerialised model gives the plain model's output there (nnx.remat's write-back of the
  weights failed)."""
  outputs = []
  for remat in (False, True):
    cfg = MODELS[kind].copy_and_resolve_references()
    cfg.remat = remat
    model = build_model(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 16, 24, 3))
    sigma, labels = jnp.array([0.3, 1.0, 5.0]), jnp.array([1, 4, 10])

    outputs.append(scanned(model, x, sigma, labels))
  np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)


def test_remat_hdit_with_dropout_samples_inside_an_inner_trace():
  """The sampler's deterministic view of a model with dropout, a constant of its lax.scan: no
  key is drawn, so nothing is written back (a write-back failed there), and the output is the
  plain model's."""
  x = jax.random.normal(jax.random.key(1), (3, 16, 24, 3))
  sigma, labels = jnp.array([0.3, 1.0, 5.0]), jnp.array([1, 4, 10])
  outputs = []
  for remat in (False, True):
    model_def, params, buffers = dropout_hdit(remat)
    model = model_def.merge(params, buffers, deterministic=True)

    outputs.append(scanned(model, x, sigma, labels))
  np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)


def test_remat_hdit_with_dropout_keeps_the_masks_and_the_gradient():
  """In training, the rematerialised layers draw the plain layers' dropout masks and advance
  the RNG counts alike: two successive calls give the same loss, gradient and counts."""
  x = jax.random.normal(jax.random.key(2), (3, 16, 24, 3))
  sigma, labels = jnp.array([0.1, 1.0, 10.0]), jnp.array([0, 4, 9])

  def run(remat, seed):
    model_def, params, buffers = dropout_hdit(remat)

    def loss(p):
      model = model_def.merge(p, buffers, jax.random.key(seed))
      first = model(x, sigma, class_cond=labels)
      second = model(x, sigma, class_cond=labels)   # the next keys of every stream
      counts = [c[...] for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))]
      return jnp.mean((first - x) ** 2) + jnp.mean((second - x) ** 2), (first, second, counts)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  with jax.default_matmul_precision("highest"):
    (plain_loss, (first, second, plain_counts)), plain_grad = run(False, 3)
    (remat_loss, (_, _, remat_counts)), remat_grad = run(True, 3)
    (other_loss, _), _ = run(False, 4)
  assert not np.allclose(first, second) and not np.isclose(plain_loss, other_loss)   # it drops
  # Two dropouts in each of the three layers, each drawn once per call.
  assert len(plain_counts) == 6 and all(int(c) == 2 for c in plain_counts)
  np.testing.assert_array_equal(remat_counts, plain_counts)
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(plain_grad), jax.tree.leaves(remat_grad)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
