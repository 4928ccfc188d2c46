"""Per-image transforms: resize and centre-crop, flips, value scaling."""

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


def to_model_range(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0
