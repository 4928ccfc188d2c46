"""Parity of the NNX FID Inception with pytorch-fid, on any fixture folder of its format.

The fixture (folder from HDIT_FID_FIXTURES, see its README) holds images, their pool3 features
from pytorch-fid, and the rule that draws the (random) weights; every number, shape and key is
read from it. The weights go through a safetensors file and `load_inception`, the same path as
the real weight file.
"""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import numpy as st_numpy

from conftest import rel_l2
from fid_fixture import fixture, state_dict, weights_path  # noqa: F401  pylint: disable=unused-import
from hdit_jax.evaluation import inception_weights
from hdit_jax.evaluation.evaluator import features_of
from hdit_jax.evaluation.inception import (FEATURE_DIM, FID_WEIGHTS_URL, InceptionFeatures,
                                           load_inception, preprocess, resize_bilinear)


@pytest.fixture(scope="session")
def model(weights_path):
  return load_inception(weights_path)


@pytest.fixture(scope="session")
def extractor(model):
  return InceptionFeatures(model)


def image_sets(tensors) -> list[str]:
  return sorted(k[len("images_"):] for k in tensors if k.startswith("images_"))


@pytest.mark.parity
def test_features_match_pytorch_fid(fixture, extractor):
  meta, tensors = fixture
  tol = meta["tolerances"]["features_rel_l2"]
  errors = {}
  for name in image_sets(tensors):
    ref = tensors[f"features_{name}"]
    got = extractor(tensors[f"images_{name}"])
    assert got.shape == ref.shape == (len(tensors[f"images_{name}"]), FEATURE_DIM)
    assert got.dtype == np.float32
    errors[name] = rel_l2(got, ref)
  print("relative L2 per set:", errors)
  assert all(e <= tol for e in errors.values()), f"tolerance {tol}: {errors}"


def naive_torch_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """float64 per-pixel F.interpolate(mode='bilinear', align_corners=False) of [H, W, C]."""
  in_h, in_w = img.shape[:2]

  def source(dst, in_size, out_size):
    src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = int(np.floor(src))
    return i0, min(i0 + 1, in_size - 1), src - i0

  out = np.zeros((out_h, out_w, img.shape[2]))
  for y in range(out_h):
    y0, y1, ly = source(y, in_h, out_h)
    for x in range(out_w):
      x0, x1, lx = source(x, in_w, out_w)
      top = (1 - lx) * img[y0, x0] + lx * img[y0, x1]
      bottom = (1 - lx) * img[y1, x0] + lx * img[y1, x1]
      out[y, x] = (1 - ly) * top + ly * bottom
  return out


@pytest.mark.parametrize("in_hw, out_hw", [((7, 11), (13, 5)), ((12, 5), (5, 17)),
                                           ((9, 9), (9, 9)), ((1, 6), (4, 3))])
def test_resize_matches_torch_rule(in_hw, out_hw):
  img = np.random.default_rng(0).random((2,) + in_hw + (3,))
  got = np.asarray(resize_bilinear(jnp.asarray(img, jnp.float32), *out_hw))
  ref = np.stack([naive_torch_bilinear(im, *out_hw) for im in img])
  np.testing.assert_allclose(got, ref, atol=1e-6)


def test_resize_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  img = np.random.default_rng(1).random((2, 23, 37, 3)).astype(np.float32)
  for out_hw in ((299, 299), (10, 8)):
    ref = torch.nn.functional.interpolate(torch.from_numpy(img).permute(0, 3, 1, 2), size=out_hw,
                                          mode="bilinear", align_corners=False)
    got = np.asarray(resize_bilinear(jnp.asarray(img), *out_hw))
    # torch forms the source index in float32, here in float64: ~1 ulp of the index apart.
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_grey_equals_repeated_rgb(fixture, extractor):
  _, tensors = fixture
  # The fixture's smallest batch: two cheap forwards, reusing the parity test's compilation.
  name = min(image_sets(tensors), key=lambda n: (len(tensors[f"images_{n}"]),
                                                 tensors[f"images_{n}"].size))
  grey = tensors[f"images_{name}"][..., :1]
  rgb = np.repeat(grey, 3, axis=-1)
  np.testing.assert_array_equal(np.asarray(preprocess(jnp.asarray(grey))),
                                np.asarray(preprocess(jnp.asarray(rgb))))
  got = features_of(extractor, [grey])
  np.testing.assert_array_equal(got, extractor(rgb))


def test_missing_file_says_where_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
  assert FID_WEIGHTS_URL in str(info.value)
  assert inception_weights.CONVERT_COMMAND in str(info.value)


def test_mismatched_keys_are_named(state_dict, tmp_path):
  broken = dict(state_dict)
  dropped = sorted(broken)[len(broken) // 2]
  del broken[dropped]
  broken["Mixed_5b.branch9x9.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  reshaped = sorted(broken)[0]
  broken[reshaped] = broken[reshaped][..., None]
  path = tmp_path / "broken.safetensors"
  st_numpy.save_file(broken, str(path))
  with pytest.raises(ValueError) as info:
    load_inception(path)
  for key in (dropped, "Mixed_5b.branch9x9.conv.weight", reshaped):
    assert key in str(info.value)


def assert_same_weights(model_a, model_b):
  flat_a = dict(nnx.to_flat_state(nnx.state(model_a)))
  flat_b = dict(nnx.to_flat_state(nnx.state(model_b)))
  assert flat_a.keys() == flat_b.keys()
  for path, var in flat_a.items():
    np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(flat_b[path][...]))


def test_pth_and_its_conversion_load_the_same(state_dict, model, tmp_path):
  torch = pytest.importorskip("torch")
  # As in pytorch-fid's file: a classifier and batch-norm counters, which the loader skips.
  full = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  full["fc.weight"] = torch.zeros(3, FEATURE_DIM)
  full["fc.bias"] = torch.zeros(3)
  some_bn = next(k for k in state_dict if k.endswith(".bn.running_mean"))
  full[some_bn.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
  pth = tmp_path / inception_weights.PTH_NAME
  torch.save(full, pth)
  assert_same_weights(load_inception(pth), model)
  # The documented one-line conversion, run where the .pth is.
  subprocess.run([sys.executable, "-c", inception_weights.CONVERT_CODE], cwd=tmp_path, check=True)
  assert_same_weights(load_inception(tmp_path / inception_weights.SAFETENSORS_NAME), model)


@pytest.mark.gcs
def test_weights_on_gcs_load_the_same(weights_path, model, gcs_bucket):
  from etils import epath  # pylint: disable=import-outside-toplevel
  remote = epath.Path(gcs_bucket) / "weights" / inception_weights.SAFETENSORS_NAME
  remote.parent.mkdir(parents=True, exist_ok=True)
  remote.write_bytes(open(weights_path, "rb").read())
  assert_same_weights(load_inception(str(remote)), model)
  with pytest.raises(FileNotFoundError, match="not found"):
    load_inception(f"{gcs_bucket}/weights/missing.safetensors")
