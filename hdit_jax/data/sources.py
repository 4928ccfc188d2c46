"""Random-access image sources: prepared and tfds datasets (array_record), image folders,
embedded sets. Paths may be local or gs:// (etils.epath).

Every source yields records {'image': uint8 [H, W, C], 'label': int32}. Unreadable or corrupt
images are skipped (the next record stands in, so batches and determinism are kept) and
counted, never crash a run.
"""

import io
import json
import os
from typing import Any, Callable

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from hdit_jax.data import transforms
from hdit_jax.data.embedded import load_embedded

SOURCES = ("tfds", "prepared", "folder", "embedded", "synthetic")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PREPARATION_FILE = "preparation.json"   # written by `hdit_jax.prepare_data` beside the shards


def _to_8_bit(im: Image.Image) -> Image.Image:
  """16- and 32-bit integer images (PNG 'I;16', TIFF 'I') scaled to 8 bits, not clipped."""
  if im.mode.startswith("I;16") or im.mode == "I":
    array = np.asarray(im, np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or array.max() > 255 else 255.0
    return Image.fromarray(np.round(array / top * 255).clip(0, 255).astype(np.uint8))
  return im


def decode_image(data: Any, channels: int) -> np.ndarray:
  """bytes, a path (local or gs://) or an array -> uint8 [H, W, channels] (RGB or grayscale)."""
  if isinstance(data, np.ndarray):
    image = data
  else:
    if not isinstance(data, bytes):
      data = epath.Path(data).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
      image = np.asarray(_to_8_bit(im).convert("RGB" if channels == 3 else "L"))
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


def images_under(folder: epath.Path) -> list[str]:
  """Image files anywhere below `folder`, in a fixed (sorted) order."""
  root = os.fspath(folder)
  scheme = root[:root.index("://") + 3] if "://" in root else ""
  found = []
  for dirpath, _, names in folder.walk():   # one listing per folder, also on gs://
    directory = os.fspath(dirpath)
    if scheme and not directory.startswith(scheme):   # gcsfs walks without the scheme
      directory = scheme + directory
    found += [f"{directory}/{n}" for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
  return sorted(found)


def list_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
  """root/<class name>/.../<image files> -> ([(path, label)], class names), local or gs://.

  Classes are the sorted subfolder names; images in nested folders belong to their top-level
  class. Images directly in `root` with no subfolders form one unlabelled set (label 0, no
  class names). An empty class folder is an error: it would shift every later label.
  """
  top = epath.Path(root)
  if not top.is_dir():
    raise FileNotFoundError(f"image folder not found: {root}")
  classes = sorted(p.name for p in top.iterdir() if p.is_dir())
  files: list[tuple[str, int]] = []
  for label, name in enumerate(classes):
    found = images_under(top / name)
    if not found:
      raise ValueError(f"class folder {top / name} has no images "
                       f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images")
    files += [(path, label) for path in found]
  if not classes:
    files = [(path, 0) for path in images_under(top)]
  if not files:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
  return files, classes


class ImageFolderSource:
  """root/<class name>/<image files> (see `list_image_folder`), local or gs://."""

  def __init__(self, root: str):
    self.files, self.class_names = list_image_folder(root)
    self.num_classes = len(self.class_names)
    self.root = root

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.root!r}, {len(self.files)} images)"

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path, label = self.files[index]
    return {"image": path, "label": label}


class _TfdsRecords:
  """Records of a tfds data source (`self.source`), described by `self.description`."""
  source: Any
  description: str

  def __repr__(self) -> str:   # grain checks it when restoring an iterator
    return self.description

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.source[index]
    return {"image": record["image"], "label": record.get("label", 0)}


class TfdsSource(_TfdsRecords):
  """A tfds dataset prepared as array_record (`tfds.data_source`; no TensorFlow needed)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    features = self.source.dataset_info.features
    label = features["label"] if "label" in features.keys() else None
    self.num_classes = int(getattr(label, "num_classes", 0) or 0)
    self.description = f"TfdsSource({name!r}, {split!r})"


class PreparedSource(_TfdsRecords):
  """A dataset written by `python -m hdit_jax.prepare_data` (local or gs://).

  It is a tfds dataset directory (array_record shards, dataset_info.json, features.json), read
  through `tfds.builder_from_directory(...).as_data_source`, so no TensorFlow is needed and the
  same shards open in any tfds or grain reader.
  """

  def __init__(self, directory: str, split: str):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    path = epath.Path(directory)
    if not (path / "dataset_info.json").exists():
      raise FileNotFoundError(
          f"{directory} holds no prepared dataset (no dataset_info.json): prepare it with "
          f"python -m hdit_jax.prepare_data --input=IMAGE_FOLDER --output={directory}")
    builder = tfds.builder_from_directory(os.fspath(path))
    if split not in builder.info.splits:
      raise ValueError(f"{directory} has no split {split!r}; it has "
                       f"{sorted(builder.info.splits)} (set data.split)")
    self.source = builder.as_data_source(split=split)
    features = builder.info.features
    label = features["label"] if "label" in features.keys() else None
    self.class_names = list(label.names) if label is not None else []
    self.num_classes = len(self.class_names)
    preparation = path / PREPARATION_FILE
    self.preparation = json.loads(preparation.read_text()) if preparation.exists() else {}
    self.description = f"PreparedSource({directory!r}, {split!r})"


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
  """Decodes a source's images; a record that fails is replaced by the next one and counted
  (`replaced` in each record, the training loop's `data_unreadable_total`)."""

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
      # `replaced`: unreadable records passed over for this one; it travels with the batch, so
      # the count reaches the training loop from grain's worker processes too.
      return {"image": image, "label": np.int32(record["label"]), "replaced": np.int32(offset)}
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
  if cfg.source == "prepared":
    return PreparedSource(cfg.name, cfg.split)
  raise ValueError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")


def decoded_source(cfg: Any, model_cfg: Any) -> DecodedSource:
  """The configured source, decoded to the model's channels and fitted to `data.image_size`."""
  size, fit = int(cfg.image_size), str(cfg.fit)
  source = make_source(cfg, model_cfg)
  prepared = getattr(source, "preparation", {}).get("splits", {}).get(cfg.split, {})
  if prepared.get("image_size") and prepared["image_size"] != size:
    logging.warning("%s holds images prepared at %d pixels: each is resized to data.image_size "
                    "= %d at every read (prepare them at %d to save that)", cfg.name,
                    prepared["image_size"], size, size)
  return DecodedSource(source, int(model_cfg.input_channels),
                       lambda image: transforms.fit_to_size(image, size, fit))
