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
  data = np.load(tmp_path / "samples.npz")
  assert data["images"].shape == (5, 32, 64, 3) and data["images"].dtype == np.uint8
  np.testing.assert_array_equal(data["labels"], [1, 2, 1, 2, 1])
  assert data["images"].std() > 0
  grid = Image.open(tmp_path / "samples.png")
  assert grid.size == (3 * (64 + 2) + 2, 2 * (32 + 2) + 2)


def test_sample_cli_refuses_bad_sizes(kdiff, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "hdit_jax.sample", f"--kdiffusion={kdiff.path('hdit_weights.safetensors')}",
       "--num_images=1", "--steps=2", "--image_size=36,64", f"--out={tmp_path}"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode != 0 and "multiple of 8" in result.stderr
