"""Augmentation against k-diffusion's KarrasAugmentationPipeline: where content goes, what
each parameter means, and how often each transform is drawn."""

import math

import numpy as np
import pytest

from hdit_jax.data import augment

SIGMA_BLOB = 1.5


def blob(height, width, x, y):
  yy, xx = np.mgrid[:height, :width]
  return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * SIGMA_BLOB ** 2))[..., None]


def centroid(image):
  yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
  weight = np.clip(image[..., 0], 0, None)
  return (xx * weight).sum() / weight.sum(), (yy * weight).sum() / weight.sum()


def params(**named):
  """a0..a7 by name, the rest 0."""
  values = np.zeros(8)
  for name, value in named.items():
    values[int(name[1:])] = value
  return values


# Where a blob at the centre lands, worked out by hand from k-diffusion's composition
# T_c F S R(-a3) Aniso T_trans T_-c (the translation is applied first, then rotated and scaled;
# the x translation is a_trans * height * a6, the y translation a_trans * width * a7).
LANDINGS = [
    # (height, width, parameters, displacement (dx, dy) of the centre's content)
    (32, 32, params(a6=1.0), (4.0, 0.0)),
    (24, 32, params(a6=1.0, a7=1.0), (3.0, 4.0)),                    # non-square: 24/8, 32/8
    (32, 32, params(a3=math.pi / 2, a6=1.0), (0.0, -4.0)),            # R(-90°) turns +x to -y
    (32, 32, params(a2=2.0, a6=1.0), (4.0 * 2 ** 0.4, 0.0)),          # scaled after moving
    (32, 32, params(a0=1.0, a6=1.0), (-4.0, 0.0)),                    # flipped after moving
    (32, 32, params(a1=1.0, a3=math.pi / 2, a6=1.0), (0.0, 4.0)),     # y-flip after rotating
    (32, 32, params(a4=0.0, a5=1.0, a6=1.0), (4.0 * 2 ** 0.2, 0.0)),  # aniso along x
]


@pytest.mark.parametrize("height, width, values, displacement", LANDINGS)
def test_content_lands_where_the_official_composition_puts_it(height, width, values,
                                                              displacement):
  cx, cy = width / 2 - 0.5, height / 2 - 0.5
  out = augment.apply(blob(height, width, cx, cy), values)
  x, y = centroid(out)
  np.testing.assert_allclose((x - cx, y - cy), displacement, atol=0.05)


def smooth(x, y):
  return np.sin(0.21 * x + 0.13 * y) + 0.5 * np.cos(0.17 * y - 0.07 * x)


def official_source_point(values, height, width, x, y):
  """The input point that output pixel (x, y) reads, undoing k-diffusion's chain step by step
  (its matrix maps input to output; this walks it backwards)."""
  a0, a1, a2, a3, a4, a5, a6, a7 = values
  cx, cy = width / 2 - 0.5, height / 2 - 0.5
  rot = lambda t, u, v: (math.cos(t) * u - math.sin(t) * v, math.sin(t) * u + math.cos(t) * v)
  u, v = x - cx, y - cy                                  # undo T_c
  u, v = u * (1 - 2 * a0), v * (1 - 2 * a1)              # flips are their own inverse
  u, v = u / 2 ** (0.2 * a2), v / 2 ** (0.2 * a2)        # undo S
  u, v = rot(a3, u, v)                                   # undo R(-a3)
  u, v = rot(-a4, u, v)                                  # undo R(a4), the outer of Aniso
  u, v = u / 2 ** (0.2 * a5), v * 2 ** (0.2 * a5)
  u, v = rot(a4, u, v)                                   # undo R(-a4)
  u, v = u - height / 8 * a6, v - width / 8 * a7         # undo T_trans
  return u + cx, v + cy


def test_every_transform_together_reads_the_official_source_points():
  height, width = 40, 48
  yy, xx = np.mgrid[:height, :width].astype(np.float64)
  image = smooth(xx, yy)[..., None].astype(np.float32)
  values = np.array([1.0, 1.0, 0.7, 0.9, -1.2, 0.8, 0.3, -0.2])
  out = augment.apply(image, values)
  sx, sy = official_source_point(values, height, width, xx, yy)
  inside = (sx > 2) & (sx < width - 3) & (sy > 2) & (sy < height - 3)
  assert inside.mean() > 0.3
  np.testing.assert_allclose(out[..., 0][inside], smooth(sx, sy)[inside], atol=0.01)


def test_identity_flip_and_channels():
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (6, 9, 3)).astype(np.float32)   # odd, non-square, RGB
  np.testing.assert_array_equal(augment.apply(image, params()), image)
  np.testing.assert_allclose(augment.apply(image, params(a0=1.0)), image[:, ::-1], atol=1e-6)
  np.testing.assert_allclose(augment.apply(image, params(a1=1.0)), image[::-1], atol=1e-6)
  same, cond = augment.augment(image, rng, 0.0)
  np.testing.assert_array_equal(same, image)
  np.testing.assert_array_equal(cond, np.zeros(9))


def test_conditioning_is_drawn_with_the_image():
  image = np.random.default_rng(0).uniform(-1, 1, (16, 16, 1)).astype(np.float32)
  for seed in range(8):
    out, cond = augment.augment(image, np.random.default_rng(seed), 1.0)
    values = augment.draw_parameters(np.random.default_rng(seed), 1.0)
    np.testing.assert_array_equal(out, augment.apply(image, values))
    a0, a1, a2, a3, a4, a5, a6, a7 = values
    np.testing.assert_allclose(cond, [a0, a1, a2, math.cos(a3) - 1, math.sin(a3),
                                      a5 * math.cos(a4), a5 * math.sin(a4), a6, a7], atol=1e-6)


def test_how_often_each_transform_is_drawn():
  prob, n = 0.12, 20000
  rng = np.random.default_rng(5)
  drawn = np.array([augment.draw_parameters(rng, prob) != 0 for _ in range(n)])
  # x-flip 1/2 whatever p; y-flip p/2; scale, rotation, anisotropy (a4 and a5 together) and
  # translation (a6 and a7 together) p each.
  expected = [0.5, prob / 2, prob, prob, prob, prob, prob, prob]
  for column, p in enumerate(expected):
    assert abs(drawn[:, column].mean() - p) < 4 * math.sqrt(p * (1 - p) / n), column
  np.testing.assert_array_equal(drawn[:, 4], drawn[:, 5])
  np.testing.assert_array_equal(drawn[:, 6], drawn[:, 7])
  assert not np.array_equal(drawn[:, 2], drawn[:, 3])   # independent gates
