"""Input pipeline: sources, corrupt images, determinism, augmentation, resumable iterators."""

import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from hdit_jax.config import base_config, hdit_model
from hdit_jax.data import sources, transforms
from hdit_jax.data.pipeline import make_loader


def folder_config(root, **data):
  c = base_config()
  c.model = hdit_model(input_size=(16, 16), input_channels=3, patch_size=(2, 2), depths=(1,),
                       widths=(16,), d_heads=(8,), num_classes=3)
  c.data.update(source="folder", name=str(root), image_size=16, batch_size=4, num_workers=0)
  c.data.update(**data)
  return c


def make_folder(root: pathlib.Path, corrupt: int = 0):
  rng = np.random.default_rng(0)
  for label, name in enumerate(("cat", "dog", "eel")):
    (root / name).mkdir(parents=True)
    for i in range(4):
      size = (20 + i, 24) if i % 2 else (24, 20)
      Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(
          root / name / f"{i}.png")
  for i in range(corrupt):
    (root / "dog" / f"broken{i}.jpg").write_bytes(b"not an image at all")


def test_image_folder_labels_and_shapes(tmp_path):
  make_folder(tmp_path)
  source = sources.ImageFolderSource(str(tmp_path))
  assert source.class_names == ["cat", "dog", "eel"] and len(source) == 12
  loader, num_classes = make_loader(folder_config(tmp_path), seed=0, num_epochs=1)
  batches = list(loader)
  assert num_classes == 3 and len(batches) == 3
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
  assert batches[0]["image"].shape == (4, 16, 16, 3)
  assert batches[0]["image"].dtype == np.uint8   # no augmentation: scaled on the device
  augmented = next(iter(make_loader(folder_config(tmp_path, augment_prob=0.5), seed=0)[0]))
  assert augmented["image"].dtype == np.float32 and augmented["aug_cond"].shape == (4, 9)
  assert -1.5 <= augmented["image"].min() and augmented["image"].max() <= 1.5


def test_corrupt_images_are_skipped_and_counted(tmp_path):
  make_folder(tmp_path, corrupt=2)
  source = sources.DecodedSource(sources.ImageFolderSource(str(tmp_path)), 3,
                                 lambda im: transforms.resize_center_crop(im, 16))
  records = [source[i] for i in range(len(source))]
  assert len(records) == 14 and source.skipped == 2
  assert all(r["image"].shape == (16, 16, 3) for r in records)
  loader, _ = make_loader(folder_config(tmp_path), seed=0, num_epochs=1)
  assert sum(len(b["label"]) for b in loader) == 12   # 14 records, drop_remainder batches of 4


@pytest.mark.fault
def test_unreadable_images_are_counted_from_worker_processes(tmp_path):
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()   # grain's workers read absl flags
  make_folder(tmp_path, corrupt=1)
  for workers in (0, 1):
    loader, _ = make_loader(folder_config(tmp_path, num_workers=workers, batch_size=1), seed=0,
                            num_epochs=1)
    batches = list(loader)
    assert len(batches) == 13   # 12 images and one unreadable, replaced by its successor
    assert sum(int(b["replaced"].sum()) for b in batches) == 1, workers


def test_missing_folder_and_empty_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.ImageFolderSource(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no images"):
    sources.ImageFolderSource(str(tmp_path / "empty"))


def test_deterministic_given_seed_and_resumable(tmp_path):
  make_folder(tmp_path)
  config = folder_config(tmp_path, augment_prob=0.5)
  first = [b["image"] for _, b in zip(range(4), make_loader(config, seed=3)[0])]
  again = [b["image"] for _, b in zip(range(4), make_loader(config, seed=3)[0])]
  other = [b["image"] for _, b in zip(range(4), make_loader(config, seed=4)[0])]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(first, other))
  iterator = iter(make_loader(config, seed=3)[0])
  next(iterator)
  state = iterator.get_state()
  resumed = iter(make_loader(config, seed=3)[0])
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["image"], first[1])


def test_embedded_and_synthetic_sources():
  mnist = sources.EmbeddedSource("mnist")
  assert len(mnist) == 5000 and mnist[0]["image"].shape == (28, 28, 1)
  assert mnist.images.max() == 255
  digits = sources.EmbeddedSource("digits")
  assert digits[0]["image"].shape == (16, 16, 1)
  synthetic = sources.SyntheticSource(8, 3, 10, length=20)
  # Deterministic per index (another instance draws the same record), different across indices.
  np.testing.assert_array_equal(synthetic[5]["image"],
                                sources.SyntheticSource(8, 3, 10)[5]["image"])
  assert not np.array_equal(synthetic[5]["image"], synthetic[6]["image"])
  assert synthetic[5]["image"].shape == (8, 8, 3) and synthetic[5]["image"].dtype == np.uint8
  assert [synthetic[i]["label"] for i in (5, 13)] == [5, 3] and len(synthetic) == 20
  with pytest.raises(ValueError, match="unknown embedded"):
    sources.EmbeddedSource("cifar")


def test_tfds_mock_source():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = sources.TfdsSource("mnist", "train")
    assert len(source) == 6
    decoded = sources.DecodedSource(source, 1, lambda im: transforms.resize_center_crop(im, 8))
    record = decoded[0]
  assert record["image"].shape == (8, 8, 1) and record["image"].dtype == np.uint8
  assert source.num_classes == 10


def test_pad_fit_centres_without_resampling():
  rng = np.random.default_rng(3)
  image = rng.integers(1, 256, (5, 7, 1), dtype=np.uint8)   # odd, non-square, no zero pixel
  padded = transforms.fit_to_size(image, 10, "pad")
  assert padded.shape == (10, 10, 1)
  np.testing.assert_array_equal(padded[2:7, 1:8], image)    # (10-5)//2 = 2 rows, (10-7)//2 = 1
  assert padded.sum() == image.astype(np.int64).sum()       # the border is black
  np.testing.assert_array_equal(transforms.fit_to_size(image[:, :5], 5, "pad"), image[:, :5])
  with pytest.raises(ValueError, match="does not fit"):
    transforms.pad_to_size(image, 6)


def test_pad_fit_through_the_loader():
  c = base_config()
  c.model = hdit_model(input_size=(32, 32), input_channels=1, patch_size=(2, 2), depths=(1,),
                       widths=(16,), d_heads=(8,), num_classes=10)
  c.data.update(source="embedded", name="mnist", image_size=32, fit="pad", batch_size=4,
                num_workers=0)
  loader, _ = make_loader(c, seed=0, shuffle=False)
  batch = next(iter(loader))
  mnist = sources.EmbeddedSource("mnist")
  assert batch["image"].shape == (4, 32, 32, 1)
  np.testing.assert_array_equal(batch["image"][0, 2:30, 2:30], mnist[0]["image"])
  np.testing.assert_array_equal(batch["image"][:, :2], 0)   # a black border


@pytest.mark.multihost
@pytest.mark.parametrize("workers", [0, 2])
def test_hosts_read_their_rows_of_one_global_sequence(tmp_path, monkeypatch, workers):
  """1, 2 or 4 hosts train on the same global batches (records, order and augmentation)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()   # grain's workers read absl flags
  make_folder(tmp_path)          # 12 records: 2 epochs are 3 global batches of 8
  config = folder_config(tmp_path, batch_size=8, augment_prob=0.5, num_workers=workers)

  def global_batches(hosts):
    per_host = []
    for host in range(hosts):
      monkeypatch.setattr(jax, "process_count", lambda: hosts)
      monkeypatch.setattr(jax, "process_index", lambda: host)
      per_host.append(list(make_loader(config, seed=7, num_epochs=2)[0]))
    assert len({len(batches) for batches in per_host}) == 1   # every host stops together
    return [{key: np.concatenate([batches[i][key] for batches in per_host])
             for key in ("image", "label", "aug_cond")} for i in range(len(per_host[0]))]

  one = global_batches(1)
  # Batches past the last complete round of the workers' batches are dropped.
  assert len(one) == (3 if workers == 0 else 2) and one[0]["image"].shape == (8, 16, 16, 3)
  assert not np.array_equal(one[0]["label"], one[1]["label"])
  for hosts in (2, 4):
    for a, b in zip(one, global_batches(hosts), strict=True):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_hflip_mirrors_about_half_the_images(tmp_path):
  make_folder(tmp_path)
  plain = next(iter(make_loader(folder_config(tmp_path, batch_size=12), seed=2,
                                shuffle=False)[0]))
  flipped = next(iter(make_loader(folder_config(tmp_path, batch_size=12, hflip=True), seed=2,
                                  shuffle=False)[0]))
  np.testing.assert_array_equal(flipped["label"], plain["label"])
  mirrored = [np.array_equal(f, p[:, ::-1]) for f, p in zip(flipped["image"], plain["image"])]
  kept = [np.array_equal(f, p) for f, p in zip(flipped["image"], plain["image"])]
  assert all(m != k for m, k in zip(mirrored, kept))   # each image one or the other
  assert 2 <= sum(mirrored) <= 10                      # 12 fair coins
