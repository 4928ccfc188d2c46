"""`python -m hdit_jax.main` on a trained workdir: --mode=sample, evaluate and export."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np

from hdit_jax import weights
from hdit_jax.evaluation import digits
from hdit_jax.training.trainer import train

ROOT = pathlib.Path(__file__).parent.parent
TINY = ROOT / "tests" / "training" / "tiny_config.py"


def run_main(workdir, *args, config=TINY):
  return subprocess.run([sys.executable, "-m", "hdit_jax.main", f"--config={config}",
                         f"--workdir={workdir}", *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=900)


def tiny_workdir(tmp_path):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("tiny_config", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.training.update(num_steps=4, checkpoint_every=2)
  workdir = tmp_path / "run"
  train(config, str(workdir))
  return workdir


def test_sample_evaluate_export_from_a_workdir(tmp_path, digit_classifier_dir):
  workdir = tiny_workdir(tmp_path)
  grids = {p.name: p.read_bytes() for p in (workdir / "samples").glob("*")} \
      if (workdir / "samples").exists() else {}
  result = run_main(workdir, "--mode=sample", "--num_images=5", "--step=2")
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(workdir / "samples" / "samples_00000002_seed0.npz") as data:
    assert data["arr_0"].shape == (5, 16, 16, 1) and data["arr_1"].shape == (5,)
  assert (workdir / "samples" / "samples_00000002_seed0.png").exists()
  assert (workdir / "samples" / "samples_00000002_seed0.labels.txt").exists()
  for name, data in grids.items():   # training's grids are kept as they were
    assert (workdir / "samples" / name).read_bytes() == data, name

  shutil.copy(digit_classifier_dir / digits.FILENAME, workdir / digits.FILENAME)
  result = run_main(workdir, "--mode=evaluate", "--config.evaluation.metric=digits",
                    "--config.evaluation.num_samples=20", "--config.evaluation.steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  (record,) = [json.loads(line) for line in open(workdir / "eval.jsonl")]
  assert record["step"] == 4 and {"digits_fd", "digits_class_accuracy"} <= record.keys()

  result = run_main(workdir, "--mode=export")
  assert result.returncode == 0, result.stderr[-3000:]
  exported = workdir / "ema_00000004.safetensors"
  settings = weights.load_settings(str(exported))
  assert settings["diffusion"]["sigma_data"] == 0.6 and settings["sampling"]["sampler"] == "euler"

  # Training again: at the checkpoint's step there is nothing to do, and the closing line says
  # where everything is; below it, a one-line error instead of silently doing nothing.
  result = run_main(workdir, "--config.training.num_steps=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"trained to step 4: EMA weights {exported}" in result.stdout, result.stdout
  result = run_main(workdir, "--config.training.num_steps=3")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "is at step 4, past training.num_steps = 3" in result.stderr
  assert "Traceback" not in result.stderr
