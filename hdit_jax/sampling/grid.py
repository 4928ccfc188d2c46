"""Image grids and PNG files (local or gs://)."""

import io
import math

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 (clipped)."""
  return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)


def grid_columns(n: int) -> int:
  return math.ceil(math.sqrt(n))


def image_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 [rows*(H+p)+p, nrow*(W+p)+p, C] picture."""
  n, h, w, c = images.shape
  nrow = nrow or grid_columns(n)
  rows = math.ceil(n / nrow)
  out = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
  for i, image in enumerate(to_uint8(images)):
    y, x = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
    out[y:y + h, x:x + w] = image
  return out


def save_png(picture: np.ndarray, path: str) -> None:
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(buffer, "PNG")
  target.write_bytes(buffer.getvalue())
