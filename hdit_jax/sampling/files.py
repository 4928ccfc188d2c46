"""Sample files: an `arr_0` npz streamed to disk, a grid with its labels, optional PNGs.

The npz follows the ADM evaluation suite's convention (`arr_0`: uint8 NHWC images, `arr_1`: the
labels), so other FID tools read it too. It is written in chunks, so 50,000 images never sit in
host memory at once, under a temporary name that becomes the final one only when complete.
"""

import io
import os
import shutil
import tempfile
import zipfile
from typing import Iterable, Iterator

import numpy as np
from absl import logging
from etils import epath

from hdit_jax.sampling import grid

GRID_IMAGES = 64   # the first images of a run form its grid


class NpzStreamWriter:
  """Writes `arr_0` (shape and dtype known up front) chunk by chunk, then `arr_1` (labels)."""

  def __init__(self, path: str, shape: tuple[int, ...], dtype=np.uint8):
    self.path = path
    self._remote = "://" in path
    if self._remote:
      self._local = tempfile.mkstemp(suffix=".npz")[1]
    else:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._local = path + ".partial"
    self._zip = zipfile.ZipFile(self._local, "w", zipfile.ZIP_STORED, allowZip64=True)
    self._entry = self._zip.open("arr_0.npy", "w", force_zip64=True)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}
    np.lib.format.write_array_header_2_0(self._entry, header)
    self._dtype, self._expected, self._written = np.dtype(dtype), shape[0], 0

  def write(self, chunk: np.ndarray) -> None:
    self._entry.write(np.ascontiguousarray(chunk, self._dtype).tobytes())
    self._written += len(chunk)

  def abort(self) -> None:
    """Drops the partial file: nothing incomplete is ever left under the final name."""
    self._entry.close()
    self._zip.close()
    if os.path.exists(self._local):
      os.remove(self._local)

  def close(self, labels: np.ndarray) -> None:
    if self._written != self._expected:
      raise RuntimeError(f"{self.path}: {self._written} of {self._expected} images written")
    self._entry.close()
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(labels))
    self._zip.writestr("arr_1.npy", buffer.getvalue())
    self._zip.close()
    if self._remote:
      with open(self._local, "rb") as src, epath.Path(self.path).open("wb") as dst:
        shutil.copyfileobj(src, dst, 64 << 20)
      os.remove(self._local)
    else:
      os.replace(self._local, self.path)   # complete, or absent


def write_grid(images: np.ndarray, labels: np.ndarray | None, path: str,
               columns: int | None = None) -> np.ndarray:
  """path (a PNG) of uint8 images, `columns` per row (default: a square grid), and beside it
  path.labels.txt: the grid's labels by row."""
  nrow = columns or grid.grid_columns(len(images))
  picture = grid.image_grid(images.astype(np.float32) / 127.5 - 1, nrow)
  grid.save_png(picture, path)
  if labels is not None:
    rows = [" ".join(str(int(v)) for v in labels[i:i + nrow]) for i in range(0, len(labels), nrow)]
    epath.Path(path[:-len(".png")] + ".labels.txt").write_text("\n".join(rows) + "\n")
  return picture


def write_samples(batches: Iterable[tuple[np.ndarray, np.ndarray]], num_images: int,
                  image_shape: tuple[int, int, int], out_dir: str, name: str, *,
                  conditional: bool, pngs: bool = False, write: bool = True
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Passes `batches` through while writing out_dir/name.npz (arr_0, arr_1), name.png (the grid
  of the first images), name.labels.txt (its labels, class-conditional models) and, with `pngs`,
  out_dir/name/<index>.png. Only hosts with `write` write; every host must iterate."""
  npz = NpzStreamWriter(os.path.join(out_dir, f"{name}.npz"),
                        (num_images,) + tuple(image_shape)) if write else None
  head, head_labels, labels_seen, index = [], [], [], 0
  try:
    for images, labels in batches:
      if write:
        npz.write(images)
        labels_seen.append(labels)
        if sum(len(h) for h in head) < GRID_IMAGES:
          head.append(images)
          head_labels.append(labels)
        if pngs:
          for image in images:
            grid.save_png(image, os.path.join(out_dir, name, f"{index:06d}.png"))
            index += 1
      yield images, labels
    if not write:
      return
    npz.close(np.concatenate(labels_seen) if labels_seen else np.zeros(0, np.int32))
  except BaseException:
    if npz is not None:   # a failure while closing, too: no partial file is left behind
      npz.abort()
    raise
  head = np.concatenate(head)[:GRID_IMAGES]
  head_labels = np.concatenate(head_labels)[:GRID_IMAGES] if conditional else None
  write_grid(head, head_labels, os.path.join(out_dir, f"{name}.png"))
  logging.info("wrote %d images to %s/%s.npz and the grid %s.png", num_images, out_dir, name,
               name)
