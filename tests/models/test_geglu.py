"""GEGLU's hand-written gradient against float64 autodiff of value * gate * Phi(gate)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

from hdit_jax.models import layers


def _reference(x):
  value, gate = x[..., 0, :], x[..., 1, :]
  return value * gate * 0.5 * (1.0 + erf(gate / math.sqrt(2.0)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_geglu_and_its_gradient_match_float64_autodiff(dtype):
  kx, kg = jax.random.split(jax.random.key(3))
  x = (3.0 * jax.random.normal(kx, (3, 5, 2, 48))).astype(dtype)   # odd batch, gates far in tails
  grad = jax.random.normal(kg, (3, 5, 48)).astype(dtype)
  out, vjp = jax.vjp(layers.geglu, x)
  (grad_x,) = vjp(grad)
  with jax.enable_x64(True):
    ref_out, ref_vjp = jax.vjp(_reference, jnp.asarray(np.asarray(x, np.float64)))
    (ref_grad,) = ref_vjp(jnp.asarray(np.asarray(grad, np.float64)))
    ref_out, ref_grad = np.asarray(ref_out), np.asarray(ref_grad)
  assert out.dtype == grad_x.dtype == dtype and grad_x.shape == x.shape
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, **tol)
  np.testing.assert_allclose(np.asarray(grad_x, np.float64), ref_grad, **tol)
  # The value's gradient is the gate's GELU; the gate's is value * GELU'(gate): both are checked.
  assert np.abs(ref_grad[..., 0, :]).max() > 1 and np.abs(ref_grad[..., 1, :]).max() > 1
