"""Per-image transforms: resize and centre-crop or pad, flips, value scaling."""

import numpy as np
from PIL import Image


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resize the shorter side to `size` (bicubic, antialiased) and crop the centre square."""
  h, w = image.shape[:2]
  if (h, w) != (size, size):
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BICUBIC))
    resized = resized[..., None] if resized.ndim == 2 else resized
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = resized[top:top + size, left:left + size]
  return image


def pad_to_size(image: np.ndarray, size: int) -> np.ndarray:
  """Centre the image on a black size x size canvas (MNIST's 28x28 digits padded to 32x32)."""
  h, w = image.shape[:2]
  if h > size or w > size:
    raise ValueError(f"a {h}x{w} image does not fit in data.image_size = {size} with "
                     "data.fit = 'pad'; use data.fit = 'crop' to resize it")
  top, left = (size - h) // 2, (size - w) // 2
  return np.pad(image, ((top, size - h - top), (left, size - w - left), (0, 0)))


FITS = ("crop", "pad")


def fit_to_size(image: np.ndarray, size: int, fit: str) -> np.ndarray:
  """`data.fit`: 'crop' resizes and centre-crops, 'pad' centres without resampling."""
  return pad_to_size(image, size) if fit == "pad" else resize_center_crop(image, size)


def to_model_range(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0
