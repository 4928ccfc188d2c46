"""Non-leaky augmentation (Karras et al. 2022, k-diffusion's KarrasAugmentationPipeline).

With probability p each of: y-flip (p/2), isotropic scale, rotation, anisotropic scale, and
translation; an x-flip with probability 1/2 whenever p > 0. The model sees the parameters as
a 9-dim `aug_cond` = [x-flip, y-flip, log-scale, cos(rot) - 1, sin(rot), aniso cos, aniso sin,
tx, ty], all 0 for the identity, and is sampled with aug_cond = 0.
"""

import math

import numpy as np
from scipy import ndimage

AUG_COND_DIM = 9


def _rotate(theta):
  c, s = math.cos(theta), math.sin(theta)
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _scale(sx, sy):
  return np.diag([sx, sy, 1.0])


def _translate(tx, ty):
  return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])


def augment(image: np.ndarray, rng: np.random.Generator, prob: float, a_scale: float = 2 ** 0.2,
            a_aniso: float = 2 ** 0.2, a_trans: float = 1 / 8) -> tuple[np.ndarray, np.ndarray]:
  """(augmented float32 image [H, W, C] in the input's range, aug_cond float32 [9])."""
  if prob <= 0:
    return image.astype(np.float32), np.zeros(AUG_COND_DIM, np.float32)
  h, w = image.shape[:2]
  gate = lambda: rng.random() < prob
  a0 = float(rng.random() < 0.5)
  a1 = float(rng.random() < prob * 0.5)
  a2 = rng.standard_normal() if gate() else 0.0
  a3 = rng.uniform(-math.pi, math.pi) if gate() else 0.0
  a4, a5 = (rng.uniform(-math.pi, math.pi), rng.standard_normal()) if gate() else (0.0, 0.0)
  a6, a7 = (rng.standard_normal(), rng.standard_normal()) if gate() else (0.0, 0.0)
  # Output-to-input map about the image centre, in (x, y) pixel coordinates.
  cx, cy = (w - 1) / 2, (h - 1) / 2
  forward = (_translate(cx, cy) @ _translate(a6 * a_trans * w, a7 * a_trans * h) @
             _rotate(a4) @ _scale(a_aniso ** a5, a_aniso ** -a5) @ _rotate(-a4) @
             _rotate(-a3) @ _scale(a_scale ** a2, a_scale ** a2) @
             _scale(1 - 2 * a0, 1 - 2 * a1) @ _translate(-cx, -cy))
  inverse = np.linalg.inv(forward)
  # ndimage works in (row, col) = (y, x) order.
  swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])
  m = swap @ inverse @ swap
  out = np.stack([
      ndimage.affine_transform(image[..., c].astype(np.float32), m[:2, :2], offset=m[:2, 2],
                               order=3, mode="mirror", prefilter=True)
      for c in range(image.shape[-1])], axis=-1)
  cond = np.array([a0, a1, a2, math.cos(a3) - 1, math.sin(a3), a5 * math.cos(a4),
                   a5 * math.sin(a4), a6, a7], np.float32)
  return out.astype(np.float32), cond
