"""Classifier-free guidance: scale 1 is the conditional model, 0 the unconditional one."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hdit_jax.diffusion.guidance import guided_denoiser
from hdit_jax.diffusion.preconditioning import denoise
from hdit_jax.models import build_model

CFG = dict(input_size=(16, 16), patch_size=(2, 2), depths=(1, 1), widths=(32, 64),
           attention=("neighborhood", "global"), d_heads=(16, 16), kernel_sizes=(3, 3),
           mapping_width=32, mapping_depth=1, mapping_d_ff=64, num_classes=5)


def perturbed_model():
  model = build_model(CFG, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), 1000))
  state = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape), state)
  nnx.update(model, state)
  return model


def test_scales_and_interval():
  model = perturbed_model()
  forward = nnx.jit(lambda m, x, sigma, labels: denoise(m, x, sigma, 0.5, class_cond=labels))
  d = lambda x, sigma, class_cond: forward(model, x, sigma, class_cond)
  x = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
  sigma = jnp.array([0.5, 2.0, 8.0])
  labels = jnp.array([0, 3, 4])
  cond = d(x, sigma, labels)
  uncond = d(x, sigma, jnp.full_like(labels, 5))
  assert float(jnp.max(jnp.abs(cond - uncond))) > 1e-3
  np.testing.assert_allclose(guided_denoiser(d, labels, 5, 1.0)(x, sigma), cond, atol=1e-6)
  np.testing.assert_allclose(guided_denoiser(d, labels, 5, 0.0)(x, sigma), uncond, atol=1e-5)
  np.testing.assert_allclose(guided_denoiser(d, labels, 5, 2.5)(x, sigma),
                             uncond + 2.5 * (cond - uncond), atol=1e-5)
  inside = guided_denoiser(d, labels, 5, 2.5, interval=(1.0, 5.0))(x, sigma)
  np.testing.assert_allclose(inside[1], (uncond + 2.5 * (cond - uncond))[1], atol=1e-5)
  np.testing.assert_allclose(inside[0], cond[0], atol=1e-5)
  np.testing.assert_allclose(inside[2], cond[2], atol=1e-5)
