"""The analytic counter against the paper's numbers, the instantiated models and XLA."""

import functools
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from hdit_jax import flops
from hdit_kernels.neighborhood_attention import xla as na_xla
from hdit_jax.models import build_model

ROOT = pathlib.Path(__file__).parent.parent


def load_config(name: str, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("config, arg, params, gmacs", [
    ("imagenet256", None, 557_416_522, 197.6),
    ("ffhq1024", None, 85_079_300, 206.08),
    ("imagenet128_ablation", "soft_min_snr", None, 31.4),
])
def test_paper_models(config, arg, params, gmacs):
  counts = flops.count(load_config(config, arg).model)
  if params is not None:
    assert counts["params"] == params
  assert counts["gmacs_per_image"] == pytest.approx(gmacs, rel=5e-3)


HDIT_B4 = dict(patch_size=(4, 4), num_classes=1000, mapping_width=768, mapping_depth=1)


@pytest.mark.parametrize("resolution, gmacs", [(128, 31.4), (256, 64.7), (512, 198.0)])
def test_hdit_b4_scaling(resolution, gmacs):
  # One more NA level of width 384 and depth 2 per doubling of the resolution.
  extra = {1: 0, 2: 1, 4: 2}[resolution // 128]
  cfg = dict(HDIT_B4, input_size=(resolution, resolution), depths=(2,) * (extra + 1) + (11,),
             widths=(384,) * (extra + 1) + (768,),
             attention=("neighborhood",) * (extra + 1) + ("global",))
  assert flops.count(cfg)["gmacs_per_image"] == pytest.approx(gmacs, rel=5e-3)


@pytest.mark.parametrize("resolution, gmacs", [(128, 106.4), (256, 657.5), (512, 6341.0)])
def test_dit_b4_pixel_space(resolution, gmacs):
  cfg = dict(type="dit", variant="B/4", input_size=(resolution, resolution), num_classes=1000)
  assert flops.count(cfg)["gmacs_per_image"] == pytest.approx(gmacs, rel=5e-3)


def _param_count(model):
  return sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(feed_forward="gelu", d_ffs=(96, 160, 200), position_embedding="sincos", skip="concat"),
    dict(attention=("shifted-window", "none", "global"), skip="add", num_classes=0,
         mapping_cond_dim=5),
])
def test_params_match_the_model(overrides):
  cfg = dict(input_size=(32, 48), patch_size=(2, 2), depths=(1, 1, 2), widths=(64, 96, 128),
             attention=("neighborhood", "global", "global"), d_heads=(32, 32, 64),
             window_sizes=(4, 4, 4), mapping_width=32, mapping_depth=2, mapping_d_ff=48,
             num_classes=7)
  cfg.update(overrides)
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  assert flops.count(cfg)["params"] == _param_count(model)


def test_dit_params_match_the_model():
  cfg = dict(type="dit", variant="S/4", input_size=(32, 32), num_classes=10, learn_sigma=True)
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  assert flops.count(cfg)["params"] == _param_count(model)


def _xla_gmacs(cfg, height, width, **cond):
  model = build_model(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  forward = lambda state, x, sigma: nnx.merge(graphdef, state)(x, sigma, **cond)
  x = jnp.zeros((1, height, width, cfg.get("input_channels", 3)))
  compiled = jax.jit(forward).lower(state, x, jnp.ones((1,))).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return analysis["flops"] / 2 / 1e9   # XLA counts a multiply-add as 2 flops


@pytest.mark.parametrize("cfg", [
    # Linear-heavy: every attention kind, non-square.
    dict(input_size=(64, 48), patch_size=(2, 2), depths=(1, 1, 2), widths=(128, 192, 256),
         attention=("neighborhood", "shifted-window", "global"), d_heads=(64, 64, 64),
         kernel_sizes=(5, 7, 7), window_sizes=(4, 4, 4), mapping_width=128, mapping_depth=1,
         mapping_d_ff=256),
    # Attention-heavy: global attention over 1024 tokens of width 64.
    dict(input_size=(32, 32), patch_size=(1, 1), depths=(2,), widths=(64,),
         attention=("global",), d_heads=(32,), mapping_width=32, mapping_depth=1,
         mapping_d_ff=64),
])
def test_agrees_with_xla_cost_analysis(cfg, monkeypatch):
  # The exact-work NA forward, whose logits XLA counts as the convention does (the default
  # halo forward computes masked logits too).
  monkeypatch.setattr(na_xla, "Config", functools.partial(na_xla.Config, forward="offsets"))
  ours = flops.count(cfg)["gmacs_per_image"]
  xla = _xla_gmacs(cfg, *cfg["input_size"])
  # XLA also counts elementwise work (norms, softmax, GEGLU), which the convention leaves out.
  assert ours <= xla <= 1.10 * ours, (ours, xla)


def test_cli_json():
  out = subprocess.run([sys.executable, "-m", "hdit_jax.flops",
                        f"--config={ROOT / 'configs' / 'imagenet256.py'}", "--json"],
                       capture_output=True, text=True, check=True, cwd=ROOT)
  counts = json.loads(out.stdout)
  assert counts["params"] == 557_416_522
  assert counts["gmacs_per_image"] == pytest.approx(197.6, rel=5e-3)
