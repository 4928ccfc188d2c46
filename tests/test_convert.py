"""Weight conversion: the CLI, every k-diffusion checkpoint kind, and clear failures."""

import json
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from hdit_jax import convert

ROOT = pathlib.Path(__file__).parent.parent


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "hdit_jax.convert", *args], capture_output=True,
                        text=True, cwd=ROOT)


def test_cli_import_then_export_is_exact(kdiff, tmp_path):
  weights, exported = tmp_path / "w.safetensors", tmp_path / "k.safetensors"
  result = run_cli("import", kdiff.path("hdit_weights.safetensors"), f"--output={weights}")
  assert result.returncode == 0, result.stderr
  result = run_cli("export", str(weights), f"--output={exported}")
  assert result.returncode == 0, result.stderr
  fixture = kdiff.tensors("hdit_weights.safetensors")
  again = st_numpy.load_file(str(exported))
  assert sorted(again) == sorted(fixture)
  for key, value in fixture.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_plain_state_dict_with_json_config(kdiff, tmp_path):
  plain = tmp_path / "plain.safetensors"
  st_numpy.save_file(kdiff.tensors("hdit_weights.safetensors"), str(plain))
  with pytest.raises(ValueError, match="carries no config"):
    convert.model_from_kdiffusion(str(plain))
  config = tmp_path / "config.json"
  config.write_text(json.dumps(kdiff.json("hdit_config.json")["kdiffusion_config"]))
  model, _ = convert.model_from_kdiffusion(str(plain), str(config))
  exported = convert.model_to_state_dict(model)
  for key, value in kdiff.tensors("hdit_weights.safetensors").items():
    np.testing.assert_array_equal(exported[key], value)


@pytest.mark.parametrize("dtype, numpy_dtype", [("fp16", np.float16), ("bf16", ml_dtypes.bfloat16)])
def test_half_precision_export_rounds_every_tensor(kdiff, tmp_path, dtype, numpy_dtype):
  model, model_cfg = convert.model_from_kdiffusion(kdiff.path("hdit_weights.safetensors"))
  path = tmp_path / f"{dtype}.safetensors"
  convert.save_kdiffusion(model, model_cfg, str(path), dtype=dtype)
  tensors = st_numpy.load_file(str(path))
  assert {t.dtype for t in tensors.values()} == {np.dtype(numpy_dtype)}
  for key, value in kdiff.tensors("hdit_weights.safetensors").items():
    np.testing.assert_array_equal(tensors[key], value.astype(numpy_dtype))
  reloaded, _ = convert.model_from_kdiffusion(str(path))   # half-precision files load too


def test_pickle_needs_explicit_permission(tmp_path):
  path = tmp_path / "ckpt.pth"
  path.write_bytes(b"not read")
  with pytest.raises(ValueError, match="allow_pickle"):
    convert.read_kdiffusion_checkpoint(str(path))
  result = run_cli("import", str(path), f"--output={tmp_path / 'w.safetensors'}")
  assert result.returncode != 0 and "allow-pickle" in result.stderr.replace("_", "-")


def test_training_checkpoint_pth(kdiff, tmp_path):
  torch = pytest.importorskip("torch")
  state = {k: torch.from_numpy(v) for k, v in kdiff.tensors("hdit_weights.safetensors").items()}
  ema = {k: v + 1 for k, v in state.items()}
  config = kdiff.json("hdit_config.json")["kdiffusion_config"]
  path = tmp_path / "run_00001000.pth"
  torch.save({"config": config, "model": state, "model_ema": ema, "step": 1000}, path)
  for use_ema, expected in ((True, ema), (False, state)):
    model, _ = convert.model_from_kdiffusion(str(path), use_ema=use_ema, allow_pickle=True)
    exported = convert.model_to_state_dict(model)
    for key, value in expected.items():
      np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
  result = run_cli("import", str(path), "--allow_pickle", "--noema",
                   f"--output={tmp_path / 'w.safetensors'}")
  assert result.returncode == 0, result.stderr


def test_mismatched_checkpoint_names_the_keys(kdiff, tmp_path):
  tensors = kdiff.tensors("hdit_weights.safetensors")
  del tensors["out_norm.scale"]
  tensors["extra.weight"] = np.zeros(3, np.float32)
  path = tmp_path / "bad.safetensors"
  st_numpy.save_file(tensors, str(path), metadata={
      "config": json.dumps(kdiff.json("hdit_config.json")["kdiffusion_config"])})
  with pytest.raises(ValueError, match=r"missing \['out_norm.scale'\].*unexpected \['extra.weight'\]"):
    convert.model_from_kdiffusion(str(path))


def test_wrong_shape_and_missing_file(kdiff, tmp_path):
  tensors = kdiff.tensors("hdit_weights.safetensors")
  tensors["out_norm.scale"] = np.ones(5, np.float32)
  path = tmp_path / "bad.safetensors"
  st_numpy.save_file(tensors, str(path), metadata={
      "config": json.dumps(kdiff.json("hdit_config.json")["kdiffusion_config"])})
  with pytest.raises(ValueError, match="out_norm.scale"):
    convert.model_from_kdiffusion(str(path))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    convert.model_from_kdiffusion(str(tmp_path / "nowhere.safetensors"))


def test_non_hdit_config_is_refused(kdiff, tmp_path):
  config = kdiff.json("hdit_config.json")["kdiffusion_config"]
  config["model"]["type"] = "image_v1"
  path = tmp_path / "unet.safetensors"
  st_numpy.save_file(kdiff.tensors("hdit_weights.safetensors"), str(path),
                     metadata={"config": json.dumps(config)})
  with pytest.raises(ValueError, match="image_transformer_v2"):
    convert.model_from_kdiffusion(str(path))
