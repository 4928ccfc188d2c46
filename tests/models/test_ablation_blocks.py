"""The non-default blocks (shifted-window attention, the paper's ablation baselines) against
formulas written independently of the model code (spec sections 1.7.4, 4)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hdit_jax.config import hdit_model
from hdit_jax.models import build_model
from hdit_jax.models.attention import shifted_window_attention
from hdit_jax.models.recording import record_activations


def _shifted_window_reference(q, k, v, ws, s):
  """Pairwise in the original coordinates, float64: query (i, j) sees key (a, b) when, after
  the roll by +s, both lie in the same window and, in the first window row (column), on the
  same side of local row (column) s."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  b, h, w, n, d = q.shape
  ri, ci = (np.arange(h) + s) % h, (np.arange(w) + s) % w   # rolled coordinates

  def allowed(rolled, size):
    same_window = (rolled[:, None] // ws) == (rolled[None, :] // ws)
    first = (rolled[:, None] // ws == 0)
    same_side = (rolled[:, None] % ws < s) == (rolled[None, :] % ws < s)
    return same_window & (~first | same_side)

  mask = allowed(ri, h)[:, None, :, None] & allowed(ci, w)[None, :, None, :]   # [h, w, h, w]
  logits = np.einsum("bijnd,bklnd->bnijkl", q, k)
  logits = np.where(mask[None, None], logits, -np.inf)
  logits -= logits.max(axis=(-2, -1), keepdims=True)
  p = np.exp(logits)
  p /= p.sum(axis=(-2, -1), keepdims=True)
  return np.einsum("bnijkl,bklnd->bijnd", p, v)


@pytest.mark.parametrize("h,w,ws,shift", [(8, 12, 4, 2), (8, 12, 4, 0), (4, 4, 4, 2),
                                          (6, 9, 3, 1)])
def test_shifted_window_attention_matches_pairwise_reference(h, w, ws, shift):
  rng = np.random.default_rng(h * 100 + w + shift)
  q, k, v = (rng.normal(size=(3, h, w, 2, 8)).astype(np.float32) for _ in range(3))
  got = shifted_window_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), ws, shift)
  np.testing.assert_allclose(np.asarray(got), _shifted_window_reference(q, k, v, ws, shift),
                             rtol=2e-5, atol=2e-5)


def _model(**options):
  cfg = hdit_model(input_size=(16, 24), input_channels=3, patch_size=(2, 2), depths=(2, 1),
                   widths=(16, 32), d_heads=(8, 8), kernel_sizes=(3, 3), window_sizes=(4, 4),
                   mapping_width=16, mapping_depth=1, mapping_d_ff=32, num_classes=0,
                   dtype="float32", **options)
  model = build_model(cfg, rngs=nnx.Rngs(0))
  # Zero-initialised outputs would hide every block's work: give them values.
  rng = np.random.default_rng(1)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if not np.any(np.asarray(var[...])):
      var[...] = jnp.asarray(rng.normal(size=var.shape) * 0.2, var.dtype)
  return model


def _forward(model):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 16, 24, 3)), jnp.float32)
  with record_activations(model) as acts:
    model(x, jnp.asarray([0.5, 3.0], jnp.float32))
  return acts


def _erf_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_gelu_feed_forward_is_a_plain_mlp():
  model = _model(feed_forward="gelu")
  acts = _forward(model)
  ff = model.down_levels[0][0].ff
  assert ff.up_proj.kernel.shape == (16, ff.down_proj.kernel.shape[0])   # no value|gate halves
  record, norm = acts["down_levels.0.0.ff"], acts["down_levels.0.0.ff.norm"]
  h = np.asarray(norm.output, np.float64) @ np.asarray(ff.up_proj.kernel[...], np.float64)
  expected = np.asarray(record.input, np.float64) + _erf_gelu(h) @ np.asarray(
      ff.down_proj.kernel[...], np.float64)
  np.testing.assert_allclose(np.asarray(record.output), expected, rtol=1e-4, atol=1e-5)


def test_geglu_feed_forward_gates_the_value_half():
  model = _model()
  acts = _forward(model)
  ff = model.down_levels[0][0].ff
  up = np.asarray(ff.up_proj.kernel[...], np.float64)      # [d, 2, d_ff]
  h = np.einsum("...i,ivf->...vf", np.asarray(acts["down_levels.0.0.ff.norm"].output), up)
  expected = (np.asarray(acts["down_levels.0.0.ff"].input, np.float64)
              + (h[..., 0, :] * _erf_gelu(h[..., 1, :])) @ np.asarray(ff.down_proj.kernel[...]))
  np.testing.assert_allclose(np.asarray(acts["down_levels.0.0.ff"].output), expected,
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("skip", ["add", "concat", "lerp"])
def test_skip_merges(skip):
  model = _model(skip=skip)
  split = model.splits[0]
  if skip == "lerp":
    split.fac[...] = jnp.asarray([0.3], jnp.float32)   # 0.5 would not tell the ends apart
  acts = _forward(model)
  record = acts["splits.0"]
  up = np.asarray(record.input, np.float64) @ np.asarray(split.proj.kernel[...], np.float64)
  b, hh, ww, f = up.shape   # pixel shuffle by hand: features ordered (dy, dx, c)
  up = up.reshape(b, hh, ww, 2, 2, f // 4).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, hh * 2, ww * 2, f // 4)
  down = np.asarray(acts["down_levels.0"].output, np.float64)
  if skip == "add":
    expected = up + down
  elif skip == "concat":
    expected = np.concatenate([up, down], -1) @ np.asarray(split.skip_proj.kernel[...])
  else:
    fac = float(np.asarray(split.fac[...])[0])
    expected = down + fac * (up - down)
  np.testing.assert_allclose(np.asarray(record.output), expected, rtol=1e-4, atol=1e-5)


def test_sincos_positions_are_added_and_rope_is_off():
  model = _model(position_embedding="sincos")
  acts = _forward(model)
  assert model.down_levels[0][0].self_attn.pos_emb is None
  h, w, d = 8, 12, 16
  # Cell centres, the longer side spanning [-1, 1] (aspect 12/8: rows span [-2/3, 2/3]).
  ys = (np.arange(h) + 0.5) / h * 2 - 1
  ys *= h / w
  xs = (np.arange(w) + 0.5) / w * 2 - 1
  freqs = math.pi * 10.0 ** (np.arange(d // 4) / (d // 4))
  ay, ax = ys[:, None, None] * freqs, xs[None, :, None] * freqs
  emb = np.concatenate([np.broadcast_to(f(a), (h, w, d // 4)) for f, a in
                        ((np.sin, ay), (np.cos, ay), (np.sin, ax), (np.cos, ax))], -1)
  np.testing.assert_allclose(np.asarray(acts["down_levels.0.0"].input),
                             np.asarray(acts["patch_in"].output) + emb, rtol=1e-5, atol=1e-5)


def test_shifted_window_levels_alternate_their_shift():
  model = _model(attention=("shifted-window", "global"))
  shifts = [layer.self_attn.shift for layer in model.down_levels[0]]
  assert shifts == [0, 2]                                  # layer indices 0, 1
  assert [layer.self_attn.shift for layer in model.up_levels[0]] == [0, 2]   # indices 2, 3
  acts = _forward(model)
  layer = model.down_levels[0][1].self_attn
  assert acts["down_levels.0.1.self_attn"].output.shape == (2, 8, 12, 16)
  assert layer.spec.kind == "shifted-window"
