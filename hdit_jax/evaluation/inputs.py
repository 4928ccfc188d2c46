"""The sets that evaluation compares: images, Inception features or statistics, from files.

A set is one of: an image npz (key `arr_0`, uint8 NHWC: the ADM evaluation suite's convention),
a folder of images (searched recursively), a dataset written by `hdit_jax.prepare_data` (its
'train' split, or its only one), a features npz (key `features`, [N, D]) or a statistics npz
(keys `mu`, `sigma`). Paths may be local or gs://. Image npz files are read in chunks, never
whole.
"""

import dataclasses
import zipfile
from typing import Callable, Iterator

import numpy as np
from etils import epath

from hdit_jax.data import sources


@dataclasses.dataclass
class ImageSet:
  """num_images uint8 images, delivered by batches(batch_size) as [b, H, W, C] arrays."""
  path: str
  num_images: int
  batches: Callable[[int], Iterator[np.ndarray]]


@dataclasses.dataclass
class FeatureSet:
  path: str
  features: np.ndarray | None = None       # [N, D]; None for a statistics file
  mu: np.ndarray | None = None
  sigma: np.ndarray | None = None


def read_set(path: str) -> ImageSet | FeatureSet:
  """The set stored at `path` (see the module docstring); a clear error for anything else."""
  target = epath.Path(path)
  if not target.exists():
    raise FileNotFoundError(f"{path} does not exist")
  if target.is_dir():
    return _prepared(path) if (target / "dataset_info.json").exists() else _folder(path)
  if not path.endswith(".npz"):
    raise ValueError(f"{path}: expected an .npz file (arr_0 images, features, or mu/sigma "
                     "statistics) or a folder of images")
  with target.open("rb") as f:
    try:
      names = {n[:-len(".npy")] for n in zipfile.ZipFile(f).namelist()}
    except zipfile.BadZipFile as e:
      raise ValueError(f"{path} is not a readable .npz file ({e})") from e
  if {"mu", "sigma"} <= names:
    with target.open("rb") as f, np.load(f) as data:
      return FeatureSet(path, mu=data["mu"].astype(np.float64),
                        sigma=data["sigma"].astype(np.float64))
  if "features" in names:
    with target.open("rb") as f, np.load(f) as data:
      return FeatureSet(path, features=np.asarray(data["features"]))
  if "arr_0" in names:
    return _image_npz(path)
  raise ValueError(f"{path} holds {sorted(names)}: expected arr_0 (images), features, or mu and "
                   "sigma")


def _npy_header(stream) -> tuple[tuple[int, ...], np.dtype]:
  version = np.lib.format.read_magic(stream)
  read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
          else np.lib.format.read_array_header_2_0)
  shape, fortran, dtype = read(stream)
  if fortran:
    raise ValueError("arr_0 is stored in Fortran order; save it C-ordered")
  return shape, dtype


def _image_npz(path: str) -> ImageSet:
  with epath.Path(path).open("rb") as f, zipfile.ZipFile(f).open("arr_0.npy") as entry:
    shape, dtype = _npy_header(entry)
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
    raise ValueError(f"{path}: arr_0 must be uint8 images [N, H, W, 1 or 3] (NHWC), got "
                     f"{dtype} {shape}")
  item = int(np.prod(shape[1:]))

  def batches(batch_size: int) -> Iterator[np.ndarray]:
    with epath.Path(path).open("rb") as f, zipfile.ZipFile(f).open("arr_0.npy") as entry:
      _npy_header(entry)
      for start in range(0, shape[0], batch_size):
        count = min(batch_size, shape[0] - start)
        data = entry.read(count * item)
        yield np.frombuffer(data, np.uint8).reshape((count,) + tuple(shape[1:]))

  return ImageSet(path, int(shape[0]), batches)


def _batches_of(images: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
  """A batch holds images of one size; a size change starts a new batch."""
  batch: list[np.ndarray] = []
  for image in images:
    if batch and (len(batch) == batch_size or batch[0].shape != image.shape):
      yield np.stack(batch)
      batch = []
    batch.append(image)
  if batch:
    yield np.stack(batch)


def _folder(path: str) -> ImageSet:
  files = sources.images_under(epath.Path(path))
  if not files:
    raise ValueError(f"no images ({', '.join(sources.IMAGE_EXTENSIONS)}) found under {path}")
  return ImageSet(path, len(files), lambda batch_size: _batches_of(
      (sources.decode_image(name, 3) for name in files), batch_size))


def _prepared(path: str) -> ImageSet:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  splits = sorted(tfds.builder_from_directory(path).info.splits)
  if "train" not in splits and len(splits) != 1:
    raise ValueError(f"{path} has the splits {splits} and no 'train'")
  split = "train" if "train" in splits else splits[0]
  source = sources.PreparedSource(path, split)
  return ImageSet(path, len(source), lambda batch_size: _batches_of(
      (sources.decode_image(source[i]["image"], 3) for i in range(len(source))), batch_size))


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, num_images: int) -> None:
  with epath.Path(path).open("wb") as f:
    np.savez(f, mu=mu, sigma=sigma, num_images=num_images)


def save_features(path: str, features: np.ndarray) -> None:
  with epath.Path(path).open("wb") as f:
    np.savez(f, features=np.asarray(features, np.float32))
