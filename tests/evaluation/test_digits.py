"""The MNIST digit metric: split, classifier accuracy, cache, and what the FD tells apart.

One classifier is trained per test session (~30 s on 2 cores) into a temporary cache folder.
"""

import os

import numpy as np
import pytest

from hdit_jax.data.embedded import load_embedded
from hdit_jax.evaluation import digits


@pytest.fixture(scope="session")
def cache_dir(digit_classifier_dir) -> str:
  """The session's classifier (trained once, see tests/conftest.py)."""
  return str(digit_classifier_dir)


@pytest.fixture(scope="session")
def classifier(cache_dir) -> digits.DigitClassifier:
  return digits.load_or_train(cache_dir)


@pytest.fixture(scope="session")
def heldout():
  return digits.load_split("heldout")


@pytest.fixture(scope="session")
def floor(classifier):
  return digits.heldout_floor(classifier)


def _fail(*args, **kwargs):
  raise AssertionError("the classifier was retrained")


@pytest.fixture
def no_training(monkeypatch):
  monkeypatch.setattr(digits, "train_classifier", _fail)


def test_split_is_stratified_disjoint_and_complete():
  _, labels, _ = load_embedded("mnist")
  fit, held = digits.split_indices(labels)
  assert np.bincount(labels[fit], minlength=10).tolist() == [400] * 10
  assert np.bincount(labels[held], minlength=10).tolist() == [100] * 10
  assert not set(fit) & set(held)
  assert sorted(np.concatenate([fit, held])) == list(range(5000))
  again = digits.split_indices(labels)
  assert np.array_equal(fit, again[0]) and np.array_equal(held, again[1])
  assert not np.array_equal(held, digits.split_indices(labels, seed=1)[1])


def test_heldout_accuracy(classifier, heldout):
  acc = digits.accuracy(classifier, *heldout)  # recomputed, not the stored number
  assert acc >= 0.98
  assert acc == pytest.approx(classifier.heldout_accuracy, abs=1e-9)


def test_cache_is_reused(classifier, cache_dir, heldout, no_training):
  path = os.path.join(cache_dir, digits.FILENAME)
  assert os.listdir(cache_dir) == [digits.FILENAME]  # no temporary file left behind
  loaded = digits.load_or_train(cache_dir)
  assert loaded.heldout_accuracy == classifier.heldout_accuracy
  assert loaded.split_seed == digits.SPLIT_SEED
  images = heldout[0][:200]
  np.testing.assert_array_equal(loaded.features(images), classifier.features(images))
  assert os.path.getsize(path) > 0


def test_features_shape_and_batching(classifier, heldout):
  images = np.concatenate([heldout[0], heldout[0][:5]])  # 1,005: two batches, the last padded
  feats, preds = classifier.features_and_predictions(images)
  assert feats.shape == (1005, digits.FEATURES) and feats.dtype == np.float32
  assert preds.shape == (1005,) and preds.dtype == np.int32
  np.testing.assert_allclose(feats[1000:], feats[:5], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(classifier.features(images[:3]), feats[:3], rtol=1e-5, atol=1e-5)
  assert np.array_equal(classifier.predict(images[:3]), preds[:3])


def test_reference_statistics_cached(classifier):
  mu, sigma = digits.reference_statistics(classifier)
  assert mu.shape == (digits.FEATURES,) and sigma.shape == (digits.FEATURES,) * 2
  assert mu.dtype == np.float64
  assert digits.reference_statistics(classifier)[0] is mu


def test_heldout_metrics_match_floor(classifier, heldout, floor):
  got = digits.digit_metrics(classifier, *heldout)
  assert got["digits_class_accuracy"] == pytest.approx(classifier.heldout_accuracy, abs=1e-9)
  assert got["digits_fd"] == pytest.approx(floor["digits_fd"], rel=1e-6)
  assert 0 < floor["digits_fd"] < 2.0  # real digits, 1,000 of them: only sampling noise
  # Other real digits (half of the held-out set) stay within a few floors.
  half = digits.digit_metrics(classifier, heldout[0][::2])["digits_fd"]
  assert half < 4 * floor["digits_fd"]
  assert set(digits.digit_metrics(classifier, heldout[0])) == {"digits_fd"}


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # black: covariance 0
@pytest.mark.parametrize("kind", ["noise", "black"])
def test_garbage_scores_far_above_floor(classifier, heldout, floor, kind):
  rng = np.random.default_rng(0)
  images = (rng.integers(0, 256, (1000, 28, 28, 1), dtype=np.uint8) if kind == "noise"
            else np.zeros((1000, 28, 28, 1), np.uint8))
  got = digits.digit_metrics(classifier, images, heldout[1])  # balanced labels: chance is 0.1
  assert got["digits_fd"] > 100 * floor["digits_fd"]
  assert got["digits_class_accuracy"] <= 0.2


def test_mode_collapse_scores_far_above_floor(classifier, heldout, floor):
  images, labels = heldout
  for c in range(10):
    collapsed = np.tile(images[labels == c], (10, 1, 1, 1))  # 1,000 copies of 100 real digits
    got = digits.digit_metrics(classifier, collapsed, np.full(1000, c))
    assert got["digits_class_accuracy"] >= 0.9  # right class, but one class only
    assert got["digits_fd"] > 50 * floor["digits_fd"], c


@pytest.mark.parametrize("shape,dtype", [((4, 28, 28, 1), np.float32), ((4, 28, 28), np.uint8),
                                         ((4, 1, 28, 28), np.uint8), ((4, 32, 32, 1), np.uint8),
                                         ((4, 28, 28, 3), np.uint8)])
def test_bad_images_raise(classifier, shape, dtype):
  with pytest.raises(ValueError, match=r"expected uint8 images of shape \[N, 28, 28, 1\]"):
    classifier.features(np.zeros(shape, dtype))
  with pytest.raises(ValueError, match=r"expected uint8 images"):
    digits.digit_metrics(classifier, np.zeros(shape, dtype))


def test_bad_labels_raise(classifier, heldout):
  with pytest.raises(ValueError, match=r"labels: expected shape \[10\]"):
    digits.digit_metrics(classifier, heldout[0][:10], heldout[1][:9])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_cache_is_a_clear_error(classifier, cache_dir, tmp_path, no_training, damage):
  good = open(os.path.join(cache_dir, digits.FILENAME), "rb").read()
  data = {"garbage": b"not a safetensors file" * 10, "truncated": good[:len(good) // 2],
          "empty": b""}[damage]
  path = tmp_path / digits.FILENAME
  path.write_bytes(data)
  with pytest.raises(ValueError, match="delete it") as info:
    digits.load_or_train(str(tmp_path))
  assert str(path) in str(info.value)


def test_stale_cache_is_a_clear_error(tmp_path, no_training):
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  tensors = {"dense/kernel": np.zeros((3, 3), np.float32)}
  (tmp_path / digits.FILENAME).write_bytes(st_numpy.save(tensors, {"format_version": "1"}))
  with pytest.raises(ValueError, match="delete it"):
    digits.load_or_train(str(tmp_path))


def test_bad_classifier_is_not_cached(tmp_path, monkeypatch):
  seeds = []
  def weak(seed):
    seeds.append(seed)
    return digits.DigitClassifier(digits.init_model(seed), 0.5, train_seed=seed)
  monkeypatch.setattr(digits, "train_classifier", weak)
  with pytest.raises(RuntimeError, match="held-out accuracy 0.5000"):
    digits.load_or_train(str(tmp_path / "cache"))
  assert seeds == list(digits.TRAIN_SEEDS)
  assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


def test_weak_run_is_retried_with_the_next_seed(classifier, tmp_path, monkeypatch):
  weak = digits.DigitClassifier(digits.init_model(0), 0.5, train_seed=0)
  monkeypatch.setattr(digits, "train_classifier", lambda seed: weak if seed == 0 else classifier)
  assert digits.load_or_train(str(tmp_path)) is classifier
  monkeypatch.setattr(digits, "train_classifier", _fail)
  loaded = digits.load_or_train(str(tmp_path))
  assert loaded.heldout_accuracy == classifier.heldout_accuracy >= digits.MIN_ACCURACY
