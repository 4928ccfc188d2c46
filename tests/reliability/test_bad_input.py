"""Bad input, as a new user gives it, through every command line: each case exits with status 2
and one line that names the problem, prints no Python traceback, and writes nothing."""

import concurrent.futures
import hashlib
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).parent.parent.parent
TINY = ROOT / "tests" / "training" / "tiny_config.py"
sys.path.insert(0, str(TINY.parent))
from tiny_config import cli_xla_flags  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.bad_input
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")   # absl: I1201 20:10:30.138 ...


def _main(*args):
  return ("hdit_jax.main", f"--config={TINY}", *args)


def _cases(d: pathlib.Path):
  """(name, module and arguments, words the error must contain) over the files made in `d`."""
  work = f"--workdir={d / 'run'}"
  return [
      # main: the config and its overrides, refused before anything is compiled
      ("unknown key", _main(work, "--config.training.foo=1"),
       "--config.training.foo: the config has no key 'foo'"),
      ("missing config file", ("hdit_jax.main", f"--config={d / 'none.py'}", work),
       "no config file"),
      ("config file that is not Python", ("hdit_jax.main", f"--config={d / 'broken.py'}", work),
       "is not valid Python"),
      ("config file without get_config",
       ("hdit_jax.main", f"--config={d / 'no_get_config.py'}", work), "defines no get_config"),
      ("unknown config variant",
       ("hdit_jax.main", f"--config={ROOT / 'configs' / 'imagenet128_ablation.py'}:bogus", work),
       "unknown ablation variant 'bogus'"),
      ("no workdir", _main(), "--config and --workdir are required"),
      ("workdir that is a file", _main(f"--workdir={d / 'noise.bin'}"), "is a file"),
      ("workdir under a file", _main(f"--workdir={d / 'noise.bin' / 'run'}"),
       "cannot be created"),
      ("negative learning rate", _main(work, "--config.optimizer.lr=-1"),
       "optimizer.lr must be a positive number"),
      ("a GPU kernel on the CPU", _main(work, "--config.model.qk_implementation=mosaic_gpu"),
       "runs on GPUs"),
      ("unknown key in the config file",
       ("hdit_jax.main", f"--config={d / 'typo_config.py'}", work),
       "unknown config keys: ['training.num_step']"),
      ("wrong type", _main(work, "--config.training.num_steps=abc"), "num_steps"),
      ("zero steps", _main(work, "--config.training.num_steps=0"), "num_steps must be >= 1"),
      ("negative steps", _main(work, "--config.training.num_steps=-3"), "num_steps must be >= 1"),
      ("map not divisible", _main(work, "--config.model.input_size=(18, 18)"), "multiple of"),
      ("kernel larger than map", _main(work, "--config.model.kernel_sizes=(11, 3)"),
       "larger than"),
      ("mesh larger than devices", _main(work, "--config.mesh.data=3"), "devices"),
      ("unknown sampler", _main(work, "--config.sampling.sampler=eulerr"), "unknown sampler"),
      ("one-value guidance interval", _main(work, "--config.sampling.guidance_interval=(1.0,)"),
       "two noise levels"),
      ("guidance on an unconditional model",
       _main(work, "--config.model.num_classes=0", "--config.sampling.guidance_scale=2.0"),
       "guidance needs classes"),
      ("unknown data source", _main(work, "--config.data.source=s3"), "data.source"),
      ("prepared data without a path",
       _main(work, "--config.data.source=prepared", "--config.data.name="),
       "needs data.name"),
      ("missing image folder",
       _main(work, "--config.data.source=folder", f"--config.data.name={d / 'nowhere'}"),
       "image folder not found"),
      ("empty class folder",
       _main(work, "--config.data.source=folder", f"--config.data.name={d / 'gap'}"),
       "has no images"),
      ("more classes than the model has",
       _main(work, "--config.data.source=folder", f"--config.data.name={d / 'eleven'}"),
       "model.num_classes=11"),
      ("not a prepared dataset",
       _main(work, "--config.data.source=prepared", f"--config.data.name={d / 'eleven'}"),
       "holds no prepared dataset"),
      ("sample from a missing workdir", _main(f"--workdir={d / 'none'}", "--mode=sample"),
       "no checkpoints"),
      ("export from a missing workdir", _main(f"--workdir={d / 'none'}", "--mode=export"),
       "no checkpoints"),
      ("evaluate a missing workdir", _main(f"--workdir={d / 'none'}", "--mode=evaluate"),
       "no checkpoints"),
      ("sample with an unknown sampler",
       _main(f"--workdir={d / 'none'}", "--mode=sample", "--config.sampling.sampler=eulr"),
       "unknown sampler 'eulr'"),
      ("sample no images", _main(f"--workdir={d / 'none'}", "--mode=sample", "--num_images=0"),
       "--num_images must be at least 1"),
      # sample: a weight file and sampler flags
      ("missing weight file", ("hdit_jax.sample", f"--weights={d / 'missing.safetensors'}"),
       "missing.safetensors"),
      ("a weight file that is not one", ("hdit_jax.sample", f"--weights={d / 'noise.bin'}"),
       "noise.bin"),
      ("no images", ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}",
                     "--num_images=0"), "at least 1"),
      ("zero sampling steps", ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}",
                               "--steps=0"), "at least 1"),
      ("one-value guidance interval (sample)",
       ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}", "--guidance_interval=1.0"),
       "two noise levels"),
      ("label out of range", ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}",
                              "--labels=99"), "labels must be in"),
      ("size the model cannot take", ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}",
                                      "--image_size=17,17"), "17"),
      ("--out is a file", ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}",
                           f"--out={d / 'noise.bin'}"), "is a file, not a directory"),
      # a batch size below 1, refused before --out is made (the snapshot: no samples.npz.partial)
      ("negative batch size", ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}",
                               "--batch_size=-1", f"--out={d / 'out'}"),
       "--batch_size must be at least 1"),
      ("zero batch size", ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}",
                           "--batch_size=0", f"--out={d / 'out'}"),
       "--batch_size must be at least 1"),
      ("unknown sampler (sample)", ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}",
                                    "--sampler=eulr"), "--sampler=eulr: value should be one of"),
      ("guidance scale not a number",
       ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}", "--guidance_scale=x"),
       "--guidance_scale=x"),
      ("unknown flag (sample)", ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}",
                                 "--bogusflag=1"), "Unknown command line flag 'bogusflag'"),
      ("labels not numbers", ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}",
                              "--labels=a,b"), "--labels takes class numbers"),
      ("size not numbers", ("hdit_jax.sample", f"--weights={d / 'tiny.safetensors'}",
                            "--image_size=a,b"), "--image_size takes the height and width"),
      # convert
      ("a pickle without the flag",
       ("hdit_jax.convert", "import", f"--output={d / 'out.safetensors'}", str(d / 'ckpt.pth')),
       "--allow_pickle"),
      ("convert a missing file",
       ("hdit_jax.convert", "import", f"--output={d / 'out.safetensors'}",
        str(d / 'missing.safetensors')), "missing.safetensors"),
      # evaluate
      ("fid without a reference", ("hdit_jax.evaluate", "fid", f"--samples={d / 'x.npz'}"),
       "--reference"),
      ("features of a missing set", ("hdit_jax.evaluate", "features",
                                     "--inception_weights=w.pth", f"--images={d / 'nowhere'}",
                                     f"--out={d / 'f.npz'}"), "does not exist"),
      ("unknown subcommand", ("hdit_jax.evaluate", "fidd", f"--samples={d / 'x.npz'}",
                              f"--reference={d / 'x.npz'}"),
       "unknown subcommand 'fidd': use fid or features"),
      ("no subcommand", ("hdit_jax.evaluate",), "give a subcommand, fid or features"),
      ("unknown flag (evaluate)", ("hdit_jax.evaluate", "fid", "--bogusflag=1"),
       "Unknown command line flag 'bogusflag'"),
      # prepare_data
      ("prepare a missing folder", ("hdit_jax.prepare_data", f"--input={d / 'nowhere'}",
                                    f"--output={d / 'prep'}"), "image folder not found"),
  ]


def _make_inputs(d: pathlib.Path) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from hdit_jax import weights  # pylint: disable=import-outside-toplevel
  from hdit_jax.models import build_model  # pylint: disable=import-outside-toplevel
  from test_training import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(data=1)
  with jax.default_device(jax.devices("cpu")[0]):
    model = build_model(config.model, rngs=nnx.Rngs(0))
  weights.save_weights(model, config.model, str(d / "tiny.safetensors"),
                       weights.settings_from_config(config))
  (d / "noise.bin").write_bytes(os.urandom(1000))
  (d / "typo_config.py").write_text(
      "import importlib.util\n"
      f"spec = importlib.util.spec_from_file_location('tiny', {str(TINY)!r})\n"
      "tiny = importlib.util.module_from_spec(spec)\n"
      "spec.loader.exec_module(tiny)\n"
      "def get_config():\n"
      "  c = tiny.get_config()\n"
      "  c.training.num_step = 10\n"
      "  return c\n")
  (d / "broken.py").write_text("def get_config(:\n")
  (d / "no_get_config.py").write_text("x = 1\n")
  (d / "ckpt.pth").write_bytes(b"PK\x03\x04 a pickled checkpoint, as torch.save writes")
  rng = np.random.default_rng(0)
  for i in range(11):   # eleven classes of one 16x16 image
    (d / "eleven" / f"c{i:02d}").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (16, 16), np.uint8)).save(d / "eleven" / f"c{i:02d}" /
                                                                   "0.png")
  (d / "gap" / "a").mkdir(parents=True)
  Image.fromarray(rng.integers(0, 256, (16, 16), np.uint8)).save(d / "gap" / "a" / "0.png")
  (d / "gap" / "b").mkdir()


def _snapshot(d: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
          else "dir" for p in sorted(d.rglob("*"))}


def test_bad_input_is_refused_in_one_line(tmp_path):
  _make_inputs(tmp_path)
  cases = _cases(tmp_path)
  assert len(cases) >= 25
  before = _snapshot(tmp_path)
  env = dict(os.environ, XLA_FLAGS=cli_xla_flags(),
             JAX_PLATFORMS="cpu")

  def run(case):
    _, argv, _ = case
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(run, cases))
  wrong = []
  for (name, argv, words), done in zip(cases, results):
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    said = [l for l in lines if not _LOG_LINE.match(l)]   # less absl's log lines
    problems = []
    if done.returncode != 2:
      problems.append(f"exit status {done.returncode}")
    if "Traceback" in done.stderr:
      problems.append("a traceback")
    if len(said) != 1 or words not in said[0]:
      problems.append(f"not one line with {words!r}")
    if problems:
      wrong.append(f"{name} ({' '.join(argv[1:])}): {', '.join(problems)}\n"
                   + "\n".join(lines[-6:]))
  assert not wrong, "\n\n".join(wrong)
  assert _snapshot(tmp_path) == before   # nothing written, nothing created
