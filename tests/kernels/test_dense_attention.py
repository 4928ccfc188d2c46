"""Dense attention: the Pallas TPU flash path (interpret mode) against the XLA path, dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_l2
from hdit_kernels import dense_attention


def qkv(shape, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys)


def f64_attention(q, k, v, scale):
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqnd,bknd->bnqk", q, k) * scale
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnqk,bknd->bqnd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("implementation", ["xla", "pallas_tpu"])
def test_matches_float64(implementation):
  q, k, v = qkv((2, 256, 2, 32))
  out = dense_attention.dot_product_attention(q, k, v, scale=1.0, implementation=implementation,
                                              interpret=True)
  assert rel_l2(out, f64_attention(q, k, v, 1.0)) <= 1e-5


def test_pallas_tpu_gradients_match_xla():
  q, k, v = qkv((1, 128, 2, 64))
  ct = jax.random.normal(jax.random.key(1), q.shape)

  def grads(implementation):
    return jax.grad(lambda *a: jnp.sum(dense_attention.dot_product_attention(
        *a, scale=1.0, implementation=implementation, interpret=True) * ct),
                    argnums=(0, 1, 2))(q, k, v)

  for g, r in zip(grads("pallas_tpu"), grads("xla")):
    assert rel_l2(g, r) <= 1e-5


def test_pallas_tpu_refuses_partial_blocks():
  q, k, v = qkv((1, 100, 1, 32))
  assert dense_attention.tpu_flash_unsupported(q, k) is not None
  with pytest.raises(NotImplementedError, match="multiple of 128"):
    dense_attention.dot_product_attention(q, k, v, implementation="pallas_tpu")


def test_default_falls_back_to_xla_on_tpu_for_partial_blocks(monkeypatch):
  q, k, v = qkv((1, 100, 1, 32))
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  out = dense_attention.dot_product_attention(q, k, v, scale=0.5)
  assert rel_l2(out, f64_attention(q, k, v, 0.5)) <= 1e-5
