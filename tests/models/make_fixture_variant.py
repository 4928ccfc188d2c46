"""Writes a fixture folder in the k-diffusion reference format for another HDiT config.

The reference outputs come from this port run in float64 (so they test the parity harness's
generality and float32 accuracy, not agreement with PyTorch): non-square 48x80 input, patch 4,
neighborhood kernel 5, two global levels with per-level head dims, no class conditioning,
sigma_data 0.6162. The NA op and sampler sets are copied from the default folder.

  JAX_ENABLE_X64=1 python tests/models/make_fixture_variant.py OUT_DIR
"""

import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import numpy as st_numpy

from hdit_jax import convert
from hdit_jax.diffusion import losses
from hdit_jax.diffusion.preconditioning import denoise, edm_scalings
from hdit_jax.models import build_model
from hdit_jax.models.recording import record_activations
from hdit_jax.models.spec import config_from_kdiffusion

DEFAULT = pathlib.Path(__file__).parent.parent / "fixtures" / "kdiff_hdit"
SIGMA_DATA = 0.6162
KDIFF_CONFIG = {
    "model": {
        "type": "image_transformer_v2", "input_channels": 3, "input_size": [48, 80],
        "patch_size": [4, 4], "depths": [1, 1, 2], "widths": [32, 64, 96],
        "d_ffs": [64, 96, 160],
        "self_attns": [{"type": "neighborhood", "d_head": 16, "kernel_size": 5},
                       {"type": "global", "d_head": 32}, {"type": "global", "d_head": 16}],
        "mapping_width": 32, "mapping_depth": 1, "mapping_d_ff": 64, "dropout_rate": [0, 0, 0],
        "sigma_data": SIGMA_DATA, "sigma_min": 0.01, "sigma_max": 80,
        "loss_config": "karras", "loss_weighting": "soft-min-snr",
        "sigma_sample_density": {"type": "cosine-interpolated"}},
    "dataset": {"type": "imagefolder", "num_classes": 0},
}
LOSSES = [("loss.karras", "Denoiser", "karras", 1), ("loss.soft_min_snr", "Denoiser", "soft-min-snr", 1),
          ("loss.snr", "Denoiser", "snr", 1), ("loss.simple", "SimpleLossDenoiser", None, 1),
          ("loss.karras_scales4", "Denoiser", "karras", 4)]


def main(out: pathlib.Path) -> None:
  assert jax.config.jax_enable_x64, "run with JAX_ENABLE_X64=1"
  out.mkdir(parents=True, exist_ok=True)
  for name in ("na_cases.json", "na_cases.safetensors", "samplers.json", "samplers.safetensors"):
    shutil.copy(DEFAULT / name, out / name)

  model_cfg = config_from_kdiffusion(KDIFF_CONFIG)
  model = build_model(model_cfg, rngs=nnx.Rngs(0))
  # Perturb every parameter as the official fixture does (its README), so no path is zero.
  rng = np.random.default_rng(5678)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, value = ".".join(map(str, path)), np.asarray(var[...])
    if name.endswith("kernel"):
      c = 0.25 if name.endswith("norm.linear.kernel") else 0.5
      value = value + rng.normal(size=value.shape) * c / np.sqrt(value.shape[0])
    elif name.endswith("self_attn.scale"):
      value = value + rng.normal(size=value.shape)
    elif name.endswith("fac"):
      value = 0.5 + rng.uniform(-0.3, 0.3, value.shape)
    else:
      value = value + 0.1 * rng.normal(size=value.shape)
    var[...] = jnp.asarray(value, var.dtype)
  weights = out / "hdit_weights.safetensors"
  convert.save_kdiffusion(model, model_cfg, str(weights), extra_config=KDIFF_CONFIG)

  f64 = build_model(dict(model_cfg, dtype="float64", param_dtype="float64"), rngs=nnx.Rngs(0))
  convert.load_state_dict_into(f64, {k: v.astype(np.float64)
                                     for k, v in st_numpy.load_file(str(weights)).items()})
  rng = np.random.default_rng(7)
  b, (h, w) = 3, KDIFF_CONFIG["model"]["input_size"]
  x0 = rng.uniform(-1, 1, (b, 3, h, w)).astype(np.float32)
  noise = rng.normal(size=(b, 3, h, w)).astype(np.float32)
  sigma = np.array([0.02, 0.7, 5.0], np.float32)
  x = x0 + noise * sigma[:, None, None, None]
  aug = rng.normal(size=(b, 9)).astype(np.float32)
  aug[0] = 0
  nhwc = lambda t: jnp.asarray(np.transpose(t, (0, 2, 3, 1)), jnp.float64)
  nchw = lambda t: np.transpose(np.asarray(t), (0, 3, 1, 2)).astype(np.float32)
  sig64 = jnp.asarray(sigma, jnp.float64)
  c_skip, c_out, c_in = edm_scalings(sig64, SIGMA_DATA)
  with record_activations(f64) as acts:
    inner = f64(nhwc(x) * c_in[:, None, None, None], sig64, aug_cond=jnp.asarray(aug, jnp.float64))
  io = {"input.x0": x0, "input.noise": noise, "input.sigma": sigma, "input.x": x,
        "input.aug_cond": aug, "c_skip": c_skip, "c_out": c_out, "c_in": c_in,
        "inner_output": nchw(inner),
        "denoised": nchw(denoise(f64, nhwc(x), sig64, SIGMA_DATA, aug_cond=jnp.asarray(aug, jnp.float64))),
        "act.time_emb": acts["time_emb"].output, "act.aug_emb": acts["aug_emb"].output,
        "act.mapping_in": acts["mapping"].input, "act.cond": acts["mapping"].output,
        "act.patch_in_s0": acts["patch_in"].output[0],
        "act.down0_s0": acts["down_levels.0"].output[0], "act.mid": acts["mid_level"].output,
        # Modules that the official fixture does not record: any module path compares.
        "act.attn000_s1": acts["down_levels.0.0.self_attn"].output[1],
        "act.merge0_in": acts["merges.0"].input, "act.up0": acts["up_levels.0"].output,
        "act.out_norm": acts["out_norm"].output}
  for key, wrapper, weighting, scales in LOSSES:
    cond = dict(aug_cond=jnp.asarray(aug, jnp.float64))
    if wrapper == "SimpleLossDenoiser":
      io[key] = losses.simple_loss(f64, nhwc(x0), nhwc(noise), sig64, SIGMA_DATA, **cond)
    else:
      io[key] = losses.diffusion_loss(f64, nhwc(x0), nhwc(noise), sig64, SIGMA_DATA, weighting,
                                      scales, **cond)
      io["weight." + key.split(".", 1)[1]] = losses.loss_weight(sig64, SIGMA_DATA, weighting)
  st_numpy.save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in io.items()},
                     str(out / "hdit_io.safetensors"))

  levels = [{"depth": d, "width": wd, "d_ff": f, "self_attn": a, "dropout": 0.0}
            for d, wd, f, a in zip(*(KDIFF_CONFIG["model"][k] for k in
                                     ("depths", "widths", "d_ffs", "self_attns")))]
  activations = [
      {"key": "act.time_emb", "module": "time_emb", "hook": "forward output", "batch_index": None},
      {"key": "act.aug_emb", "module": "aug_emb", "hook": "forward output", "batch_index": None},
      {"key": "act.mapping_in", "module": "mapping", "hook": "forward input[0]", "batch_index": None},
      {"key": "act.cond", "module": "mapping", "hook": "forward output", "batch_index": None},
      {"key": "act.patch_in_s0", "module": "patch_in", "hook": "forward output", "batch_index": 0},
      {"key": "act.down0_s0", "module": "down_levels.0", "hook": "forward output", "batch_index": 0},
      {"key": "act.mid", "module": "mid_level", "hook": "forward output", "batch_index": None},
      {"key": "act.attn000_s1", "module": "down_levels.0.0.self_attn", "hook": "forward output",
       "batch_index": 1},
      {"key": "act.merge0_in", "module": "merges.0", "hook": "forward input[0]",
       "batch_index": None},
      {"key": "act.up0", "module": "up_levels.0", "hook": "forward output", "batch_index": None},
      {"key": "act.out_norm", "module": "out_norm", "hook": "forward output",
       "batch_index": None}]
  config = {
      "set": "A (variant written by hdit-jax in float64)",
      "kdiffusion_config": KDIFF_CONFIG,
      "constructor": {"levels": levels, "patch_size": KDIFF_CONFIG["model"]["patch_size"],
                      "num_classes": 0, "mapping_cond_dim": 0},
      "denoiser": {"sigma_data": SIGMA_DATA,
                   "losses": [{"key": k, "wrapper": wr, "weighting": wt, "scales": s}
                              for k, wr, wt, s in LOSSES]},
      "activations": activations,
      "n_params": int(sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))),
  }
  (out / "hdit_config.json").write_text(json.dumps(config, indent=1))


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
