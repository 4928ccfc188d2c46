"""Random-access image sources: tfds data sources (array_record), image folders, embedded sets.

Every source yields records {'image': uint8 [H, W, C], 'label': int32}. Unreadable or corrupt
images are skipped (the next record stands in, so batches and determinism are kept) and
counted, never crash a run.
"""

import io
import os
from typing import Any, Callable

import numpy as np
from absl import logging
from PIL import Image

from hdit_jax.data import transforms
from hdit_jax.data.embedded import load_embedded

SOURCES = ("tfds", "folder", "embedded", "synthetic")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def decode_image(data: Any, channels: int) -> np.ndarray:
  """bytes, a path or an array -> uint8 [H, W, channels] (RGB or grayscale)."""
  if isinstance(data, np.ndarray):
    image = data
  else:
    with (Image.open(io.BytesIO(data)) if isinstance(data, bytes) else Image.open(data)) as im:
      image = np.asarray(im.convert("RGB" if channels == 3 else "L"))
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] != channels:
    if image.shape[-1] == 1:
      image = np.repeat(image, channels, axis=-1)
    elif channels == 1:
      image = np.round(image[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    else:
      raise ValueError(f"image has {image.shape[-1]} channels, {channels} expected")
  return image.astype(np.uint8)


class EmbeddedSource:
  """An embedded dataset (see `embedded.py`) as a random-access source."""

  def __init__(self, name: str):
    self.name = name
    self.images, self.labels, self.num_classes = load_embedded(name)

  def __repr__(self) -> str:   # grain checks it when restoring an iterator
    return f"EmbeddedSource({self.name!r})"

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}


class ImageFolderSource:
  """root/<class name>/<image files>; classes are the sorted subfolder names.

  Images directly in `root` (no subfolders) form one unlabelled class 0.
  """

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    folders = [(os.path.join(root, c), i) for i, c in enumerate(classes)] or [(root, 0)]
    self.files: list[tuple[str, int]] = []
    for folder, label in folders:
      for dirpath, _, names in sorted(os.walk(folder)):
        self.files += [(os.path.join(dirpath, n), label) for n in sorted(names)
                       if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not self.files:
      raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    self.class_names = classes
    self.num_classes = len(classes)
    self.root = root

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.root!r}, {len(self.files)} images)"

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path, label = self.files[index]
    return {"image": path, "label": label}


class TfdsSource:
  """A tfds dataset prepared as array_record (`tfds.data_source`; no TensorFlow needed)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    features = self.source.dataset_info.features
    label = features["label"] if "label" in features.keys() else None
    self.num_classes = int(getattr(label, "num_classes", 0) or 0)
    self.description = f"TfdsSource({name!r}, {split!r})"

  def __repr__(self) -> str:
    return self.description

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.source[index]
    return {"image": record["image"], "label": record.get("label", 0)}


class SyntheticSource:
  """Deterministic random images (uniform noise per record) for throughput runs and tests."""

  def __init__(self, size: int, channels: int, num_classes: int, length: int = 1_000_000):
    self.size, self.channels, self.num_classes, self.length = size, channels, num_classes, length

  def __repr__(self) -> str:
    return f"SyntheticSource({self.size}, {self.channels}, {self.num_classes}, {self.length})"

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, (self.size, self.size, self.channels), dtype=np.uint8)
    return {"image": image, "label": index % max(self.num_classes, 1)}


class DecodedSource:
  """Decodes a source's images; a record that fails is replaced by the next one and counted."""

  def __init__(self, source: Any, channels: int, transform: Callable[[np.ndarray], np.ndarray],
               max_skips: int = 100):
    self.source, self.channels, self.transform = source, channels, transform
    self.max_skips = max_skips
    self.bad_records: set[int] = set()

  def __repr__(self) -> str:
    return f"DecodedSource({self.source!r}, channels={self.channels})"

  @property
  def skipped(self) -> int:
    """Distinct unreadable records met so far (in this process)."""
    return len(self.bad_records)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    for offset in range(self.max_skips):
      i = (index + offset) % len(self.source)
      record = self.source[i]
      try:
        image = self.transform(decode_image(record["image"], self.channels))
      except Exception as e:  # pylint: disable=broad-except
        if i not in self.bad_records:
          self.bad_records.add(i)
          name = record["image"] if isinstance(record["image"], str) else f"record {i}"
          logging.warning("skipping unreadable image %s (%s: %s); %d found so far", name,
                          type(e).__name__, e, len(self.bad_records))
        continue
      return {"image": image, "label": np.int32(record["label"])}
    raise RuntimeError(f"{self.max_skips} consecutive unreadable images from index {index}")


def make_source(cfg: Any, model_cfg: Any = None) -> Any:
  """The configured raw source (`data.source`: tfds | folder | embedded | synthetic)."""
  if cfg.source == "synthetic":
    return SyntheticSource(int(cfg.image_size), int(model_cfg.input_channels),
                           int(model_cfg.get("num_classes", 0)))
  if cfg.source == "embedded":
    return EmbeddedSource(cfg.name)
  if cfg.source == "folder":
    return ImageFolderSource(cfg.name)
  if cfg.source == "tfds":
    return TfdsSource(cfg.name, cfg.split, cfg.get("data_dir") or None)
  raise ValueError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")


def decoded_source(cfg: Any, model_cfg: Any) -> DecodedSource:
  """The configured source, decoded to the model's channels and fitted to `data.image_size`."""
  size, fit = int(cfg.image_size), str(cfg.fit)
  return DecodedSource(make_source(cfg, model_cfg), int(model_cfg.input_channels),
                       lambda image: transforms.fit_to_size(image, size, fit))
