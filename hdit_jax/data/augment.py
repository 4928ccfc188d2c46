"""Non-leaky augmentation (Karras et al. 2022), as k-diffusion's KarrasAugmentationPipeline.

With probability p each of: y-flip (p/2), isotropic scale, rotation, anisotropic scale, and
translation; an x-flip with probability 1/2 whenever p > 0. The model sees the parameters as
a 9-dim `aug_cond` = [x-flip, y-flip, log-scale, cos(rot) - 1, sin(rot), aniso cos, aniso sin,
tx, ty], all 0 for the identity, and is sampled with aug_cond = 0. The transform is composed in
k-diffusion's order and warped with the same skimage call, so that a given `aug_cond` means the
same image transform as in the official code (converted checkpoints fine-tune with it).
"""

import math

import numpy as np
from skimage import transform as sk_transform

AUG_COND_DIM = 9
A_SCALE = A_ANISO = 2 ** 0.2
A_TRANS = 1 / 8


def _rotate(theta):
  c, s = math.cos(theta), math.sin(theta)
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _scale(sx, sy):
  return np.diag([sx, sy, 1.0])


def _translate(tx, ty):
  return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])


def draw_parameters(rng: np.random.Generator, prob: float) -> np.ndarray:
  """The eight random numbers a0..a7 of one image (k-diffusion's names); 0 where a transform
  is not drawn."""
  gate = lambda: rng.random() < prob
  a0 = float(rng.random() < 0.5)
  a1 = float(rng.random() < prob * 0.5)
  a2 = rng.standard_normal() if gate() else 0.0
  a3 = rng.uniform(-math.pi, math.pi) if gate() else 0.0
  a4, a5 = (rng.uniform(-math.pi, math.pi), rng.standard_normal()) if gate() else (0.0, 0.0)
  a6, a7 = (rng.standard_normal(), rng.standard_normal()) if gate() else (0.0, 0.0)
  return np.array([a0, a1, a2, a3, a4, a5, a6, a7])


def transform_matrix(params: np.ndarray, height: int, width: int) -> np.ndarray:
  """The 3x3 input-to-output map in (x, y) pixel coordinates: T_c F S R(-a3) Aniso T_trans T_-c,
  applied right to left. As in k-diffusion, the x translation scales with the height and the y
  translation with the width (its `h, w = image.size` names them the other way round); for
  square images the two agree."""
  a0, a1, a2, a3, a4, a5, a6, a7 = (float(a) for a in params)
  cx, cy = width / 2 - 0.5, height / 2 - 0.5
  return (_translate(cx, cy) @ _scale(1 - 2 * a0, 1) @ _scale(1, 1 - 2 * a1) @
          _scale(A_SCALE ** a2, A_SCALE ** a2) @ _rotate(-a3) @
          _rotate(a4) @ _scale(A_ANISO ** a5, A_ANISO ** -a5) @ _rotate(-a4) @
          _translate(A_TRANS * height * a6, A_TRANS * width * a7) @ _translate(-cx, -cy))


def conditioning(params: np.ndarray) -> np.ndarray:
  a0, a1, a2, a3, a4, a5, a6, a7 = (float(a) for a in params)
  return np.array([a0, a1, a2, math.cos(a3) - 1, math.sin(a3), a5 * math.cos(a4),
                   a5 * math.sin(a4), a6, a7], np.float32)


def apply(image: np.ndarray, params: np.ndarray) -> np.ndarray:
  """`image` [H, W, C] warped by `params`: bicubic, reflected at the borders (skimage's
  `warp(..., order=3, mode='reflect')`, k-diffusion's call)."""
  matrix = transform_matrix(params, *image.shape[:2])
  out = sk_transform.warp(image.astype(np.float32),
                          sk_transform.AffineTransform(matrix=matrix).inverse, order=3,
                          mode="reflect", clip=False, preserve_range=True)
  return out.astype(np.float32)


def augment(image: np.ndarray, rng: np.random.Generator,
            prob: float) -> tuple[np.ndarray, np.ndarray]:
  """(augmented float32 image [H, W, C] in the input's range, aug_cond float32 [9])."""
  if prob <= 0:
    return image.astype(np.float32), np.zeros(AUG_COND_DIM, np.float32)
  params = draw_parameters(rng, prob)
  return apply(image, params), conditioning(params)
