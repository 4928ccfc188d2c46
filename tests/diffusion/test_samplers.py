"""Samplers and schedules vs k-diffusion (fixture set C: `samplers.safetensors` / `samplers.json`).

The fixture runs k-diffusion's samplers with the closed-form denoiser of N(mu, s^2) data,
D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2), and a pre-drawn noise pool consumed in call
order; here the same runs replay it through `noise_fn`. Shapes, sigmas, s and the adaptive info come
from the fixture files; only the call protocol of each run (README table) is written down here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2

from hdit_jax.diffusion import samplers, schedules

# Fixture run -> (sampler, options), as the fixture README's table of calls.
CHURN = dict(s_churn=2.0, s_tmin=0.05, s_tmax=50., s_noise=1.003)
RUNS = {
    "euler": ("euler", {}), "heun": ("heun", {}), "dpm_2": ("dpm_2", {}), "lms": ("lms", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_2m_sde_eta0": ("dpmpp_2m_sde", dict(eta=0.)),
    "dpmpp_3m_sde_eta0": ("dpmpp_3m_sde", dict(eta=0.)),
    "dpm_fast": ("dpm_fast", {}), "dpm_adaptive": ("dpm_adaptive", {}),
    "euler_churn": ("euler", CHURN), "heun_churn": ("heun", CHURN),
    "euler_ancestral": ("euler_ancestral", {}), "dpm_2_ancestral": ("dpm_2_ancestral", {}),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}), "dpmpp_sde": ("dpmpp_sde", {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", dict(solver_type="heun")),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}), "dpm_fast_eta1": ("dpm_fast", dict(eta=1.)),
}
DETERMINISTIC = {"euler", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_sde_eta0",
                 "dpmpp_3m_sde_eta0", "dpm_fast", "dpm_adaptive"}


class Recorder:
  """Counts denoiser and noise calls (host callbacks, so only the branches actually taken)."""

  def __init__(self):
    self.nfe, self.noise = 0, {}

  def on_denoise(self, sigma):
    self.nfe += 1

  def on_noise(self, i, sigma, sigma_next):
    self.noise[int(i)] = (float(sigma), float(sigma_next))


def closed_form_denoiser(mu, s, recorder=None):
  """D(x, sigma) for N(mu, s^2) data; sigma [B] broadcast over x's trailing axes (any layout)."""
  def denoiser(x, sigma):
    if recorder is not None:
      jax.debug.callback(recorder.on_denoise, sigma)
    sig2 = jnp.square(sigma.reshape((-1,) + (1,) * (x.ndim - 1)))
    return (s ** 2 * x + sig2 * mu) / (s ** 2 + sig2)
  return denoiser


def pool_noise(pool, recorder=None):
  def noise_fn(i, sigma, sigma_next):
    if recorder is not None:
      jax.debug.callback(recorder.on_noise, i, sigma, sigma_next)
    return pool[i]
  return noise_fn


def call(name, denoiser, x, sigmas, sched, **kw):
  """Runs SAMPLERS[name]; dpm_fast / dpm_adaptive take (sigma_min, sigma_max[, n]) instead."""
  fn = samplers.SAMPLERS[name]
  if name == "dpm_fast":
    return fn(denoiser, x, sched["sigma_min"], sched["sigma_max"], sched["n"], **kw)
  if name == "dpm_adaptive":
    return fn(denoiser, x, sched["sigma_min"], sched["sigma_max"], **kw)
  return fn(denoiser, x, sigmas, **kw)


@pytest.fixture(scope="module")
def fx(kdiff):
  return kdiff.json("samplers.json"), kdiff.tensors("samplers.safetensors")


def run_fixture(fx, run, dtype, recorder=None):
  """Replays one fixture run in `dtype`; returns (x, info or None)."""
  meta, t = fx
  sched = meta["karras_schedule"]
  name, options = RUNS[run]
  if dtype == jnp.float32:
    sigmas, x = jnp.asarray(t["sigmas_karras"]), jnp.asarray(t["x_init"])
  else:  # the float64 runs recompute the schedule and x_init = noise_init * sigma_max in float64
    sigmas = schedules.karras(sched["n"], sched["sigma_min"], sched["sigma_max"], sched["rho"],
                              dtype=dtype)
    x = jnp.asarray(t["noise_init"], dtype) * sigmas[0]
  denoiser = closed_form_denoiser(jnp.asarray(t["mu"], dtype), meta["s"], recorder)
  kw = dict(options, noise_fn=pool_noise(jnp.asarray(t["noise_pool"], dtype), recorder))
  if name == "dpm_adaptive":
    return call(name, denoiser, x, sigmas, sched, return_info=True, **kw)
  return call(name, denoiser, x, sigmas, sched, **kw), None


@pytest.mark.parity
@pytest.mark.parametrize("run", list(RUNS))
def test_fixture_run_float32(fx, run):
  meta, t = fx
  ref = meta["samplers"][run]
  rec = Recorder()
  x, info = run_fixture(fx, run, jnp.float32, rec)
  assert x.dtype == jnp.float32 and x.shape == t[f"{run}.final"].shape
  err = rel_l2(x, t[f"{run}.final"])
  assert err <= (1e-2 if run == "dpm_adaptive" else 1e-5), err
  assert rec.nfe == ref["denoiser_calls"]
  if "adaptive_info" in ref:
    assert {k: int(v) for k, v in info.items()} == ref["adaptive_info"]
  n_noise = ref.get("noise_calls", ref.get("randn_like_calls", 0))
  assert n_noise <= t["noise_pool"].shape[0]
  if run not in DETERMINISTIC:
    assert sorted(rec.noise) == list(range(n_noise))
  if "noise_sampler_args" in ref:
    got = np.array([rec.noise[i] for i in range(n_noise)])
    np.testing.assert_allclose(got, np.array(ref["noise_sampler_args"]), rtol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("run", list(RUNS))
def test_fixture_run_float64(fx, run):
  _, t = fx
  with jax.enable_x64(True):
    x, _ = run_fixture(fx, run, jnp.float64)
    assert x.dtype == jnp.float64
    err = rel_l2(x, t[f"{run}.final_f64"])
  assert err <= 1e-10, err


@pytest.mark.parity
@pytest.mark.parametrize("run", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_fixture_trajectory(fx, run):
  meta, t = fx
  if f"{run}.trajectory" not in t:
    pytest.skip("no trajectory in this fixture folder")
  name, options = RUNS[run]
  denoiser = closed_form_denoiser(jnp.asarray(t["mu"]), meta["s"])
  x, traj = samplers.SAMPLERS[name](
      denoiser, jnp.asarray(t["x_init"]), jnp.asarray(t["sigmas_karras"]),
      noise_fn=pool_noise(jnp.asarray(t["noise_pool"])), return_trajectory=True, **options)
  ref = t[f"{run}.trajectory"]
  assert traj.shape == ref.shape
  for k in range(ref.shape[0]):
    assert rel_l2(traj[k], ref[k]) <= 1e-5, (k, rel_l2(traj[k], ref[k]))
  np.testing.assert_array_equal(traj[-1], x)


@pytest.mark.parity
def test_schedules(fx):
  meta, t = fx
  ks = meta["karras_schedule"]
  got = {"sigmas_karras": schedules.karras(ks["n"], ks["sigma_min"], ks["sigma_max"], ks["rho"])}
  n, smin, smax = meta["other_schedules"]["exponential"]
  got["sigmas_exponential"] = schedules.exponential(n, smin, smax)
  n, smin, smax = meta["other_schedules"]["polyexponential_rho1/rho2"]
  for name in t:
    if name.startswith("sigmas_polyexponential_rho"):
      rho = float(name.removeprefix("sigmas_polyexponential_rho"))
      got[name] = schedules.polyexponential(n, smin, smax, rho)
  got["sigmas_vp"] = schedules.vp(**meta["other_schedules"]["vp"])
  for name, sig in got.items():
    assert sig.dtype == jnp.float32 and sig.shape == t[name].shape and sig[-1] == 0, name
    assert rel_l2(sig, t[name]) <= 1e-6, (name, rel_l2(sig, t[name]))
  # Jit-able with traced sigma_min / sigma_max (then the set-up runs in float32: a few ulp).
  jitted = jax.jit(schedules.karras, static_argnums=0)(ks["n"], ks["sigma_min"], ks["sigma_max"])
  assert rel_l2(jitted, t["sigmas_karras"]) <= 1e-6


@pytest.mark.parity
def test_lms_coeffs(fx):
  meta, t = fx
  ks, ref = meta["karras_schedule"], t["lms_coeffs_f64"]
  # Float32 sigmas are rounded (~4e-7), which moves the coefficients by about as much.
  assert rel_l2(samplers.lms_coeffs(jnp.asarray(t["sigmas_karras"])), ref) <= 1e-5
  with jax.enable_x64(True):
    sigmas = schedules.karras(ks["n"], ks["sigma_min"], ks["sigma_max"], ks["rho"],
                              dtype=jnp.float64)
    coeffs = np.asarray(samplers.lms_coeffs(sigmas))
  np.testing.assert_allclose(coeffs, ref, rtol=1e-12, atol=1e-15)
  np.testing.assert_array_equal(coeffs == 0, ref == 0)


def nhwc_problem(seed=0, shape=(3, 8, 8, 3), n=8):
  rng = np.random.default_rng(seed)
  mu = jnp.asarray(rng.standard_normal(shape[1:]), jnp.float32)
  pool = jnp.asarray(rng.standard_normal((4 * n,) + shape), jnp.float32)
  sched = dict(n=n, sigma_min=0.02, sigma_max=40.)
  sigmas = schedules.karras(n, sched["sigma_min"], sched["sigma_max"])
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32) * sigmas[0]
  return mu, pool, sched, sigmas, x


OPTIONS = {"euler": CHURN, "heun": CHURN, "dpm_2": CHURN, "dpm_fast": dict(eta=1.)}


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_jit_and_layout(name):
  """NHWC batch: jit == eager, and NHWC == NCHW (samplers are layout-agnostic)."""
  mu, pool, sched, sigmas, x = nhwc_problem()
  kw = OPTIONS.get(name, {})
  den = closed_form_denoiser(mu, 0.5)
  eager = call(name, den, x, sigmas, sched, noise_fn=pool_noise(pool), **kw)
  jitted = jax.jit(lambda x: call(name, den, x, sigmas, sched, noise_fn=pool_noise(pool), **kw))(x)
  assert eager.shape == x.shape and eager.dtype == x.dtype and np.isfinite(eager).all()
  assert rel_l2(jitted, eager) <= 1e-6
  to_nchw = lambda a: jnp.moveaxis(a, -1, -3)
  nchw = call(name, closed_form_denoiser(to_nchw(mu), 0.5), to_nchw(x), sigmas, sched,
              noise_fn=pool_noise(to_nchw(pool)), **kw)
  assert rel_l2(to_nchw(eager), nchw) <= 1e-6
  # A few steps of any sampler move x from noise level sigma_max towards the data.
  data = jnp.broadcast_to(mu, x.shape)
  assert rel_l2(eager, data) < 0.5 * rel_l2(x, data)


@pytest.mark.parametrize("name", sorted(samplers.STOCHASTIC | {"euler", "dpm_fast"}))
def test_key_reproducible(name):
  """Same key -> same sample; another key -> another sample; trajectory ends at the sample."""
  mu, _, sched, sigmas, x = nhwc_problem(seed=1)
  den = closed_form_denoiser(mu, 0.5)
  kw = OPTIONS.get(name, {})
  if name != "dpm_fast":
    kw = dict(kw, return_trajectory=True)
  fn = jax.jit(lambda x, key: call(name, den, x, sigmas, sched, key=key, **kw))
  a, a2, b = fn(x, jax.random.key(0)), fn(x, jax.random.key(0)), fn(x, jax.random.key(1))
  if name != "dpm_fast":
    (a, traj), (a2, _), (b, _) = a, a2, b
    assert traj.shape == (sigmas.shape[0],) + x.shape
    np.testing.assert_array_equal(traj[-1], a)
  np.testing.assert_array_equal(a, a2)
  assert rel_l2(a, b) > 1e-2
  with pytest.raises(ValueError, match="key"):
    call(name, den, x, sigmas, sched, **{k: v for k, v in kw.items() if k != "return_trajectory"})


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m", "dpm_adaptive"])
def test_deterministic_needs_no_key(name):
  mu, _, sched, sigmas, x = nhwc_problem(seed=2)
  den = closed_form_denoiser(mu, 0.5)
  a = call(name, den, x, sigmas, sched)
  b = call(name, den, x, sigmas, sched, key=jax.random.key(3))
  np.testing.assert_array_equal(a, b)
