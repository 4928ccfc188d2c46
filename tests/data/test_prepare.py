"""`python -m hdit_jax.prepare_data`: an image folder into array_record shards, read back by the
training pipeline, resumable, local and on gs:// (a local GCS emulator)."""

import hashlib
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hdit_jax.data import prepare, sources, transforms
from hdit_jax.data.embedded import load_embedded

ROOT = pathlib.Path(__file__).parent.parent.parent
TINY_CONFIG = ROOT / "tests" / "training" / "tiny_config.py"


def digit_folder(root: pathlib.Path, per_class: int = 6, corrupt: bool = True,
                 nested: bool = True) -> None:
  """Real digits as root/<label>/<n>.png; some in a nested folder of their class, one file
  that is not an image."""
  images, labels, _ = load_embedded("mnist")
  rng = np.random.default_rng(0)
  for label in range(10):
    chosen = rng.choice(np.flatnonzero(labels == label), per_class, replace=False)
    for k, i in enumerate(chosen):
      folder = root / str(label) / ("deeper" if nested and k % 3 == 0 else "")
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(images[i][..., 0]).save(folder / f"{i}.png")
  if corrupt:
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but truncated")


def expected_records(root: str, channels: int, size: int) -> list[tuple[int, str]]:
  """(label, hash of the fitted pixels) of every readable image, computed without the preparer."""
  files, _ = sources.list_image_folder(root)
  found = []
  for path, label in files:
    try:
      image = sources.decode_image(path, channels)
    except Exception:  # pylint: disable=broad-except
      continue
    found.append((label, _digest(transforms.resize_center_crop(image, size))))
  return sorted(found)


def _digest(image: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(image, np.uint8).tobytes()).hexdigest()


def read_back(directory: str, split: str = "train") -> list[tuple[int, str]]:
  source = sources.PreparedSource(directory, split)
  return sorted((int(source[i]["label"]), _digest(source[i]["image"]))
                for i in range(len(source)))


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "hdit_jax.prepare_data", *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_prepare_a_digit_folder_and_resume(tmp_path):
  digit_folder(tmp_path / "digits")
  out = tmp_path / "prepared"
  args = (f"--input={tmp_path / 'digits'}", f"--output={out}", "--image_size=32",
          "--shards=3", "--processes=2")
  done = run_cli(*args)
  assert done.returncode == 0, done.stderr
  assert "prepared 60 images of 61 (1 unreadable, skipped) into 3 shards" in done.stdout
  assert "broken.png" in done.stderr

  expected = expected_records(str(tmp_path / "digits"), 3, 32)
  assert len(expected) == 60
  assert read_back(str(out)) == expected   # every image, its label, its pixels (PNG: lossless)
  info = json.loads((out / "dataset_info.json").read_text())
  lengths = [int(n) for n in info["splits"][0]["shardLengths"]]
  assert sum(lengths) == 60 and len(lengths) == 3 and min(lengths) >= 19
  summary = json.loads((out / "preparation.json").read_text())
  assert summary["class_names"] == [str(i) for i in range(10)]
  split = summary["splits"]["train"]
  assert (split["num_images"], split["num_skipped"], split["image_size"]) == (60, 1, 32)
  assert split["skipped"][0][0].endswith("broken.png")
  source = sources.PreparedSource(str(out), "train")
  assert source.num_classes == 10 and source.class_names == summary["class_names"]

  # Interrupted after two shards: only the third is written again.
  third = prepare.shard_path(out, "train", 2, 3)
  (out / ".parts" / "train" / "shard-00002.json").unlink()
  third.unlink()
  (out / "dataset_info.json").unlink()
  kept = {p: p.stat().st_mtime_ns for p in (prepare.shard_path(out, "train", s, 3)
                                            for s in (0, 1))}
  done = run_cli(*args)
  assert done.returncode == 0, done.stderr
  assert {p: p.stat().st_mtime_ns for p in kept} == kept and third.exists()
  assert read_back(str(out)) == expected

  # A shard lost after its record was written is found and written again; the same input by
  # another spelling of its path is the same input.
  third.unlink()
  done = run_cli(f"--input={tmp_path / 'digits'}/", f"--output={out}", "--image_size=32",
                 "--shards=3", "--processes=2")
  assert done.returncode == 0, done.stderr
  assert third.exists() and read_back(str(out)) == expected

  # Other settings into the same output are refused in one line, and nothing is written.
  before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
  done = run_cli(f"--input={tmp_path / 'digits'}", f"--output={out}", "--image_size=16",
                 "--shards=3")
  assert done.returncode == 2 and "image_size" in done.stderr
  assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0
  assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_a_second_split_and_a_flat_folder(tmp_path):
  digit_folder(tmp_path / "train", per_class=2, corrupt=False)
  digit_folder(tmp_path / "val", per_class=1, corrupt=False, nested=False)
  for split, folder in (("train", "train"), ("validation", "val")):
    prepare.prepare(prepare.Settings(input=str(tmp_path / folder), split=split, image_size=28,
                                     channels=1), str(tmp_path / "o"))
  assert len(sources.PreparedSource(str(tmp_path / "o"), "train")) == 20
  val = sources.PreparedSource(str(tmp_path / "o"), "validation")
  assert len(val) == 10 and sorted(int(val[i]["label"]) for i in range(10)) == list(range(10))
  assert val[0]["image"].shape == (28, 28, 1)
  with pytest.raises(ValueError, match="no split 'test'"):
    sources.PreparedSource(str(tmp_path / "o"), "test")
  # A split of other classes is refused before any of it is written.
  (tmp_path / "three").mkdir()
  for name in ("x", "y", "z"):
    shutil.copytree(tmp_path / "val" / "0", tmp_path / "three" / name)
  with pytest.raises(prepare.PreparationError, match="other classes"):
    prepare.prepare(prepare.Settings(input=str(tmp_path / "three"), split="test", image_size=28,
                                     channels=1), str(tmp_path / "o"))
  assert not list((tmp_path / "o").glob("*-test.*")) and not (tmp_path / "o/.parts/test").exists()

  flat = tmp_path / "faces"
  flat.mkdir()
  rng = np.random.default_rng(1)
  for i in range(5):   # FFHQ's layout: no class folders, images of other sizes
    Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), np.uint8)).save(flat / f"{i}.jpg")
  summary = prepare.prepare(prepare.Settings(input=str(flat), image_size=32, encoding="jpeg"),
                            str(tmp_path / "f"))
  assert summary["num_images"] == 5
  faces = sources.PreparedSource(str(tmp_path / "f"), "train")
  assert faces.num_classes == 0 and faces[4]["label"] == 0 and faces[4]["image"].shape == (32, 32, 3)


@pytest.mark.bad_input
def test_unusable_input_is_refused_before_any_work(tmp_path):
  digit_folder(tmp_path / "digits", per_class=1, corrupt=False, nested=False)
  digit_folder(tmp_path / "gap", per_class=1, corrupt=False, nested=False)
  (tmp_path / "a_file").write_text("not a directory")
  (tmp_path / "gap" / "empty_class").mkdir()
  for args, words in [
      ((f"--input={tmp_path / 'nowhere'}",), "image folder not found"),
      ((f"--input={tmp_path / 'gap'}",), "empty_class has no images"),
      ((f"--input={tmp_path / 'digits'}", "--channels=4"), "--channels must be 1 or 3"),
      ((f"--input={tmp_path / 'digits'}", "--shards=500"), "use at most 10"),
      ((f"--input={tmp_path / 'digits'}", "--image_size=-1"), "--image_size must be positive"),
      ((f"--input={tmp_path / 'digits'}", f"--output={tmp_path / 'digits' / 'p'}"),
       "is inside --input"),
      ((f"--input={tmp_path / 'digits'}", f"--output={tmp_path / 'a_file'}"), "is a file"),
      ((f"--input={tmp_path / 'digits'}", "stray"), "unexpected arguments: stray"),
  ]:
    if not any(a.startswith("--output") for a in args):
      args += (f"--output={tmp_path / 'out'}",)
    done = run_cli(*args)
    assert done.returncode == 2 and words in done.stderr, (args, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "out" / "dataset_info.json").exists()
  assert not (tmp_path / "digits" / "p").exists()


def test_training_reads_a_prepared_folder(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import trainer  # pylint: disable=import-outside-toplevel
  digit_folder(tmp_path / "digits", per_class=4)
  prepare.prepare(prepare.Settings(input=str(tmp_path / "digits"), image_size=16, channels=1,
                                   shards=2), str(tmp_path / "prepared"))
  spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.update(source="prepared", name=str(tmp_path / "prepared"), augment_prob=0.0)
  config.training.update(num_steps=2, checkpoint_every=2)
  config.mesh.update(data=1)
  trainer.train(config, str(tmp_path / "run"), jax.devices()[:1])
  logged = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2] and np.isfinite(logged[-1]["loss"])
  assert logged[-1]["data_unreadable_total"] == 0   # the broken file was left out at preparation


def test_decoding_converts_what_folders_hold(tmp_path):
  """Grayscale, RGBA, palette and 16-bit files all decode to uint8 of the asked channels."""
  rng = np.random.default_rng(2)
  gray16 = rng.integers(0, 65536, (9, 7), dtype=np.uint16)
  Image.fromarray(gray16).save(tmp_path / "deep.png")
  got = sources.decode_image(str(tmp_path / "deep.png"), 1)
  np.testing.assert_array_equal(got[..., 0], np.round(gray16 / 65535 * 255).astype(np.uint8))
  rgba = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
  Image.fromarray(rgba).save(tmp_path / "alpha.png")
  np.testing.assert_array_equal(sources.decode_image(str(tmp_path / "alpha.png"), 3),
                                rgba[..., :3])
  gray = rng.integers(0, 256, (4, 3), dtype=np.uint8)
  Image.fromarray(gray).save(tmp_path / "gray.png")
  np.testing.assert_array_equal(sources.decode_image(str(tmp_path / "gray.png"), 3),
                                np.repeat(gray[..., None], 3, -1))
  Image.fromarray(gray).convert("P").save(tmp_path / "palette.gif")
  assert sources.decode_image(str(tmp_path / "palette.gif"), 3).shape == (4, 3, 3)


@pytest.mark.gcs
def test_prepare_from_and_to_gcs(gcs_bucket, tmp_path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  digit_folder(tmp_path / "digits", per_class=1, nested=True)
  remote_input = epath.Path(gcs_bucket) / "raw"
  for path in (tmp_path / "digits").rglob("*.png"):
    (remote_input / path.relative_to(tmp_path / "digits")).parent.mkdir(parents=True,
                                                                         exist_ok=True)
    (remote_input / path.relative_to(tmp_path / "digits")).write_bytes(path.read_bytes())
  folder = sources.ImageFolderSource(str(remote_input))
  assert len(folder) == 11 and folder.class_names == [str(i) for i in range(10)]

  summary = prepare.prepare(prepare.Settings(input=str(remote_input), image_size=32, shards=2),
                            f"{gcs_bucket}/prepared")
  assert (summary["num_images"], summary["num_skipped"]) == (10, 1), summary["skipped"][:2]
  assert read_back(f"{gcs_bucket}/prepared") == expected_records(str(tmp_path / "digits"), 3, 32)


def test_evaluation_reads_a_prepared_dataset(tmp_path):
  from hdit_jax.evaluation import inputs  # pylint: disable=import-outside-toplevel
  digit_folder(tmp_path / "digits", per_class=1, corrupt=False)
  prepare.prepare(prepare.Settings(input=str(tmp_path / "digits"), image_size=28),
                  str(tmp_path / "prepared"))
  found = inputs.read_set(str(tmp_path / "prepared"))
  images = np.concatenate(list(found.batches(4)))
  assert found.num_images == 10 and images.shape == (10, 28, 28, 3)
  folder = np.concatenate(list(inputs.read_set(str(tmp_path / "digits")).batches(4)))
  assert sorted(map(_digest, images)) == sorted(map(_digest, folder))
