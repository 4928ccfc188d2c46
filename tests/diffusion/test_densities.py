"""Noise-level densities: closed forms, Kolmogorov-Smirnov tests, stratification."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from hdit_jax.diffusion import densities

N = 20000


def ks_pvalue(samples, cdf):
  return stats.kstest(np.asarray(samples, np.float64), cdf).pvalue


def cosine_interpolated_f64(u, sd, image_d, low, high, lo=1e-3, hi=1e3):
  """Reference transform in float64 (spec section 3.3), written independently."""
  def lam(u, s):
    ta, tb = np.arctan(hi / sd * np.exp(s / 2)), np.arctan(lo / sd * np.exp(s / 2))
    return -2 * np.log(np.tan(ta + u * (tb - ta))) + s
  s_lo, s_hi = 2 * np.log(low / image_d), 2 * np.log(high / image_d)
  return sd * np.exp(-((1 - u) * lam(u, s_lo) + u * lam(u, s_hi)) / 2)


@pytest.mark.parametrize("image_d, values", [
    (256, [1000, 20.09, 8.053, 4.188, 2.391, 1.413, 0.8346, 0.4761, 0.2471, 0.0985, 0.001]),
    (1024, [1000, 65.91, 23.79, 10.89, 5.442, 2.808, 1.447, 0.7196, 0.3255, 0.1130, 0.001]),
])
def test_cosine_interpolated_worked_values(image_d, values):
  u = jnp.linspace(0, 1, 11)
  got = densities.cosine_interpolated(u, 0.5, image_d, 32, image_d)
  np.testing.assert_allclose(got, values, rtol=2e-3)


def _cdf_of_decreasing(transform_f64):
  """CDF of sigma = f(U) for decreasing f: 1 - f^{-1}(sigma), inverted by bisection."""
  def cdf(sigma):
    lo, hi = np.zeros_like(sigma), np.ones_like(sigma)
    for _ in range(60):
      mid = (lo + hi) / 2
      above = transform_f64(mid) > sigma
      lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return 1 - (lo + hi) / 2
  return cdf


@pytest.mark.parametrize("image_size", [64, 256, 1024])
def test_cosine_interpolated_ks(image_size):
  sample = densities.make_density({"type": "cosine-interpolated"}, sigma_data=0.5,
                                   image_size=image_size)
  sigma = sample(jax.random.key(1), N)
  cdf = _cdf_of_decreasing(lambda u: cosine_interpolated_f64(u, 0.5, image_size, 32, image_size))
  assert ks_pvalue(sigma, cdf) > 1e-3
  # A wrong shift (the density of half the resolution) is rejected.
  wrong = _cdf_of_decreasing(
      lambda u: cosine_interpolated_f64(u, 0.5, image_size // 2, 32, image_size // 2))
  assert ks_pvalue(sigma, wrong) < 1e-6


@pytest.mark.parametrize("cfg, cdf", [
    ({"type": "lognormal", "loc": -1.2, "scale": 1.2},
     lambda s: stats.norm.cdf((np.log(s) + 1.2) / 1.2)),
    ({"type": "loguniform", "min_value": 0.01, "max_value": 80.0},
     lambda s: (np.log(s) - np.log(0.01)) / (np.log(80) - np.log(0.01))),
    ({"type": "v-diffusion", "min_value": 1e-3, "max_value": 1e3},
     lambda s: (2 / np.pi * np.arctan(s / 0.5) - 2 / np.pi * np.arctan(1e-3 / 0.5)) /
     (2 / np.pi * (np.arctan(1e3 / 0.5) - np.arctan(1e-3 / 0.5)))),
    ({"type": "loglogistic", "loc": -0.5, "scale": 0.5, "min_value": 0.01, "max_value": 10.0},
     lambda s: (stats.logistic.cdf((np.log(s) + 0.5) / 0.5) -
                stats.logistic.cdf((np.log(0.01) + 0.5) / 0.5)) /
     (stats.logistic.cdf((np.log(10) + 0.5) / 0.5) -
      stats.logistic.cdf((np.log(0.01) + 0.5) / 0.5))),
])
def test_closed_form_densities_ks(cfg, cdf):
  sample = densities.make_density(cfg, sigma_data=0.5, image_size=64)
  sigma = sample(jax.random.key(2), N)
  assert ks_pvalue(sigma, cdf) > 1e-3


def test_split_lognormal_ks():
  sample = densities.make_density({"type": "split-lognormal", "loc": 0.3, "scale": 1.0,
                                   "scale_2": 2.0}, sigma_data=0.5, image_size=64)
  sigma = sample(jax.random.key(3), N)
  def cdf(s):
    z = np.log(s) - 0.3
    left = 1 / 3 * 2 * (1 - stats.norm.cdf(-z / 1.0))
    right = 1 / 3 + 2 / 3 * (2 * stats.norm.cdf(z / 2.0) - 1)
    return np.where(z < 0, left, right)
  assert ks_pvalue(sigma, cdf) > 1e-3


def test_stratified_uniform_covers_every_stratum_once():
  u = densities.stratified_uniform(jax.random.key(4), 24, groups=4)
  strata = np.sort(np.floor(np.asarray(u) * 24))
  np.testing.assert_array_equal(strata, np.arange(24))
  # Every group spans the whole range: group g holds strata g, g+4, g+8, ...
  groups = np.floor(np.asarray(u).reshape(4, 6) * 24)
  np.testing.assert_array_equal(groups % 4, np.arange(4)[:, None] * np.ones((1, 6)))
  with pytest.raises(ValueError, match="divisible"):
    densities.stratified_uniform(jax.random.key(4), 10, groups=4)


def test_unknown_density():
  with pytest.raises(ValueError, match="sigma_density"):
    densities.make_density({"type": "gamma"}, sigma_data=0.5, image_size=64)
