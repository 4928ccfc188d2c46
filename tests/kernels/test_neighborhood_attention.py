"""Neighborhood attention: NATTEN parity, a brute-force float64 reference, gradients, errors.

Every implementation that runs on CPU runs here, the Pallas kernels in interpret mode; Mosaic GPU
kernels have no interpret mode (test_na_mosaic_gpu.py and test_na_lowering.py cover them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_l2
from hdit_kernels import neighborhood_attention as na

PALLAS = ("pallas_tpu", "pallas_gpu")
IMPLEMENTATIONS = ("xla",) + PALLAS


def run_na(q, k, v, kernel_size, dilation=1, *, scale=None, implementation):
  """na.na2d with the Pallas kernels in interpret mode."""
  return na.na2d(q, k, v, kernel_size, dilation, scale=scale, implementation=implementation,
                 interpret=implementation in PALLAS)


def brute_force_na(q, k, v, kernel_size, dilation, scale):
  """Float64 loops straight from NATTEN's definition (independent of the library code)."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  b, h, w, n, d = q.shape

  def axis_window(i, length):
    group, sub = i % dilation, i // dilation
    group_len = len(range(group, length, dilation))
    start = min(max(sub - kernel_size // 2, 0), group_len - kernel_size)
    return [(start + a) * dilation + group for a in range(kernel_size)]

  out = np.zeros_like(q)
  for i in range(h):
    rows = axis_window(i, h)
    for j in range(w):
      cols = axis_window(j, w)
      keys = k[:, rows][:, :, cols].reshape(b, -1, n, d)
      vals = v[:, rows][:, :, cols].reshape(b, -1, n, d)
      logits = np.einsum("bnd,bknd->bnk", q[:, i, j], keys) * scale
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[:, i, j] = np.einsum("bnk,bknd->bnd", p, vals)
  return out


def random_qkv(key, shape, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  return tuple(jax.random.normal(kk_, shape, jnp.float32).astype(dtype) for kk_ in (kq, kk, kv))


@pytest.mark.parity
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_natten_fixture_cases(kdiff, implementation):
  meta = kdiff.json("na_cases.json")
  tensors = kdiff.tensors("na_cases.safetensors")
  assert meta["cases"]
  for name, case in meta["cases"].items():
    # Fixture layout is (batch, heads, H, W, head_dim); the op's is (batch, H, W, heads, head_dim).
    q, k, v, ref = (np.transpose(tensors[f"{name}.{t}"], (0, 2, 3, 1, 4))
                    for t in ("q", "k", "v", "out"))
    np.testing.assert_array_equal(
        na.window_starts(case["H"], case["kernel_size"], case["dilation"]),
        tensors[f"{name}.win_start_h"], err_msg=name)
    np.testing.assert_array_equal(
        na.window_starts(case["W"], case["kernel_size"], case["dilation"]),
        tensors[f"{name}.win_start_w"], err_msg=name)
    out = run_na(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), case["kernel_size"],
                 case["dilation"], scale=case["scale"], implementation=implementation)
    assert rel_l2(out, ref) <= 1e-6, name
    assert float(np.max(np.abs(np.asarray(out) - ref))) <= 2e-6, name


CASES = [
    # (batch, H, W, heads, head_dim, kernel, dilation)
    (1, 9, 9, 1, 8, 3, 1),
    (3, 12, 17, 2, 16, 7, 1),      # odd batch, non-square, border windows
    (2, 7, 7, 2, 8, 7, 1),         # kernel = map size: full attention
    (1, 7, 11, 1, 8, 7, 1),        # kernel = one side
    (2, 13, 10, 3, 8, 5, 2),       # dilation, groups of unequal length
    (1, 16, 16, 2, 32, 3, 4),
    (1, 10, 8, 2, 8, 4, 1),        # even kernel
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("b, h, w, n, d, ks, dil", CASES)
def test_matches_float64_brute_force(implementation, b, h, w, n, d, ks, dil):
  q, k, v = random_qkv(jax.random.key(h * 100 + w), (b, h, w, n, d))
  scale = 0.7
  out = run_na(q, k, v, ks, dil, scale=scale, implementation=implementation)
  assert out.dtype == jnp.float32 and out.shape == q.shape
  assert rel_l2(out, brute_force_na(q, k, v, ks, dil, scale)) <= 1e-6


def test_kernel_equal_to_map_is_dense_attention():
  q, k, v = random_qkv(jax.random.key(1), (2, 7, 7, 2, 8))
  out = na.na2d(q, k, v, 7, scale=1.0)
  flat = lambda t: np.asarray(t, np.float64).reshape(2, 49, 2, 8)
  logits = np.einsum("bqnd,bknd->bnqk", flat(q), flat(k))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  dense = np.einsum("bnqk,bknd->bqnd", probs / probs.sum(-1, keepdims=True), flat(v))
  assert rel_l2(out.reshape(2, 49, 2, 8), dense) <= 1e-6


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16(implementation):
  q, k, v = random_qkv(jax.random.key(2), (3, 14, 10, 2, 16), jnp.bfloat16)
  out = run_na(q, k, v, 7, scale=0.25, implementation=implementation)
  assert out.dtype == jnp.bfloat16
  ref = brute_force_na(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                       7, 1, 0.25)
  assert rel_l2(out.astype(jnp.float32), ref) <= 1e-2


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("b, h, w, n, d, ks, dil", [CASES[1], CASES[4], CASES[2]])
def test_gradients_match_float64_autodiff(implementation, b, h, w, n, d, ks, dil):
  q, k, v = random_qkv(jax.random.key(3), (b, h, w, n, d))
  cotangent = jax.random.normal(jax.random.key(4), q.shape)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * cotangent.astype(q.dtype))

  got = jax.grad(lambda *a: loss(lambda q, k, v: run_na(
      q, k, v, ks, dil, scale=0.5, implementation=implementation), *a), argnums=(0, 1, 2))(q, k, v)
  with jax.enable_x64(True):   # the float64 reference, without changing other tests' dtypes
    f64 = tuple(jnp.asarray(np.asarray(t), jnp.float64) for t in (q, k, v))
    want = jax.grad(lambda *a: loss(lambda q, k, v: na.na2d_reference(
        q, k, v, ks, dil, scale=0.5), *a), argnums=(0, 1, 2))(*f64)
    want = tuple(np.asarray(w) for w in want)
  for name, g, r in zip("qkv", got, want):
    assert g.dtype == jnp.float32
    assert rel_l2(g, r) <= 1e-5, name


@pytest.mark.parametrize("shape, ks, dil, message", [
    ((1, 6, 9, 1, 8), 7, 1, "height"),
    ((1, 9, 6, 1, 8), 7, 1, "width"),
    ((1, 9, 9, 1, 8), 5, 2, "height"),
])
def test_kernel_larger_than_map_is_refused(shape, ks, dil, message):
  q, k, v = random_qkv(jax.random.key(0), shape)
  with pytest.raises(ValueError, match=message):
    na.na2d(q, k, v, ks, dil)


def test_unknown_implementation_is_refused():
  q, k, v = random_qkv(jax.random.key(0), (1, 8, 8, 1, 8))
  with pytest.raises(ValueError, match="implementation"):
    na.na2d(q, k, v, 3, implementation="cuda")


def random_case(seed: int):
  """A random valid case: odd batches, non-square maps, kernels up to the map, dilations."""
  rng = np.random.default_rng(seed)
  dil = int(rng.choice([1, 1, 2, 3]))
  ks = int(rng.integers(2, 8))
  h, w = (int(rng.integers(ks * dil, ks * dil + 12)) for _ in range(2))
  return (int(rng.integers(1, 4)), h, w, int(rng.integers(1, 4)), int(rng.choice([8, 16, 32])),
          ks, dil)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_shapes(implementation, seed):
  b, h, w, n, d, ks, dil = random_case(seed)
  q, k, v = random_qkv(jax.random.key(seed), (b, h, w, n, d))
  out = run_na(q, k, v, ks, dil, scale=0.6, implementation=implementation)
  assert rel_l2(out, brute_force_na(q, k, v, ks, dil, 0.6)) <= 1e-6, (b, h, w, n, d, ks, dil)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("seed", range(2, 10))
def test_random_shapes_more(implementation, seed):
  test_random_shapes(implementation, seed)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_gradients(implementation):
  q, k, v = random_qkv(jax.random.key(5), (1, 11, 16, 2, 16), jnp.bfloat16)
  ct = jax.random.normal(jax.random.key(6), q.shape, jnp.float32)

  def grads(fn, *args):
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * ct),
                    argnums=(0, 1, 2))(*args)

  got = grads(lambda q, k, v: run_na(q, k, v, 5, scale=1.0, implementation=implementation),
              q, k, v)
  want = grads(lambda q, k, v: na.na2d_reference(q, k, v, 5, 1, 1.0),
               *(t.astype(jnp.float32) for t in (q, k, v)))
  for name, g, r in zip("qkv", got, want):
    assert g.dtype == jnp.bfloat16
    assert rel_l2(g.astype(jnp.float32), r) <= 2e-2, name


def test_model_call_path_jit_grad_bf16():
  """What HDiT does: implementation None, scale 1.0, under jit and grad, in bf16."""
  q, k, v = random_qkv(jax.random.key(7), (2, 16, 16, 2, 64), jnp.bfloat16)
  loss = jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(na.na2d(q, k, v, 7, scale=1.0).astype(jnp.float32) ** 2),
      argnums=(0, 1, 2)))
  value, grads = loss(q, k, v)
  assert np.isfinite(float(value)) and all(g.dtype == jnp.bfloat16 for g in grads)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


def test_default_implementation_per_backend():
  assert na.default_implementation("tpu") == "pallas_tpu"
  assert na.default_implementation("gpu") == "pallas_gpu"
  assert na.default_implementation("cpu") == "xla"


@pytest.mark.parametrize("implementation", PALLAS)
def test_named_kernel_off_its_platform_fails_loudly(implementation):
  q, k, v = random_qkv(jax.random.key(0), (1, 8, 8, 1, 8))
  with pytest.raises(ValueError, match="interpret"):   # Pallas: interpret mode only on CPU
    na.na2d(q, k, v, 3, implementation=implementation)


def test_mosaic_gpu_off_its_platform_fails_loudly():
  q, k, v = random_qkv(jax.random.key(0), (1, 16, 16, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="interpret"):
    na.na2d(q, k, v, 3, implementation="mosaic_gpu")
  with pytest.raises(NotImplementedError, match="interpret"):
    na.na2d(q, k, v, 3, implementation="mosaic_gpu", interpret=True)


def test_unsupported_case_raises_when_named_and_falls_back_when_not(monkeypatch):
  q, k, v = random_qkv(jax.random.key(0), (1, 8, 8, 1, 8))
  bad = na.pallas_gpu.Config(block_w=6)   # Triton needs powers of two
  with pytest.raises(NotImplementedError, match="power-of-two"):
    na.na2d(q, k, v, 3, implementation="pallas_gpu", config=bad, interpret=True)
  # With implementation None on a 'gpu' backend, an unsupported case must run the XLA path.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(na.pallas_gpu, "unsupported", lambda *a: "pretend")
  out = na.na2d(q, k, v, 3, scale=0.5)
  assert rel_l2(out, brute_force_na(q, k, v, 3, 1, 0.5)) <= 1e-6


def test_wrong_config_type_is_refused():
  q, k, v = random_qkv(jax.random.key(0), (1, 8, 8, 1, 8))
  with pytest.raises(TypeError, match="Config"):
    na.na2d(q, k, v, 3, implementation="pallas_tpu", config=na.pallas_gpu.Config(),
            interpret=True)


@pytest.mark.parametrize("b, h, w, n, d, ks, dil", [CASES[1], CASES[4], CASES[6]])
@pytest.mark.parametrize("config", [dict(forward="offsets"), dict(block_h=4, block_w=8)])
def test_xla_other_forwards(b, h, w, n, d, ks, dil, config):
  """The XLA path's exact-work forward, and the halo forward with tiles other than its own."""
  q, k, v = random_qkv(jax.random.key(h * 100 + w), (b, h, w, n, d))
  out = na.na2d(q, k, v, ks, dil, scale=0.7, implementation="xla",
                config=na.xla.Config(**config))
  assert rel_l2(out, brute_force_na(q, k, v, ks, dil, 0.7)) <= 1e-6


@pytest.mark.parametrize("length, kernel_size, tile", [
    (14, 7, 7), (16, 7, 8), (28, 7, 7), (64, 7, 8), (7, 7, 7), (3, 3, 3), (100, 3, 4)])
def test_xla_auto_tile(length, kernel_size, tile):
  """Tiles that waste no padding and keep halos short (14 = 2 x 7, not 2 x 8 with padding)."""
  assert na.xla.auto_tile(length, kernel_size) == tile
