"""Intermediate values by module path (the equivalent of the official code's forward hooks)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hdit_jax.config import hdit_model
from hdit_jax.models import build_model
from hdit_jax.models.attention import SelfAttention
from hdit_jax.models.layers import RMSNorm
from hdit_jax.models.recording import record_activations


def _model():
  cfg = hdit_model(input_size=(16, 12), input_channels=3, patch_size=(2, 2), depths=(1, 2),
                   widths=(16, 32), d_heads=(8, 8), kernel_sizes=(3, 3), mapping_width=16,
                   mapping_depth=1, mapping_d_ff=32, num_classes=0, dtype="float32")
  return build_model(cfg, rngs=nnx.Rngs(0))


def test_every_module_and_level_is_recorded_by_its_path():
  model = _model()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 16, 12, 3)), jnp.float32)
  sigma = jnp.asarray([0.1, 1.0, 10.0], jnp.float32)
  original_call = SelfAttention.__call__
  with record_activations(model) as acts:
    out = model(x, sigma)
  # The classes are as they were, and later calls record nothing.
  assert SelfAttention.__call__ is original_call
  model(x, sigma)
  expected = {"time_emb", "aug_emb", "mapping", "mapping.blocks.0", "patch_in",
              "down_levels.0", "down_levels.0.0", "down_levels.0.0.self_attn",
              "down_levels.0.0.ff", "merges.0", "mid_level", "mid_level.1.self_attn",
              "splits.0", "up_levels.0", "up_levels.0.0.ff.norm", "out_norm", "patch_out"}
  assert expected <= acts.keys(), sorted(expected - acts.keys())
  # Outputs and inputs are the values that flowed: recompute parts from recorded inputs.
  np.testing.assert_array_equal(acts["patch_out"].output, out)
  np.testing.assert_allclose(model.out_norm(acts["out_norm"].input), acts["out_norm"].output,
                             rtol=1e-6)
  np.testing.assert_array_equal(acts["splits.0"].input, acts["mid_level"].output)
  np.testing.assert_array_equal(acts["merges.0"].input, acts["down_levels.0"].output)
  assert acts["down_levels.0"].input is None   # a level: its output only
  np.testing.assert_array_equal(acts["down_levels.0"].output,
                                acts["down_levels.0.0"].output)
  np.testing.assert_array_equal(acts["mid_level"].output, acts["mid_level.1"].output)
  np.testing.assert_array_equal(acts["mid_level.1"].input, acts["mid_level.0"].output)
  # Non-square maps keep their shapes: 8x6 tokens at level 0, 4x3 in the middle.
  assert acts["down_levels.0.0.self_attn"].output.shape == (3, 8, 6, 16)
  assert acts["mid_level.0.self_attn"].output.shape == (3, 4, 3, 32)
  assert isinstance(model.out_norm, RMSNorm)


def test_recording_is_per_model():
  first, second = _model(), _model()
  x = jnp.zeros((1, 16, 12, 3), jnp.float32)
  with record_activations(first) as acts:
    second(x, jnp.ones((1,)))   # another instance of the same classes
  assert acts == {}
  with record_activations(first) as acts:
    jax.block_until_ready(first(x, jnp.ones((1,))))
  assert "mid_level.0.ff" in acts
