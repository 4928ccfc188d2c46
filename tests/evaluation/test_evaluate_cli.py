"""`python -m hdit_jax.evaluate`: features of an image folder or npz, FID between any two sets."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import rel_l2
from fid_fixture import fixture, state_dict, weights_path  # noqa: F401  pylint: disable=unused-import
from hdit_jax.evaluation import inputs, metrics
from hdit_jax.sampling.files import NpzStreamWriter

ROOT = pathlib.Path(__file__).parents[2]


def run(*args):
  return subprocess.run([sys.executable, "-m", "hdit_jax.evaluate", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=900)


def smallest_set(tensors):
  name = min((k for k in tensors if k.startswith("images_")), key=lambda k: len(tensors[k]))
  return tensors[name], tensors["features_" + name[len("images_"):]]


def test_features_of_a_folder_match_pytorch_fid(fixture, weights_path, tmp_path):
  meta, tensors = fixture
  images, expected = smallest_set(tensors)
  folder = tmp_path / "images" / "nested"
  folder.mkdir(parents=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f"{i:03d}.png")
  out, stats = tmp_path / "features.npz", tmp_path / "stats.npz"
  result = run("features", f"--inception_weights={weights_path}",
               f"--images={tmp_path / 'images'}", f"--out={out}", f"--save_stats={stats}")
  assert result.returncode == 0, result.stderr[-3000:]
  got = np.load(out)["features"]
  assert rel_l2(got, expected) <= meta["tolerances"]["features_rel_l2"]
  with np.load(stats) as s:
    mu, sigma = metrics.statistics(got)
    np.testing.assert_allclose(s["mu"], mu)
    np.testing.assert_allclose(s["sigma"], sigma)


def test_fid_between_feature_and_statistics_files(tmp_path):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(300, 6)), rng.normal(0.3, 1.2, size=(200, 6))
  inputs.save_features(str(tmp_path / "a.npz"), a)
  inputs.save_features(str(tmp_path / "b.npz"), b)
  result = run("fid", f"--samples={tmp_path / 'b.npz'}", f"--reference={tmp_path / 'a.npz'}",
               "--json", "--precision_recall", f"--save_stats={tmp_path / 'ref_stats.npz'}")
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  expected = metrics.all_metrics(a.astype(np.float32), b.astype(np.float32),
                                 precision_recall=True)
  assert got.keys() == expected.keys()
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, rel=1e-9), key
  # The saved reference statistics give the same FID (KID needs features: left out).
  result = run("fid", f"--samples={tmp_path / 'b.npz'}",
               f"--reference={tmp_path / 'ref_stats.npz'}", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  again = json.loads(result.stdout.strip().splitlines()[-1])
  assert again == {"fid": pytest.approx(expected["fid"], rel=1e-9)}


def test_image_npz_is_read_in_chunks(tmp_path):
  images = np.random.default_rng(1).integers(0, 256, (10, 5, 7, 3), dtype=np.uint8)
  writer = NpzStreamWriter(str(tmp_path / "s.npz"), images.shape)
  for chunk in (images[:4], images[4:9], images[9:]):
    writer.write(chunk)
  writer.close(np.arange(10))
  found = inputs.read_set(str(tmp_path / "s.npz"))
  assert found.num_images == 10
  assert [len(b) for b in found.batches(4)] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate(list(found.batches(3))), images)
  with np.load(tmp_path / "s.npz") as data:
    np.testing.assert_array_equal(data["arr_0"], images)
    np.testing.assert_array_equal(data["arr_1"], np.arange(10))


def test_bad_inputs_are_named(tmp_path):
  (tmp_path / "x.npz").write_bytes(b"not a zip")
  result = run("fid", f"--samples={tmp_path / 'x.npz'}", f"--reference={tmp_path / 'none.npz'}")
  assert result.returncode == 2 and "does not exist" in result.stderr
  assert "Traceback" not in result.stderr
  result = run("fid", f"--samples={tmp_path / 'x.npz'}", f"--reference={tmp_path / 'x.npz'}")
  assert result.returncode == 2 and "not a readable .npz" in result.stderr
  np.savez(tmp_path / "other.npz", foo=np.zeros(3))
  with pytest.raises(ValueError, match="expected arr_0"):
    inputs.read_set(str(tmp_path / "other.npz"))
  np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    inputs.read_set(str(tmp_path / "f.npz"))
