"""The ablation ladders: each rung changes one thing, and the ladder benchmark reports them."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hdit_jax import flops
from hdit_jax.config import ABLATION_LADDER, ABLATION_SIDE, ablation_model

ROOT = pathlib.Path(__file__).parent.parent


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _row(config) -> dict:
  return {**config.model.to_dict(), "loss_weighting": config.diffusion.loss_weighting}


def _changed(a: dict, b: dict) -> set:
  return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


# Each variant against the one it is compared with, and what may differ between the two.
STEPS = [("hourglass", "natten", {"attention"}),
         ("natten", "geglu", {"feed_forward", "d_ffs"}),
         ("geglu", "rope", {"position_embedding"}),
         ("rope", "soft_min_snr", {"loss_weighting"}),
         ("soft_min_snr", "shifted_window", {"attention"}),
         ("soft_min_snr", "skip_add", {"skip"}),
         ("soft_min_snr", "skip_concat", {"skip"})]


@pytest.mark.parametrize("name", ["imagenet128_ablation", "mnist_ablation"])
def test_each_rung_changes_one_thing(name):
  module = _load(ROOT / "configs" / f"{name}.py")
  rows = {v: _row(module.get_config(v)) for v in ABLATION_LADDER + ABLATION_SIDE}
  for before, after, expected in STEPS:
    assert _changed(rows[before], rows[after]) == expected, (before, after)
  assert rows["dit_b4"]["type"] == "dit" and rows["hourglass"]["type"] == "hdit"
  assert rows["hourglass"]["attention"] == ("shifted-window", "global")
  assert (rows["hourglass"]["feed_forward"], rows["hourglass"]["position_embedding"],
          rows["hourglass"]["loss_weighting"]) == ("gelu", "sincos", "snr")
  assert (rows["soft_min_snr"]["attention"], rows["soft_min_snr"]["feed_forward"],
          rows["soft_min_snr"]["position_embedding"], rows["soft_min_snr"]["skip"],
          rows["soft_min_snr"]["loss_weighting"]) == (
              ("neighborhood", "global"), "geglu", "rope", "lerp", "soft-min-snr")
  assert rows["skip_concat"]["skip"] == "concat" and rows["skip_add"]["skip"] == "add"
  # The hourglass costs a fraction of the DiT it replaces (31.4 / 106.4 GMACs in the paper).
  gmacs = {v: flops.count(module.get_config(v).model)["gmacs_per_image"] for v in rows}
  assert all(0.2 < gmacs[v] / gmacs["dit_b4"] < 0.35 for v in rows if v != "dit_b4"), gmacs
  with pytest.raises(ValueError, match="unknown ablation variant"):
    module.get_config("natten_v2")


def test_ablation_model_leaves_the_callers_fields_alone():
  fields = dict(depths=(1, 1), widths=(16, 32), d_ffs=(64, 128), num_classes=3)
  model, weighting = ablation_model("geglu", None, **fields)
  assert fields == dict(depths=(1, 1), widths=(16, 32), d_ffs=(64, 128), num_classes=3)
  assert (model.d_ffs, model.feed_forward, weighting) == ((), "geglu", "snr")
  assert ablation_model("dit_b4", "the dit", **fields) == ("the dit", "snr")


@pytest.fixture(name="ablation")
def _ablation():
  return _load(ROOT / "benchmarks" / "ablation.py")


def test_run_configs(ablation):
  config = ablation.run_config("skip_concat@3", 40)
  assert config.seed == 3 and config.model.skip == "concat"
  assert (config.training.num_steps, config.evaluation.every, config.training.sample_every) == (
      40, 20, 40)
  assert ablation.parse_run("dit_b4") == ("dit_b4", 0)
  assert set(ablation.DEFAULT_RUNS) >= set(ABLATION_LADDER + ABLATION_SIDE)
  assert [r for r in ablation.DEFAULT_RUNS if "@" in r] == ["dit_b4@1", "soft_min_snr@1"]


def _fake_run(root: pathlib.Path, run: str, fd: float, accuracy: float, seed: int):
  workdir = root / run.replace("@", "_seed")
  (workdir / "samples").mkdir(parents=True)
  rng = np.random.default_rng(seed)
  for step in (10, 20):
    Image.fromarray(rng.integers(0, 256, (64, 160), dtype=np.uint8)).save(
        workdir / "samples" / f"{step:08d}.png")
  finals = {"1.0": {"digits_fd": fd, "digits_class_accuracy": accuracy},
            "2.0": {"digits_fd": fd * 2, "digits_class_accuracy": accuracy + 0.01}}
  result = dict(run=run, variant=run.split("@")[0], seed=seed, params=3_210_000,
                gmacs_per_image=0.227, steps=20, batch_size=64, images_seen=1280,
                loss_weighting="snr", final_loss=0.0123, losses=[[20, 0.0123]],
                evaluations=[], finals=finals, step_seconds_alone=0.0105,
                train_seconds_alone=0.21, train_wall_seconds_shared=3.4, device="Fake GPU 9",
                jax="0.0", evaluation={"sampler": "dpmpp_2m", "steps": 25, "num_samples": 2000})
  (workdir / "result.json").write_text(json.dumps(result))


def test_report_tables_and_pictures_every_run(tmp_path, ablation):
  part1, part2 = tmp_path / "part1", tmp_path / "part2"
  _fake_run(part1, "soft_min_snr", 12.34, 0.876, 0)
  _fake_run(part1, "dit_b4@1", 45.6, 0.5, 1)
  _fake_run(part2, "dit_b4", 40.0, 0.55, 2)
  (part2 / "natten").mkdir()   # unfinished: no result.json
  out = tmp_path / "out"
  subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "report",
                  f"--workdir={part1}", f"--workdir={part2}", f"--out={out}"], check=True,
                 capture_output=True)
  rows = [line for line in (out / "ablation_Fake_GPU_9.md").read_text().splitlines()
          if line.startswith("| ") and not line.startswith("| run")]
  assert [r.split(" | ")[0] for r in rows] == ["| dit_b4", "| dit_b4@1", "| soft_min_snr"]
  assert "12.3 / 0.876" in rows[2] and "24.7 / 0.886" in rows[2] and "10.5" in rows[2]
  assert len(json.loads((out / "ablation_Fake_GPU_9.json").read_text())) == 3
  sheet = Image.open(out / "ablation_Fake_GPU_9.png")
  assert sheet.size == (4 * (320 + 8), 1 * (128 + 28 + 8))
  # The last grid of each run is pasted (scaled 2x) below its label.
  last = np.asarray(Image.open(part1 / "soft_min_snr" / "samples" / "00000020.png"))
  pasted = np.asarray(sheet)[28:28 + 128, 2 * 328:2 * 328 + 320]
  np.testing.assert_array_equal(pasted[::2, ::2], last)


def test_learning_at_scale_table():
  scale = _load(ROOT / "benchmarks" / "learning_at_scale.py")
  metrics = [dict(step=s, loss=l, images_per_second=300.0 + s, mfu=0.37, batch_size=64)
             for s, l in ((20, 0.05), (40, 0.03), (60, 0.02), (80, 0.01))]
  evaluations = [dict(step=40, digits_fd=200.0, digits_class_accuracy=0.1),
                 dict(step=80, digits_fd=50.0, digits_class_accuracy=0.75)]
  rows = scale.table(metrics, evaluations).splitlines()[2:]
  assert rows == ["| 40 | 2,560 | 0.0400 | 340 | 37.0% | 200.0 | 0.100 |",
                  "| 80 | 5,120 | 0.0150 | 380 | 37.0% | 50.0 | 0.750 |"]
  config = scale.scale_config(type("Args", (), dict(batch=8, steps=30, eval_every=10,
                                                    eval_samples=50))())
  assert (config.model.num_classes, config.model.widths) == (10, (384, 768, 1536))
  assert (config.data.source, config.data.image_size, config.data.batch_size) == (
      "embedded", 256, 8)
  assert (config.evaluation.metric, config.evaluation.every) == ("digits", 10)


@pytest.mark.slow
def test_the_ladder_benchmark_trains_scores_and_resumes(tmp_path, digit_classifier_dir):
  """One rung, a few steps: stopped at once by its time limit, then finished by the same
  command, then left alone by it; its result holds the scores and a step time."""
  command = [sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "run",
             f"--workdir={tmp_path}", "--runs=skip_add@2", "--steps=2", "--eval_samples=8",
             f"--classifier={digit_classifier_dir / 'digit_classifier.safetensors'}"]
  stopped = subprocess.run(command + ["--minutes=0"], capture_output=True, text=True,
                           timeout=600)
  assert stopped.returncode == 1 and "0 of 1 runs finished" in stopped.stdout
  finished = subprocess.run(command, capture_output=True, text=True, timeout=1200)
  assert finished.returncode == 0, finished.stdout + finished.stderr
  result = json.loads((tmp_path / "skip_add_seed2" / "result.json").read_text())
  assert (result["seed"], result["steps"], result["images_seen"]) == (2, 2, 128)
  assert set(result["finals"]) == {"1.0", "2.0"} and result["step_seconds_alone"] > 0
  assert [e["step"] for e in result["evaluations"]] == [1, 2]
  again = subprocess.run(command, capture_output=True, text=True, timeout=60)
  assert again.returncode == 0 and "1 of 1 runs finished" in again.stdout
