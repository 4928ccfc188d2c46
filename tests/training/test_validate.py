"""Invalid configs fail before anything is compiled, with an error naming the problem."""

import pathlib
import subprocess
import sys

import pytest

from hdit_jax.config import ABLATION_LADDER, ABLATION_SIDE
from hdit_jax.training.validate import validate_config
from test_training import load_config, tiny_config

ROOT = pathlib.Path(__file__).parent.parent.parent
ABLATION_VARIANTS = ABLATION_LADDER + ABLATION_SIDE


@pytest.mark.parametrize("name, arg", [("imagenet256", None), ("ffhq1024", None),
                                       ("quickstart", None), ("imagenet128_ablation", "dit_b4"),
                                       ("imagenet128_ablation", "shifted_window"),
                                       *[("mnist_ablation", v) for v in ABLATION_VARIANTS]])
def test_shipped_configs_are_valid(name, arg):
  config = load_config(ROOT / "configs" / f"{name}.py", arg)
  if config.data.source == "folder":   # FFHQ's images: the user's folder (refused when unset)
    with pytest.raises(ValueError, match="needs data.name"):
      validate_config(config, num_devices=8)
    config.data.name = "/data/ffhq"
  validate_config(config, num_devices=8)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.model.update(input_size=(18, 18)), "multiple of"),
    (lambda c: c.model.update(kernel_sizes=(11, 3)), "larger than"),
    (lambda c: c.data.update(image_size=32), "data.image_size"),
    (lambda c: c.data.update(batch_size=12), "cannot be split"),
    (lambda c: c.training.update(grad_accum_steps=3), "cannot be split"),
    (lambda c: c.mesh.update(data=3), "devices"),
    (lambda c: c.mesh.update(data=-1, fsdp=-1), "at most one axis"),
    (lambda c: c.diffusion.update(loss_weighting="min-snr"), "loss_weighting"),
    (lambda c: c.diffusion.sigma_density.update(type="gamma"), "sigma_density"),
    (lambda c: c.model.update(widths=(16, 30)), "multiple of d_heads"),
    (lambda c: c.model.update(depths=(1, 1, 1)), "model.widths has 2 entries"),
    (lambda c: c.data.update(source="s3"), "data.source"),
    (lambda c: c.data.update(fit="stretch"), "data.fit"),
    (lambda c: c.data.update(source="prepared", name=""), "needs data.name"),
    (lambda c: c.data.update(prefetch_buffer=0), "data.prefetch_buffer"),
    (lambda c: (c.model.update(num_classes=1000), c.evaluation.update(metric="digits")),
     "scores the 10 digit classes"),
])
def test_invalid_configs(change, message):
  config = tiny_config()
  change(config)
  with pytest.raises(ValueError, match=message):
    validate_config(config, num_devices=8)


def test_unknown_keys_are_named():
  config = tiny_config()
  with config.unlocked():
    config.optimizer.learning_rate = 1e-3
    config.typo_section = 1
  with pytest.raises(ValueError, match=r"optimizer.learning_rate.*typo_section|typo_section.*optimizer.learning_rate"):
    validate_config(config, num_devices=8)


@pytest.mark.parametrize("key, name, backend, message", [
    ("attention_implementation", "natten", "gpu", "is not one of"),
    ("qk_implementation", "triton", "gpu", "is not one of"),
    ("attention_implementation", "pallas_tpu", "gpu", "runs on TPUs"),
    ("attention_implementation", "mosaic_gpu", "cpu", "runs on GPUs"),
    ("qk_implementation", "mosaic_gpu", "tpu", "runs on GPUs"),
])
def test_kernel_choices_are_checked(key, name, backend, message):
  config = tiny_config()
  config.model[key] = name
  with pytest.raises(ValueError, match=message):
    validate_config(config, num_devices=8, backend=backend)


@pytest.mark.parametrize("key, name, backend", [
    ("attention_implementation", "", "cpu"), ("attention_implementation", "xla", "tpu"),
    ("attention_implementation", "pallas_tpu", "tpu"), ("qk_implementation", "mosaic_gpu", "gpu"),
    ("qk_implementation", "xla", "cpu")])
def test_kernel_choices_for_their_backend_pass(key, name, backend):
  config = tiny_config()
  config.model[key] = name
  validate_config(config, num_devices=8, backend=backend)


def test_unknown_override_on_the_command_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "hdit_jax.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path}", "--config.optimizer.learnin_rate=3"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode != 0 and "learnin_rate" in result.stderr


def test_a_kernel_for_another_backend_is_a_one_line_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "hdit_jax.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path}", "--config.model.qk_implementation=mosaic_gpu"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode != 0 and "model.qk_implementation 'mosaic_gpu' runs on GPUs" in \
      result.stderr
  assert "Traceback" not in result.stderr
