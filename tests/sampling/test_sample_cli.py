"""The sampling CLI on the converted fixture model, and generation at another resolution."""

import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).parent.parent.parent


def test_sample_cli_writes_grid_and_npz(kdiff, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "hdit_jax.sample", f"--kdiffusion={kdiff.path('hdit_weights.safetensors')}",
       "--num_images=5", "--steps=3", "--sampler=dpmpp_2m", "--sigma_max=80",
       "--guidance_scale=1.5", "--labels=1,2", f"--out={tmp_path}", "--batch_size=3",
       "--image_size=32,64"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  data = np.load(tmp_path / "samples.npz")   # the ADM suite's layout: arr_0 images, arr_1 labels
  assert data["arr_0"].shape == (5, 32, 64, 3) and data["arr_0"].dtype == np.uint8
  np.testing.assert_array_equal(data["arr_1"], [1, 2, 1, 2, 1])
  assert data["arr_0"].std() > 0
  grid = Image.open(tmp_path / "samples.png")
  assert grid.size == (3 * (64 + 2) + 2, 2 * (32 + 2) + 2)
  assert (tmp_path / "samples.labels.txt").read_text().split("\n")[:2] == ["1 2 1", "2 1"]
  assert not list(tmp_path.glob("*.partial"))


def test_sample_cli_refuses_bad_sizes(kdiff, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "hdit_jax.sample", f"--kdiffusion={kdiff.path('hdit_weights.safetensors')}",
       "--num_images=1", "--steps=2", "--image_size=36,64", f"--out={tmp_path}"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode != 0 and "multiple of 8" in result.stderr


def test_weight_file_settings_are_used_without_flags(tmp_path):
  """The quickstart's case: σ_data 0.6162 and σ_max 80 come from the EMA export itself."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from hdit_jax import weights  # pylint: disable=import-outside-toplevel
  from hdit_jax.config import base_config, hdit_model  # pylint: disable=import-outside-toplevel
  from hdit_jax.models import build_model  # pylint: disable=import-outside-toplevel
  config = base_config()
  config.model = hdit_model(input_size=(8, 8), input_channels=1, patch_size=(2, 2),
                            depths=(1, 1), widths=(8, 16), d_heads=(8, 8), kernel_sizes=(3, 3),
                            mapping_width=8, mapping_depth=1, mapping_d_ff=16, num_classes=3)
  config.diffusion.update(sigma_data=0.6162, sigma_max=80.0)
  config.sampling.update(sampler="euler", steps=2)
  path = tmp_path / "ema.safetensors"
  weights.save_weights(build_model(config.model, rngs=nnx.Rngs(0)), config.model.to_dict(),
                       str(path), weights.settings_from_config(config))
  result = subprocess.run(
      [sys.executable, "-m", "hdit_jax.sample", f"--weights={path}", "--num_images=3",
       f"--out={tmp_path}", "--pngs"], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sampler='euler', steps=2" in result.stdout and "sigma_max=80.0" in result.stdout
  assert "sigma_data=0.6162" in result.stdout
  assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
      "000000.png", "000001.png", "000002.png"]
  assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (3, 8, 8, 1)
