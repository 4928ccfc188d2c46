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


def gradient_and_jaxpr(cfg, remat):
  cfg = cfg.copy_and_resolve_references()
  cfg.remat = remat
  model = build_model(cfg, rngs=nnx.Rngs(0))
  model_def, params, buffers = split_model(model)   # as the train step merges it
  # Live zero-initialised paths, so that every layer's gradient is non-zero.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
                                        for p, k in zip(leaves, keys)])
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


def test_remat_hdit_runs_inside_an_inner_trace():
  """The sampler calls the model inside its lax.scan, the weights a constant of that trace:
  the rematerialised model gives the plain model's output there (nnx.remat's write-back of the
  weights failed)."""
  outputs = []
  for remat in (False, True):
    cfg = MODELS["hdit"].copy_and_resolve_references()
    cfg.remat = remat
    model = build_model(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 16, 24, 3))
    sigma, labels = jnp.array([0.3, 1.0, 5.0]), jnp.array([1, 4, 10])

    @jax.jit
    def run(x):
      step = lambda carry, _: (model(carry, sigma, class_cond=labels), None)
      return jax.lax.scan(step, x, None, length=2)[0]

    outputs.append(run(x))
  np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)
