"""Sample-quality metrics from feature arrays: FID, KID, improved precision and recall.

Everything runs in float64 numpy/scipy on the host, whatever the dtype of the features
(Inception pool3 features are float32; their statistics are not). Conventions follow the
reference implementations, so that numbers are comparable with published ones:
- FID: pytorch-fid's `calculate_frechet_distance` (Heusel et al. 2017);
- KID: torch-fidelity's `kid_features_to_metric` (Binkowski et al. 2018): unbiased MMD^2 with
  the kernel (x.y / d + 1)^3 on random subsets, the subsets drawn from `np.random.RandomState`
  exactly as torch-fidelity draws them, mean and (population) std over subsets;
- precision / recall: Kynkaanniemi et al. 2019, k-th nearest-neighbour balls.
"""

import numpy as np
import scipy
from absl import logging
from scipy import linalg

# scipy 1.16 rewrote `sqrtm`: `disp` is deprecated (removed in 1.18) and the result comes alone.
# Before, `disp=False` is the quiet way to call it, and it returns `(sqrtm, error estimate)`.
_SQRTM_TAKES_DISP = np.lib.NumpyVersion(scipy.__version__) < "1.16.0"


def _as_features(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected features of shape [N, D], got shape {x.shape}")
  return x


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (`np.cov`, N - 1 normalisation) of features [N, D]."""
  features = _as_features(features, "features")
  if features.shape[0] < 2:
    raise ValueError(f"statistics need at least 2 samples, got {features.shape[0]}")
  mu = features.mean(axis=0)
  sigma = np.atleast_2d(np.cov(features, rowvar=False))  # D = 1 gives a 0-d array
  return mu, sigma


def _sqrtm(a: np.ndarray) -> np.ndarray:
  """Principal matrix square root through scipy, for either `sqrtm` API."""
  out = linalg.sqrtm(a, disp=False) if _SQRTM_TAKES_DISP else linalg.sqrtm(a)
  return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) of two Gaussians.

  mu [D], sigma [D, D]. pytorch-fid's algorithm: if the square root of the product is not
  finite (older scipy returns NaN for some singular products), retry with eps * I added to both
  covariances; a complex root whose diagonal has an imaginary part above 1e-3 is an error,
  otherwise (rounding on near-zero eigenvalues) its real part is used.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"means must be [D] vectors of one length, got {mu1.shape} and {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"covariances must be [{d}, {d}] like the means, got {sigma1.shape} and "
                     f"{sigma2.shape}")
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning("FID: singular covariance product; adding %g to the diagonal of both "
                    "covariances", eps)
    offset = np.eye(d) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):g} in the "
                       "square root of the covariance product (covariances not PSD?)")
    covmean = covmean.real
  # The traces are of the covariances as given, not of the eps-shifted ones (as pytorch-fid).
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(a, b) -> float:
  """FID between two feature sets a [N, D] and b [M, D]."""
  return frechet_distance(*statistics(a), *statistics(b))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """k(x, y) = (x.y / d + 1)^3 for x [m, d], y [n, d] -> [m, n] (KID's kernel)."""
  t = x @ y.T / x.shape[1] + 1
  return t * t * t  # ~10x faster than `** 3` (a generic pow), equal to within an ulp or two


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of two equal-size samples x, y [m, d].

  Within-set means leave out the diagonal (k(x_i, x_i)), the cross term averages all m^2 pairs
  (x and y are independent, so its diagonal is no bias): torch-fidelity's "unbiased" estimate.
  """
  m = x.shape[0]
  k_xx, k_yy = _polynomial_kernel(x, x), _polynomial_kernel(y, y)
  k_xy = _polynomial_kernel(x, y)
  within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
  return float(within / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(features_a, features_b, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
  """Kernel inception distance: (mean, std) of unbiased MMD^2 over random subsets.

  features_a [N, D], features_b [M, D]. Each of `num_subsets` subsets takes
  m = min(subset_size, N, M) rows of each set without replacement, a then b, from one
  `np.random.RandomState(seed)` (torch-fidelity's stream: the same seed gives its subsets).
  The std is over subsets (ddof 0), a spread of single estimates, not an error of the mean.
  """
  a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"KID: feature sizes differ: {a.shape} and {b.shape}")
  m = min(subset_size, a.shape[0], b.shape[0])
  if m < 2 or num_subsets < 1:
    raise ValueError(f"KID needs subsets of at least 2 and num_subsets >= 1, got subset size {m} "
                     f"(sets {a.shape}, {b.shape}) and num_subsets {num_subsets}")
  rng = np.random.RandomState(seed)
  mmds = np.empty(num_subsets)
  for i in range(num_subsets):
    sub_a = a[rng.choice(a.shape[0], m, replace=False)]
    sub_b = b[rng.choice(b.shape[0], m, replace=False)]
    mmds[i] = _mmd2_unbiased(sub_a, sub_b)
  return float(mmds.mean()), float(mmds.std())


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """|x_i - y_j|^2 for x [m, d], y [n, d] -> [m, n]; the expansion can round below 0."""
  d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * (x @ y.T)
  return np.maximum(d2, 0)


def _blocks(n: int, size: int):
  return ((i, min(i + size, n)) for i in range(0, n, size))


def _kth_neighbour_sq(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  """Squared distance [N] from each row of x [N, D] to its k-th nearest other row.

  Blocks of at most batch_size x batch_size distances; a running set of the k smallest per row
  is merged with each column block. The point itself is left out by index (set to inf), so a
  duplicate of it still counts as a neighbour (at distance ~0).
  """
  n = x.shape[0]
  radii = np.empty(n)
  for r0, r1 in _blocks(n, batch_size):
    best = np.full((r1 - r0, k), np.inf)
    for c0, c1 in _blocks(n, batch_size):
      d2 = _squared_distances(x[r0:r1], x[c0:c1])
      rows = np.arange(max(r0, c0), min(r1, c1))  # this block's share of the diagonal
      d2[rows - r0, rows - c0] = np.inf
      best = np.partition(np.concatenate([best, d2], axis=1), k - 1, axis=1)[:, :k]
    radii[r0:r1] = best.max(axis=1)
  return radii


def _inside_any_ball(points: np.ndarray, centres: np.ndarray, radii_sq: np.ndarray,
                     batch_size: int) -> np.ndarray:
  """Whether each of points [N, D] lies within distance radius_j of some centre j: [N] bool."""
  inside = np.zeros(points.shape[0], bool)
  for r0, r1 in _blocks(points.shape[0], batch_size):
    for c0, c1 in _blocks(centres.shape[0], batch_size):
      d2 = _squared_distances(points[r0:r1], centres[c0:c1])
      inside[r0:r1] |= (d2 <= radii_sq[None, c0:c1]).any(axis=1)
  return inside


def precision_recall(real, fake, k: int = 3, batch_size: int = 10000) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019) of fake [M, D] against real [N, D].

  A sample's ball has as radius the distance to its k-th nearest neighbour in its own set.
  Precision: the fraction of fake samples inside some real ball; recall: the fraction of real
  samples inside some fake ball. Distances are compared squared (the same order, no sqrt).
  """
  real, fake = _as_features(real, "real"), _as_features(fake, "fake")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision/recall: feature sizes differ: {real.shape} and {fake.shape}")
  if k < 1 or min(real.shape[0], fake.shape[0]) <= k or batch_size < 1:
    raise ValueError(f"precision/recall need 1 <= k < N of each set and batch_size >= 1, got k={k} "
                     f"for sets {real.shape}, {fake.shape}, batch_size={batch_size}")
  real_radii = _kth_neighbour_sq(real, k, batch_size)
  fake_radii = _kth_neighbour_sq(fake, k, batch_size)
  precision = _inside_any_ball(fake, real, real_radii, batch_size).mean()
  recall = _inside_any_ball(real, fake, fake_radii, batch_size).mean()
  return float(precision), float(recall)


# `all_metrics`' flags take the functions' names.
_kid, _precision_recall = kid, precision_recall


def all_metrics(a, b, *, kid: bool = True, precision_recall: bool = False) -> dict[str, float]:
  """FID, and KID / precision-recall if asked, of generated features b against reference a.

  a is the reference ("real") set for precision and recall, b the generated one. Keys: `fid`;
  `kid_mean`, `kid_std` with kid; `precision`, `recall` with precision_recall (default
  settings of `kid` and `precision_recall`).
  """
  out = {"fid": fid_from_features(a, b)}
  if kid:
    out["kid_mean"], out["kid_std"] = _kid(a, b)
  if precision_recall:
    out["precision"], out["recall"] = _precision_recall(a, b)
  return out
