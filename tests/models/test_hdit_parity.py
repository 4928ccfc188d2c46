"""Parity of the HDiT port with the official PyTorch code, on any fixture folder of the format.

Everything about the model (architecture, sigma_data, class conditioning, which activations were
recorded) is read from the fixture's own files.
"""

import numpy as np
import pytest
from flax import nnx

from conftest import rel_l2
from hdit_jax import convert, weights
from hdit_jax.diffusion.preconditioning import denoise, edm_scalings
from hdit_jax.models.recording import record_activations

pytestmark = pytest.mark.parity

REL_L2 = 1e-5
MAX_ABS = 1e-4


def nchw_to_nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def reference(kdiff):
  config = kdiff.json("hdit_config.json")
  io = kdiff.tensors("hdit_io.safetensors")
  # The weights file is a k-diffusion inference checkpoint: its metadata carries the config.
  model, model_cfg = convert.model_from_kdiffusion(kdiff.path("hdit_weights.safetensors"))
  return config, io, model, model_cfg


def conditioning(io):
  cond = {"aug_cond": io["input.aug_cond"]} if "input.aug_cond" in io else {}
  if "input.class_cond" in io:
    cond["class_cond"] = io["input.class_cond"].astype(np.int32)
  return cond


def sigma_data(config):
  return float(config["denoiser"]["sigma_data"])


def assert_close(got, ref, name):
  err = rel_l2(got, ref)
  max_abs = float(np.max(np.abs(np.asarray(got, np.float64) - ref)))
  assert err <= REL_L2 and max_abs <= MAX_ABS, f"{name}: rel L2 {err:.2e}, max abs {max_abs:.2e}"


def test_config_reads_constructor(reference):
  config, _, model, model_cfg = reference
  ctor = config["constructor"]
  spec = model.spec
  assert [lv.width for lv in spec.levels] == [lv["width"] for lv in ctor["levels"]]
  assert [lv.depth for lv in spec.levels] == [lv["depth"] for lv in ctor["levels"]]
  assert [lv.d_ff for lv in spec.levels] == [lv["d_ff"] for lv in ctor["levels"]]
  assert list(spec.patch_size) == list(ctor["patch_size"])
  table = ctor["num_classes"]
  assert spec.num_classes == (table - 1 if table else 0)
  if "n_params" in config:
    n = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert n == config["n_params"]


def test_inner_model_output(reference):
  config, io, model, _ = reference
  _, _, c_in = edm_scalings(io["input.sigma"], sigma_data(config))
  x = nchw_to_nhwc(io["input.x"]) * c_in[:, None, None, None]
  out = model(x, io["input.sigma"], **conditioning(io))
  assert_close(out, nchw_to_nhwc(io["inner_output"]), "inner_output")


def test_denoiser_output(reference):
  config, io, model, _ = reference
  out = denoise(model, nchw_to_nhwc(io["input.x"]), io["input.sigma"], sigma_data(config),
                **conditioning(io))
  assert_close(out, nchw_to_nhwc(io["denoised"]), "denoised")


def test_scalings(reference):
  config, io, _, _ = reference
  for name, got in zip(("c_skip", "c_out", "c_in"),
                       edm_scalings(io["input.sigma"], sigma_data(config))):
    assert rel_l2(got, io[name]) <= 1e-6, name


def _recorded(acts, entry):
  """The value a forward hook on the official module `entry["module"]` saw."""
  record, hook = acts[entry["module"]], entry["hook"]
  if hook == "forward output":
    return record.output
  if hook == "forward input[0]":
    return record.input
  raise ValueError(f"unknown hook {hook!r} in the fixture's activations")


def test_activations(reference):
  config, io, model, _ = reference
  _, _, c_in = edm_scalings(io["input.sigma"], sigma_data(config))
  x = nchw_to_nhwc(io["input.x"]) * c_in[:, None, None, None]
  with record_activations(model) as acts:
    model(x, io["input.sigma"], **conditioning(io))
  checked = 0
  for entry in config["activations"]:
    got = np.asarray(_recorded(acts, entry))
    if entry.get("batch_index") is not None:
      got = got[entry["batch_index"]]
    ref = io[entry["key"]]
    assert got.shape == ref.shape, entry["key"]
    assert_close(got, ref, entry["key"])
    checked += 1
  assert checked == len(config["activations"]) > 0


def test_round_trip_is_exact(reference, kdiff, tmp_path):
  _, _, model, model_cfg = reference
  fixture = kdiff.tensors("hdit_weights.safetensors")
  exported = convert.model_to_state_dict(model)
  assert sorted(exported) == sorted(fixture)
  for key in fixture:
    np.testing.assert_array_equal(exported[key], fixture[key], err_msg=key)

  path = str(tmp_path / "exported.safetensors")
  convert.save_kdiffusion(model, model_cfg, path)
  reloaded, reloaded_cfg = convert.model_from_kdiffusion(path)
  assert reloaded_cfg == model_cfg
  again = convert.model_to_state_dict(reloaded)
  for key in fixture:
    np.testing.assert_array_equal(again[key], fixture[key], err_msg=key)


def test_hdit_jax_weight_file_round_trip(reference, tmp_path):
  _, io, model, model_cfg = reference
  path = str(tmp_path / "weights.safetensors")
  weights.save_weights(model, model_cfg, path)
  reloaded, cfg = weights.load_weights(path)
  assert cfg == model_cfg
  x = nchw_to_nhwc(io["input.x"])
  np.testing.assert_array_equal(reloaded(x, io["input.sigma"], **conditioning(io)),
                                model(x, io["input.sigma"], **conditioning(io)))
