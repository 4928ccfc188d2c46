"""The optimizer against k-diffusion's recipe: parameter groups by name (spec 1.13), torch AdamW
per group after global-norm clipping (spec 4.2), the EMA warm-up (spec 4.4), the warm-up."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hdit_jax import convert
from hdit_jax.config import base_config, hdit_model
from hdit_jax.models import build_model
from hdit_jax.training import optimizer

# Spec 1.13, by PyTorch state_dict name: `wd` on the listed projections' weights; `mapping` on
# everything in the mapping network and on every AdaRMSNorm linear; the rest neither.
WD = re.compile(r"(patch_in\.proj|qkv_proj|out_proj|up_proj|down_proj|norm\.linear|"
                r"merges\.\d+\.proj|splits\.\d+\.proj|patch_out\.proj)\.weight$")
MAPPING = re.compile(r"^mapping\.|norm\.linear\.weight$")


def expected_group(name: str) -> str:
  return ("mapping_" if MAPPING.search(name) else "") + ("wd" if WD.search(name) else "no_wd")


def small_model():
  cfg = hdit_model(input_size=(16, 16), input_channels=3, patch_size=(2, 2), depths=(1, 1, 1),
                   widths=(16, 24, 32), d_heads=(8, 8, 8), kernel_sizes=(3, 3, 3),
                   attention=("neighborhood", "shifted-window", "global"), window_sizes=(4, 4, 2),
                   mapping_width=16, mapping_depth=2, mapping_d_ff=32, num_classes=5,
                   dtype="float32")
  return build_model(cfg, rngs=nnx.Rngs(0))


def torch_names(params: nnx.State) -> dict[str, str]:
  """Our state path -> k-diffusion's name."""
  return {"/".join(map(str, path)): convert._torch_key(path)[0]   # pylint: disable=protected-access
          for path, _ in nnx.to_flat_state(params)}


def test_every_parameter_is_in_its_official_group():
  params = nnx.state(small_model(), nnx.Param)
  groups = dict(nnx.to_flat_state(optimizer.param_groups(params)))
  names = torch_names(params)
  got = {names["/".join(map(str, path))]: group for path, group in groups.items()}
  want = {name: expected_group(name) for name in got}
  assert got == want
  # Every group is populated, and the spec's examples sit where it says.
  assert set(got.values()) == set(optimizer.GROUPS)
  assert got["class_emb.weight"] == got["time_in_proj.weight"] == "no_wd"
  assert got["mapping.blocks.0.up_proj.weight"] == "mapping_wd"
  assert got["mapping.in_norm.scale"] == "mapping_no_wd"
  assert got["down_levels.0.0.self_attn.norm.linear.weight"] == "mapping_wd"
  assert got["out_norm.scale"] == got["down_levels.0.0.self_attn.scale"] == "no_wd"


def torch_adamw_reference(params, grads_per_step, cfg, groups):
  """torch.optim.AdamW (decoupled decay p <- p - lr wd p, bias-corrected moments) per group
  after clipping the global gradient norm, in float64; lists of arrays in one order."""
  p = [np.asarray(x, np.float64) for x in params]
  m = [np.zeros_like(x) for x in p]
  v = [np.zeros_like(x) for x in p]
  for t, grads in enumerate(grads_per_step, start=1):
    g = [np.asarray(x, np.float64) for x in grads]
    factor = min(1.0, cfg.grad_clip / np.sqrt(sum((x ** 2).sum() for x in g)))
    # Linear warm-up from lr / warmup_steps at the first step to lr at step warmup_steps.
    w = cfg.warmup_steps
    lr_base = cfg.lr / w + (cfg.lr - cfg.lr / w) * min(t - 1, w) / w if w else cfg.lr
    for i, group in enumerate(groups):
      lr = lr_base * (cfg.mapping_lr_scale if group.startswith("mapping_") else 1.0)
      wd = cfg.weight_decay if group in ("wd", "mapping_wd") else 0.0
      gi = g[i] * factor
      p[i] = p[i] - lr * wd * p[i]
      m[i] = cfg.b1 * m[i] + (1 - cfg.b1) * gi
      v[i] = cfg.b2 * v[i] + (1 - cfg.b2) * gi ** 2
      m_hat, v_hat = m[i] / (1 - cfg.b1 ** t), v[i] / (1 - cfg.b2 ** t)
      p[i] = p[i] - lr * m_hat / (np.sqrt(v_hat) + cfg.eps)
  return p


@pytest.mark.parametrize("warmup_steps", [0, 4])
def test_adamw_groups_clipping_and_warmup_match_torch_formulas(warmup_steps):
  cfg = base_config().optimizer
  cfg.update(lr=1e-2, weight_decay=0.1, grad_clip=0.5, warmup_steps=warmup_steps)
  params = nnx.state(small_model(), nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  groups = jax.tree.leaves(optimizer.param_groups(params))
  assert len(groups) == len(leaves) and set(groups) == set(optimizer.GROUPS)
  rng = np.random.default_rng(0)
  grads_per_step = [[rng.normal(size=x.shape).astype(np.float32) * 0.1 for x in leaves]
                    for _ in range(3)]
  tx = optimizer.make_optimizer(cfg, params)
  state, current = tx.init(params), params
  for grads in grads_per_step:
    updates, state = tx.update(jax.tree.unflatten(treedef, grads), state, current)
    current = jax.tree.map(lambda p, u: p + u, current, updates)
  want = torch_adamw_reference(leaves, grads_per_step, cfg, groups)
  got = jax.tree.leaves(current)
  for i, (a, b) in enumerate(zip(got, want)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-7, err_msg=groups[i])
    assert not np.allclose(np.asarray(a), np.asarray(leaves[i]))


def test_ema_schedule_and_update_follow_the_warmup_formula():
  for power, max_value in ((0.75, 0.9999), (2 / 3, 0.9999), (1.0, 0.5)):
    t = np.array([0, 1, 2, 10, 10_000, 10 ** 7])
    want = np.clip(1 - (1 + t.astype(np.float64)) ** -power, 0, max_value)
    got = np.array([float(optimizer.ema_decay(jnp.asarray(s), power, max_value)) for s in t])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert float(optimizer.ema_decay(jnp.asarray(0), 0.75, 0.9999)) == 0.0   # EMA := weights
  np.testing.assert_allclose(float(optimizer.ema_decay(jnp.asarray(10_000), 0.75, 0.9999)),
                             0.999, atol=1e-6)
  ema = {"w": jnp.array([1.0, 2.0])}
  new = optimizer.ema_update(ema, {"w": jnp.array([3.0, -2.0])}, jnp.asarray(0.25))
  np.testing.assert_allclose(new["w"], [0.25 * 1 + 0.75 * 3, 0.25 * 2 - 0.75 * 2])
