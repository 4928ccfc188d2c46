"""Axial RoPE's rotation and its hand-written gradient, against a float64 complex-number reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdit_jax.models import positions


def _reference(x, theta):
  """Channels (c, c + R) for c < R as the complex number x_c + i x_{c+R}, times exp(i theta)."""
  rot = theta.shape[-1]
  z = (x[..., :rot] + 1j * x[..., rot:2 * rot]) * jnp.exp(1j * theta)
  return jnp.concatenate([z.real, z.imag, x[..., 2 * rot:]], axis=-1)


@pytest.mark.parametrize("theta_shape", [(3, 5, 4, 8), (3, 1, 4, 8), (4, 8)],
                         ids=["per-position", "broadcast-column", "heads-only"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_and_its_gradients_match_the_complex_rotation(theta_shape, dtype):
  kx, kt, kg = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(kx, (2, 3, 5, 4, 32)).astype(dtype)   # d_head 32 = 2 * 8 rotated + 16 kept
  theta = jax.random.uniform(kt, theta_shape, minval=-4.0, maxval=4.0)
  grad = jax.random.normal(kg, x.shape).astype(dtype)

  out, vjp = jax.vjp(positions.apply_rope, x, theta)
  grad_x, grad_theta = vjp(grad)
  with jax.enable_x64(True):
    as64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
    ref_out, ref_vjp = jax.vjp(_reference, as64(x), as64(theta))
    ref_grad_x, ref_grad_theta = ref_vjp(as64(grad))
    ref_out, ref_grad_x, ref_grad_theta = map(np.asarray, (ref_out, ref_grad_x, ref_grad_theta))

  assert out.dtype == grad_x.dtype == dtype and grad_theta.shape == theta_shape
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, **tol)
  np.testing.assert_allclose(np.asarray(grad_x, np.float64), ref_grad_x, **tol)
  # theta's gradient sums over the broadcast axes: float32 accumulation of up to 30 terms.
  np.testing.assert_allclose(np.asarray(grad_theta, np.float64), ref_grad_theta,
                             rtol=1e-4, atol=1e-3 if dtype == jnp.float32 else 2e-2 * 30)
  # The untouched channels carry the gradient through unchanged.
  np.testing.assert_array_equal(np.asarray(grad_x[..., 16:]), np.asarray(grad[..., 16:]))


def test_rope_gradient_under_jit_and_second_order():
  """The custom gradient composes with jit and with reverse-over-reverse (a gradient penalty)."""
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 2, 16))
  theta = jax.random.normal(jax.random.key(2), (4, 4, 2, 4))
  loss = lambda x_: jnp.sum(jnp.sin(positions.apply_rope(x_, theta)))
  ref = lambda x_: jnp.sum(jnp.sin(positions._rotate(x_, theta)))  # autodiff of the formula
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), jax.grad(ref)(x), rtol=1e-5, atol=1e-6)
  penalty = lambda f: jax.grad(lambda x_: jnp.sum(jnp.square(jax.grad(f)(x_))))(x)
  np.testing.assert_allclose(penalty(loss), penalty(ref), rtol=1e-4, atol=1e-5)
