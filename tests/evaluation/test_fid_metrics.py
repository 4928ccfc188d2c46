"""FID, KID, precision-recall from features: closed forms, brute force, pytorch-fid's fixture."""

import logging

import numpy as np
import pytest

from fid_fixture import fixture  # noqa: F401  pylint: disable=unused-import
from hdit_jax.evaluation import metrics


def _sym_sqrt(s):
  """Symmetric PSD square root through eigh (rounding negatives clamped to 0)."""
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.maximum(w, 0))) @ v.T


def _closed_form_fd(mu1, s1, mu2, s2):
  """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2, independent of sqrtm."""
  r = _sym_sqrt(s1)
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sym_sqrt(r @ s2 @ r))


def _random_spd(rng, d, floor=0.1):
  a = rng.standard_normal((d, d))
  return a @ a.T / d + floor * np.eye(d)


# --- statistics and Fréchet distance ---------------------------------------------------------

def test_statistics_float64_and_validation():
  x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
  mu, sigma = metrics.statistics(x)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (3, 3)
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-15)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-14)
  assert metrics.statistics(x[:, :1])[1].shape == (1, 1)
  with pytest.raises(ValueError, match="at least 2"):
    metrics.statistics(x[:1])
  for bad in (x[:, 0], x[None]):
    with pytest.raises(ValueError, match=r"\[N, D\]"):
      metrics.statistics(bad)


def test_frechet_diagonal_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert isinstance(got, float)
  np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("seed,d", [(0, 2), (1, 16), (2, 64)])
def test_frechet_general_spd_against_eigh(seed, d):
  rng = np.random.default_rng(seed)
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _closed_form_fd(mu1, s1, mu2, s2), rtol=1e-9)
  # The Bures part alone (equal means), which a wrong square-root formula changes.
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu1, s2),
                             _closed_form_fd(mu1, s1, mu1, s2), rtol=1e-9)


def test_frechet_identical_statistics_is_zero():
  rng = np.random.default_rng(3)
  mu, s = rng.standard_normal(32), _random_spd(rng, 32, floor=0.5)
  assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-8


def test_frechet_shape_errors_name_both_shapes():
  s = np.eye(3)
  with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
    metrics.frechet_distance(np.zeros(3), s, np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r"\(3, 3\) and \(2, 2\)"):
    metrics.frechet_distance(np.zeros(3), s, np.zeros(3), np.eye(2))


def test_frechet_rejects_large_imaginary_part():
  # sqrtm(-I) = i I: not a pair of covariances; pytorch-fid raises on it.
  with pytest.raises(ValueError, match="imaginary component"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))


def _rank_deficient_pair(d=8, rank=3, seed=4):
  rng = np.random.default_rng(seed)
  a, b = rng.standard_normal((d, rank)), rng.standard_normal((d, rank))
  return rng.standard_normal(d), a @ a.T, rng.standard_normal(d), b @ b.T


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_rank_deficient_is_finite_and_close():
  mu1, s1, mu2, s2 = _rank_deficient_pair()
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  # Rounding on the 5 zero eigenvalues of S1 S2 gives roots ~ sqrt(1e-16 |S|) each.
  np.testing.assert_allclose(got, _closed_form_fd(mu1, s1, mu2, s2), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_eps_fallback(monkeypatch, caplog):
  """A non-finite root (scipy < 1.16 returns NaN for some singular products) takes the eps path.

  scipy >= 1.16 returns a finite root for rank-deficient covariances, so the first call is made
  to return NaN here, as old scipy does; the retry goes to the real sqrtm.
  """
  mu1, s1, mu2, s2 = _rank_deficient_pair()
  eps, d = 1e-6, s1.shape[0]
  calls, sqrtm = [], metrics._sqrtm

  def first_nan(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else sqrtm(a)

  monkeypatch.setattr(metrics, "_sqrtm", first_nan)
  with caplog.at_level(logging.WARNING):
    got = metrics.frechet_distance(mu1, s1, mu2, s2, eps=eps)
  assert len(calls) == 2 and np.isfinite(got)
  assert "singular" in caplog.text and "1e-06" in caplog.text
  np.testing.assert_allclose(calls[1], (s1 + eps * np.eye(d)) @ (s2 + eps * np.eye(d)))
  # pytorch-fid: shifted covariances inside the root, the traces of the given ones.
  off = eps * np.eye(d)
  r = _sym_sqrt(s1 + off)
  diff = mu1 - mu2
  want = (diff @ diff + np.trace(s1) + np.trace(s2)
          - 2 * np.trace(_sym_sqrt(r @ (s2 + off) @ r)))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # Close to the unshifted value: tr (S1 S2)^1/2 is the nuclear norm of S1^1/2 S2^1/2, and
  # |(S + eps)^1/2 - S^1/2| <= sqrt(eps) in operator norm, so the shift moves FD by at most
  # 2 d sqrt(eps) (|S1|^1/2 + |S2 + eps|^1/2).
  norm1, norm2 = np.linalg.norm(s1, 2), np.linalg.norm(s2, 2)
  bound = 2 * d * np.sqrt(eps) * (np.sqrt(norm1) + np.sqrt(norm2 + eps))
  assert abs(got - _closed_form_fd(mu1, s1, mu2, s2)) < bound


def test_frechet_of_sampled_gaussians():
  """Features from N(mu1, Q A Q^T), N(mu2, Q B Q^T) (A, B diagonal): FD near the population value.

  Tolerance from first-order sampling errors (in the eigenbasis of A and B; FD is rotation
  invariant): the mean term moves by 2 dmu.(e1 - e2), variance 4 sum dmu_i^2 (a_i + b_i) / N;
  the Bures term's gradient in S1 is I - (B/A)^1/2, so it moves with variance
  2/N sum (a_i - sqrt(a_i b_i))^2 (and the same for S2). Allowed: 5 of those sigmas plus a bias
  allowance of (tr A + tr B + d^2 max(a, b)) / N for the second-order terms.
  """
  rng = np.random.default_rng(5)
  n, d = 20000, 8
  mu1, mu2 = rng.normal(0, 0.5, d), rng.normal(0, 0.5, d)
  a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
  q = np.linalg.qr(rng.standard_normal((d, d)))[0]
  f1 = (mu1 + rng.standard_normal((n, d)) * np.sqrt(a)) @ q.T
  f2 = (mu2 + rng.standard_normal((n, d)) * np.sqrt(b)) @ q.T
  dmu = mu1 - mu2
  want = dmu @ dmu + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  var = (4 * np.sum(dmu ** 2 * (a + b)) + 2 * np.sum((a - np.sqrt(a * b)) ** 2)
         + 2 * np.sum((b - np.sqrt(a * b)) ** 2)) / n
  tol = 5 * np.sqrt(var) + (a.sum() + b.sum() + d * d * max(a.max(), b.max())) / n
  got = metrics.fid_from_features(f1, f2)
  assert abs(got - want) < tol, (got, want, tol)


def test_fid_fixture_gauss(fixture):
  """pytorch-fid's value on the fixture's synthetic features, everything read from the files."""
  ref, tensors = fixture
  got = metrics.frechet_distance(*metrics.statistics(tensors["gauss_1"]),
                                 *metrics.statistics(tensors["gauss_2"]))
  assert abs(got - ref["fid_gauss"]) <= ref["tolerances"]["fid_rel"] * abs(ref["fid_gauss"])


# --- KID -------------------------------------------------------------------------------------

def _kid_brute_force(x, y):
  """Unbiased MMD^2 with k(u, v) = (u.v / d + 1)^3, by explicit loops over pairs."""
  m, d = x.shape

  def k(u, v):
    return (sum(u[t] * v[t] for t in range(d)) / d + 1) ** 3

  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return (xx + yy) / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_whole_set_matches_brute_force():
  rng = np.random.default_rng(6)
  x, y = rng.standard_normal((9, 3)), rng.normal(0.3, 1.2, (9, 3))
  # subset_size >= N: every subset is the whole set (permuted), so no sampling is involved.
  mean, std = metrics.kid(x, y, num_subsets=3, subset_size=50)
  np.testing.assert_allclose(mean, _kid_brute_force(x, y), rtol=1e-12)
  assert std < 1e-12


def test_kid_subsets_follow_torch_fidelity_sampling():
  """Subsets: one RandomState(seed), `choice(n, m, replace=False)` for a then b, per subset."""
  rng = np.random.default_rng(7)
  x, y = rng.standard_normal((11, 2)), rng.standard_normal((14, 2)) + 0.5
  mean, std = metrics.kid(x, y, num_subsets=4, subset_size=6, seed=3)
  state = np.random.RandomState(3)
  ests = []
  for _ in range(4):
    ia, ib = state.choice(11, 6, replace=False), state.choice(14, 6, replace=False)
    ests.append(_kid_brute_force(x[ia], y[ib]))
  np.testing.assert_allclose([mean, std], [np.mean(ests), np.std(ests)], rtol=1e-10)
  # m = min(subset_size, N, M): the smaller set is used whole (a permutation of it).
  state = np.random.RandomState(0)
  ia, ib = state.choice(5, 5, replace=False), state.choice(14, 5, replace=False)
  np.testing.assert_allclose(metrics.kid(x[:5], y, num_subsets=1, subset_size=100, seed=0)[0],
                             _kid_brute_force(x[:5][ia], y[ib]), rtol=1e-10)


def test_kid_identical_distributions_near_zero():
  """Same Gaussian: unbiased, so the mean is 0 up to its own spread, well below one subset's.

  The null spread of MMD^2 scales as 1/m, so the mean over 100 subsets of 250 from 5000 has a
  spread of about std (250/5000 + 1/sqrt(100)) = 0.15 std; |mean| < std / 2 is over 3 of those.
  A biased (V-statistic) estimate sits ~5 std above 0 here.
  """
  rng = np.random.default_rng(8)
  a, b = rng.standard_normal((5000, 16)), rng.standard_normal((5000, 16))
  mean, std = metrics.kid(a, b, num_subsets=100, subset_size=250)
  assert std > 0 and abs(mean) < 0.5 * std


def test_kid_shifted_gaussians_positive_and_seeded():
  rng = np.random.default_rng(9)
  a, b = rng.standard_normal((3000, 16)), rng.standard_normal((3000, 16)) + 0.5
  mean, std = metrics.kid(a, b, num_subsets=50, subset_size=250, seed=1)
  assert mean > 10 * std > 0
  assert metrics.kid(a, b, num_subsets=50, subset_size=250, seed=1) == (mean, std)
  assert metrics.kid(a, b, num_subsets=50, subset_size=250, seed=2) != (mean, std)


def _expected_kernel(mu1, s1, mu2, s2):
  """E (x.y / d + 1)^3 for independent x ~ N(mu1, S1), y ~ N(mu2, S2).

  Given x, t = x.y / d + 1 ~ N(M, V) with M = x.mu2 / d + 1, V = x^T S2 x / d^2, and
  E t^3 = M^3 + 3 M V; then over x: E M^3 = a^3 + 3 a b (a = mu1.mu2 / d + 1,
  b = mu2^T S1 mu2 / d^2) and E M V = (a (mu1^T S2 mu1 + tr S1 S2) + 2 mu2^T S1 S2 mu1 / d) / d^2.
  """
  d = mu1.shape[0]
  a, b = mu1 @ mu2 / d + 1, mu2 @ s1 @ mu2 / d ** 2
  mv = (a * (mu1 @ s2 @ mu1 + np.trace(s1 @ s2)) + 2 * mu2 @ s1 @ s2 @ mu1 / d) / d ** 2
  return a ** 3 + 3 * a * b + 3 * mv


def test_kid_expectation_matches_population_mmd():
  """Whole-set estimates are unbiased for the population MMD^2 of two Gaussians.

  20 independent sample pairs of 1000; the mean estimate must be within 4 standard errors
  (from the replicates' own spread) of MMD^2 = E k11 - 2 E k12 + E k22.
  """
  rng = np.random.default_rng(10)
  d = 4
  mu1, mu2 = rng.normal(0, 0.5, d), rng.normal(0, 0.5, d)
  s1, s2 = _random_spd(rng, d, 0.2), _random_spd(rng, d, 0.2)
  l1, l2 = np.linalg.cholesky(s1), np.linalg.cholesky(s2)
  want = (_expected_kernel(mu1, s1, mu1, s1) - 2 * _expected_kernel(mu1, s1, mu2, s2)
          + _expected_kernel(mu2, s2, mu2, s2))
  ests = [metrics.kid(mu1 + rng.standard_normal((1000, d)) @ l1.T,
                      mu2 + rng.standard_normal((1000, d)) @ l2.T,
                      num_subsets=1, subset_size=1000)[0] for _ in range(20)]
  assert abs(np.mean(ests) - want) < 4 * np.std(ests, ddof=1) / np.sqrt(20), (np.mean(ests), want)


def test_kid_validation():
  x = np.zeros((5, 3))
  with pytest.raises(ValueError, match="feature sizes"):
    metrics.kid(x, np.zeros((5, 4)))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.kid(x, np.zeros((1, 3)))


# --- precision and recall --------------------------------------------------------------------

def test_precision_recall_identical_and_disjoint():
  rng = np.random.default_rng(11)
  x = rng.standard_normal((200, 5))
  assert metrics.precision_recall(x, x.copy()) == (1.0, 1.0)
  assert metrics.precision_recall(x, rng.standard_normal((150, 5)) + 100) == (0.0, 0.0)


def test_precision_recall_hand_counted_1d():
  """k = 1 on a line; every squared distance is an exact integer, ties at the ball edge count.

  Real 0, 1, 5, 6: nearest other at 1 each, balls [-1, 1], [0, 2], [4, 6], [5, 7].
  Fake 2, 3, 8, 11: 2 is on the edge of [0, 2]; 3, 8, 11 are outside all -> precision 1/4.
  Fake radii 1, 1, 3, 3: balls [1, 3], [2, 4], [5, 11], [8, 14]; real 1 (edge), 5 (edge), 6
  inside, 0 outside -> recall 3/4. Counting the point itself (radius 0) would give (0, 0).
  """
  real, fake = np.array([[0.], [1.], [5.], [6.]]), np.array([[2.], [3.], [8.], [11.]])
  assert metrics.precision_recall(real, fake, k=1) == (0.25, 0.75)
  assert metrics.precision_recall(fake, real, k=1) == (0.75, 0.25)


def test_precision_recall_hand_counted_2d_k2():
  """k = 2 in the plane (squared distances are integers).

  Real (0,0), (3,0), (0,4), (10,10): 2nd-nearest squared radii 16, 25, 25, 149.
  Fake (0,-4): 16 from (0,0), on the edge -> in; (6,4): 25 from (3,0), edge -> in;
  (20,20): 200 from (10,10) > 149 and farther from the others -> out; (-4,-3): 25 > 16,
  58 > 25, 65 > 25, 365 > 149 -> out. Precision 2/4.
  Fake squared radii: (0,-4): 17, 100 -> 100; (6,4): 100, 149 -> 149; (20,20): 452, 976 -> 976;
  (-4,-3): 17, 149 -> 149. Real (0,0), (3,0), (0,4) are 16, 25, 64 from (0,-4) (<= 100) and
  (10,10) is 52 from (6,4) (<= 149): recall 4/4.
  """
  real = np.array([[0., 0.], [3., 0.], [0., 4.], [10., 10.]])
  fake = np.array([[0., -4.], [6., 4.], [20., 20.], [-4., -3.]])
  assert metrics.precision_recall(real, fake, k=2) == (0.5, 1.0)


def test_precision_recall_excludes_self_not_duplicates():
  # k = 1: the real radii are 1 (the other point), not 0 (itself), so 0.5 is inside. The two
  # fake points coincide: each is the other's nearest neighbour at 0, so no real point is in.
  real, fake = np.array([[0.], [1.]]), np.array([[0.5], [0.5]])
  assert metrics.precision_recall(real, fake, k=1) == (1.0, 0.0)


def _precision_recall_brute_force(real, fake, k):
  def radii(x):
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

  def covered(points, centres, r):
    d = np.sqrt(((points[:, None] - centres[None]) ** 2).sum(-1))
    return (d <= r[None]).any(1).mean()

  return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_batch_size_independent_and_brute_force():
  rng = np.random.default_rng(12)
  real, fake = rng.standard_normal((300, 5)), rng.normal(0.4, 1.3, (257, 5))
  want = _precision_recall_brute_force(real, fake, k=3)
  assert 0 < want[0] < 1 and 0 < want[1] < 1 and want[0] != want[1]
  for batch_size in (7, 64, 1000):
    assert metrics.precision_recall(real, fake, k=3, batch_size=batch_size) == want


def test_precision_recall_validation():
  x = np.zeros((3, 2))
  with pytest.raises(ValueError, match="k < N"):
    metrics.precision_recall(x, x, k=3)
  with pytest.raises(ValueError, match="feature sizes"):
    metrics.precision_recall(x, np.zeros((3, 4)), k=1)


# --- all_metrics -----------------------------------------------------------------------------

def test_all_metrics_keys_and_values():
  rng = np.random.default_rng(13)
  a, b = rng.standard_normal((120, 4)), rng.normal(0.2, 1, (100, 4))
  assert set(metrics.all_metrics(a, b, kid=False)) == {"fid"}
  out = metrics.all_metrics(a, b, precision_recall=True)
  assert set(out) == {"fid", "kid_mean", "kid_std", "precision", "recall"}
  assert out["fid"] == metrics.fid_from_features(a, b)
  assert (out["kid_mean"], out["kid_std"]) == metrics.kid(a, b)
  assert (out["precision"], out["recall"]) == metrics.precision_recall(a, b)
