"""hdit-jax weight files carry the diffusion and sampler settings; k-diffusion export keeps σ_data
and comes back as the same config."""

import json

import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from hdit_jax import convert, weights
from hdit_jax.config import base_config, hdit_model
from hdit_jax.models import build_model
from hdit_jax.sampling import model_file
from hdit_jax.sampling.generate import SamplerSettings


def run_config():
  c = base_config()
  c.model = hdit_model(input_size=(16, 16), input_channels=1, patch_size=(2, 2), depths=(1, 1),
                       widths=(16, 32), d_heads=(8, 8), kernel_sizes=(3, 3), window_sizes=(7, 7),
                       mapping_width=16, mapping_depth=1, mapping_d_ff=32, num_classes=10,
                       dtype="bfloat16")
  c.diffusion.update(sigma_data=0.6162, sigma_min=0.02, sigma_max=80.0)
  c.sampling.update(sampler="dpmpp_2m", steps=20, guidance_scale=2.5,
                    guidance_interval=(0.3, 5.0))
  return c


def write(tmp_path, config):
  model = build_model(config.model, rngs=nnx.Rngs(0))
  path = str(tmp_path / "ema.safetensors")
  weights.save_weights(model, config.model.to_dict(), path, weights.settings_from_config(config))
  return model, path


def test_weight_file_samples_with_its_own_settings(tmp_path):
  config = run_config()
  _, path = write(tmp_path, config)
  _, loaded = model_file.load_model_file(weights_path=path)
  settings = SamplerSettings.from_config(loaded)
  assert settings == SamplerSettings.from_config(config)
  assert (settings.sigma_data, settings.sigma_max, settings.sigma_min) == (0.6162, 80.0, 0.01)
  assert settings.guidance_interval == (0.3, 5.0) and settings.steps == 20
  # The base defaults differ, so this is not a coincidence of defaults.
  assert SamplerSettings.from_config(base_config()).sigma_data != 0.6162


def test_files_without_settings_use_the_defaults(tmp_path):
  config = run_config()
  model = build_model(config.model, rngs=nnx.Rngs(0))
  path = str(tmp_path / "old.safetensors")
  weights.save_weights(model, config.model.to_dict(), path)
  assert weights.load_settings(path) == {}
  _, loaded = model_file.load_model_file(weights_path=path)
  assert loaded.diffusion.sigma_data == base_config().diffusion.sigma_data


def test_kdiffusion_export_keeps_sigma_data_and_the_config(tmp_path):
  config = run_config()
  model, path = write(tmp_path, config)
  exported = str(tmp_path / "kdiff.safetensors")
  model2, model_cfg = weights.load_weights(path)
  convert.save_kdiffusion(model2, model_cfg, exported, settings=weights.load_settings(path))
  with safe_open(exported, framework="numpy") as f:
    kdiff_config = json.loads(f.metadata()["config"])
  assert kdiff_config["model"]["sigma_data"] == 0.6162
  assert (kdiff_config["model"]["sigma_min"], kdiff_config["model"]["sigma_max"]) == (0.02, 80.0)
  back, back_cfg, settings = convert.model_from_kdiffusion(exported, with_settings=True)
  assert back_cfg == {k: tuple(v) if isinstance(v, list) else v
                      for k, v in config.model.to_dict().items()}
  assert back_cfg["window_sizes"] == (7, 7) and back_cfg["dtype"] == "bfloat16"
  assert settings == weights.settings_from_config(config)
  for (p, a), (_, b) in zip(weights.model_arrays(model).items(),
                            weights.model_arrays(back).items()):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


def test_plain_kdiffusion_checkpoint_gets_its_defaults(kdiff):
  """A checkpoint that k-diffusion wrote: σs from its config (k-diffusion's defaults if unset)."""
  _, _, settings = convert.model_from_kdiffusion(kdiff.path("hdit_weights.safetensors"),
                                                 with_settings=True)
  model = kdiff.json("hdit_config.json")["kdiffusion_config"]["model"]
  assert settings["diffusion"]["sigma_data"] == model.get("sigma_data", 1.0)
  assert settings["sampling"]["sigma_max"] == model.get("sigma_max", 80.0)


def test_damaged_and_foreign_files_are_named(tmp_path, kdiff):
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x00" * 100)
  with pytest.raises(ValueError, match="not a readable safetensors"):
    weights.load_weights(str(bad))
  with pytest.raises(ValueError, match="not an hdit-jax weight file"):
    weights.load_weights(kdiff.path("hdit_weights.safetensors"))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    weights.load_weights(str(tmp_path / "nowhere.safetensors"))
