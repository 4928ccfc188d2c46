"""benchmarks/fusion_floor.py: its shapes come from the config, its RoPE variant is RoPE, and
its table divides each operation by its own floor."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from hdit_jax.models import positions

ROOT = pathlib.Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("fusion_floor",
                                               ROOT / "benchmarks" / "fusion_floor.py")
fusion_floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fusion_floor)


def test_level_shapes_follow_the_config():
  assert fusion_floor.level_shape("imagenet256", 0) == (64, 64, 384, 6, 64, 1152)
  assert fusion_floor.level_shape("imagenet256", 2) == (16, 16, 1536, 24, 64, 4608)
  assert fusion_floor.level_shape("ffhq1024", 1) == (128, 128, 256, 4, 64, 768)


def test_rope_without_concatenate_is_rope():
  key_x, key_p = jax.random.split(jax.random.key(3))
  d_head, heads = 64, 3
  x = jax.random.normal(key_x, (2, 5, 7, heads, d_head), jnp.float32)
  pos = jax.random.uniform(key_p, (5, 7, 2), minval=-1, maxval=1)
  theta = positions.rope_angles(pos, positions.rope_freqs(d_head, heads))
  np.testing.assert_allclose(fusion_floor.rope_without_concatenate(x, theta),
                             positions.apply_rope(x, theta), rtol=1e-6, atol=1e-6)


def test_each_operation_is_divided_by_its_own_floor():
  row = lambda op, ms: {"op": op, "forward_ms": ms, "forward_backward_ms": 2 * ms,
                        "forward_bytes": 10 ** 9, "forward_tb_s": 1 / ms}
  result = {"device": "d", "jax": "x", "config": "c", "level": 0, "batch": 1,
            "shape": dict(h=1, w=1, width=1, heads=1, d_head=1, d_ff=1),
            "rows": [row("a", 3.0), row("a2", 4.5), row("floor: a", 1.5), row("b", 2.0),
                     row("floor: b", 0.5), row("elementwise x + 1", 1.0)]}
  lines = {l.split(" | ")[0][2:]: l.split(" | ") for l in
           fusion_floor.markdown(result).splitlines() if l.startswith("| ") and
           not l.startswith("| operation")}
  assert lines["a"][2] == "2.00" and lines["a2"][2] == "3.00" and lines["b"][2] == "4.00"
  assert lines["floor: a"][2] == "" and lines["elementwise x + 1"][2] == ""


def test_the_one_kernel_row_computes_cos_sim_with_rope():
  """The kernel row (Mosaic GPU, here interpreted) computes what the `cos-sim + RoPE` row does."""
  rows = {name: (fn, x) for name, fn, x, _, _ in
          fusion_floor.cases(2, 8, 8, 128, 2, 64, 384, big_elements=16, qk_kernel="interpret")}
  kernel, qkv = rows["cos-sim + RoPE, one kernel"]
  xla, _ = rows["cos-sim + RoPE"]
  for got, want in zip(kernel(qkv), xla(qkv)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2)
  assert "cos-sim + RoPE, one kernel" not in [
      c[0] for c in fusion_floor.cases(2, 8, 8, 128, 2, 64, 384, big_elements=16)]


def test_a_wrong_kernel_is_reported_not_timed(monkeypatch):
  real = fusion_floor.qk_norm_rope.qk_norm_rope

  def rotated_the_wrong_way(qkv, gain, cos, sin, **kw):
    return real(qkv, gain, cos, -sin, **kw)

  monkeypatch.setattr(fusion_floor.qk_norm_rope, "qk_norm_rope", rotated_the_wrong_way)
  result = fusion_floor.measure("quick", 0, 1, 1, shape=(8, 8, 128, 2, 64, 384),
                                big_elements=16, qk_kernel="interpret")
  rows = {r["op"]: r for r in result["rows"]}
  assert "relative error" in rows["cos-sim + RoPE, one kernel"]["error"]
  assert rows["GEGLU"]["forward_ms"] > 0   # the others are still timed
  assert "failed: ValueError" in fusion_floor.markdown(result)
