"""k-diffusion's samplers (`k_diffusion/sampling.py`, spec section 5.2) as pure, jit-able JAX.

Every sampler is `sample_<name>(denoiser, x, sigmas, *, key=None, noise_fn=None, **options)` with
k-diffusion's defaults: `denoiser(x, sigma_batch) -> denoised` (sigma_batch [B]); `x` [B, ...] the
start x_T = noise * sigmas[0], in any layout (NHWC for our models); `sigmas` [n + 1] decreasing,
usually ending in 0 (see `schedules`). The n steps run in one `lax.scan`; branches with extra
denoiser or noise calls (e.g. Heun's correction, skipped on the step to sigma = 0) are `lax.cond`s.
The arithmetic follows k-diffusion's order of operations, so float32 results agree with PyTorch's to
~1e-7 and float64 ones to ~1e-15. `dpm_fast` / `dpm_adaptive` (in `dpm_solver.py`) take
`(sigma_min, sigma_max[, n])` instead of `sigmas`, as in k-diffusion.

Noise: stochastic samplers take a `jax.random` key; noise call i (in k-diffusion's call order,
counting only the calls it makes) draws N(0, I) from `fold_in(key, i)`, and
`noise_fn(i, sigma, sigma_next)` can replace the draws (e.g. to replay PyTorch's noise). The churn
samplers (euler, heun, dpm_2 with s_churn > 0) draw one normal every step, used only where
gamma > 0, as k-diffusion's `randn_like`. k-diffusion's SDE samplers (dpmpp_sde, dpmpp_2m_sde,
dpmpp_3m_sde) default to a Brownian-tree noise sampler; here they use i.i.d. normals, which have the
same distribution for a fixed schedule (the tree only makes one seed's noise consistent across
different schedules).

With `return_trajectory=True` a sampler returns `(x, trajectory)`, trajectory [n + 1, B, ...]: x at
the start of each step (k-diffusion's callback `x`, after churn noise), then the result.
"""

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hdit_jax.diffusion.dpm_solver import (Denoiser, NoiseFn, call_denoiser, get_ancestral_step,
                                           is_zero, noise_source, sample_dpm_adaptive,
                                           sample_dpm_fast, working_dtype)

def to_d(x: jax.Array, sigma: jax.Array, denoised: jax.Array) -> jax.Array:
  """Karras ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (sigma a scalar)."""
  return (x - denoised) / sigma


def _sigma_fn(t):
  return jnp.exp(-t)


def _t_fn(sigma):
  return -jnp.log(sigma)


def _setup(x, sigmas):
  dtype = working_dtype(x)
  return jnp.asarray(x, dtype), jnp.asarray(sigmas, dtype)


def _named(fn, name: str, doc: str):
  fn.__name__ = fn.__qualname__ = name
  fn.__doc__ = doc
  return fn


def _scan(step, carry, n: int, return_trajectory: bool):
  """Runs `step(carry, i) -> (carry, x_at_step_start)` for i < n; carry[0] is x."""
  def body(c, i):
    c, x_cb = step(c, i)
    return c, (x_cb if return_trajectory else None)

  carry, traj = lax.scan(body, carry, jnp.arange(n, dtype=jnp.int32))
  x = carry[0]
  return (x, jnp.concatenate([traj, x[None]], 0)) if return_trajectory else x


# -- Karras et al. (2022) Algorithm 2 family: Euler, Heun, DPM-2, with optional churn ----------


def _churn_sampler(method: str):
  """Builds euler / heun / dpm_2 with Karras churn: sigma_hat = sigma (1 + gamma), Alg. 2 l. 4-6."""

  def sampler(denoiser: Denoiser, x: jax.Array, sigmas: jax.Array, *, key=None,
              noise_fn: NoiseFn | None = None, s_churn=0., s_tmin=0., s_tmax=float("inf"),
              s_noise=1., return_trajectory: bool = False):
    x, sigmas = _setup(x, sigmas)
    n = sigmas.shape[0] - 1
    churn = not is_zero(s_churn)
    noise = noise_source(key, noise_fn, x, needed=churn)
    # gamma = min(s_churn / N, sqrt 2 - 1) inside [s_tmin, s_tmax]; 1 + gamma in Python double.
    gamma_max = min(s_churn / n, 2 ** 0.5 - 1) if isinstance(s_churn, numbers.Real) else (
        jnp.minimum(s_churn / n, 2 ** 0.5 - 1))

    def step(carry, i):
      (x,) = carry
      sigma, sigma_next = sigmas[i], sigmas[i + 1]
      sigma_hat = sigma
      if churn:
        on = (s_tmin <= sigma) & (sigma <= s_tmax) & (gamma_max > 0)
        eps = noise(i, sigma, sigma_next) * s_noise  # drawn every step, as k-diffusion
        sigma_hat = jnp.where(on, sigma * (gamma_max + 1), sigma)
        x = jnp.where(on, x + eps * jnp.sqrt(sigma_hat ** 2 - sigma ** 2), x)
      d = to_d(x, sigma_hat, call_denoiser(denoiser, x, sigma_hat))
      dt = sigma_next - sigma_hat
      if method == "euler":
        return (x + d * dt,), x

      def second_order():
        if method == "heun":  # trapezoid rule with d at sigma_next
          x_2 = x + d * dt
          d_2 = to_d(x_2, sigma_next, call_denoiser(denoiser, x_2, sigma_next))
          return x + (d + d_2) / 2 * dt
        # dpm_2: midpoint at the geometric mean, torch.lerp(log a, log b, 0.5) = b - (b - a) / 2
        log_hat, log_next = jnp.log(sigma_hat), jnp.log(sigma_next)
        sigma_mid = jnp.exp(log_next - (log_next - log_hat) * 0.5)
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = to_d(x_2, sigma_mid, call_denoiser(denoiser, x_2, sigma_mid))
        return x + d_2 * dt

      return (lax.cond(sigma_next == 0, lambda: x + d * dt, second_order),), x

    return _scan(step, (x,), n, return_trajectory)

  return sampler


sample_euler = _named(_churn_sampler("euler"), "sample_euler",
    "Euler steps, Karras et al. (2022) Alg. 2 with optional churn (1 NFE/step).")
sample_heun = _named(_churn_sampler("heun"), "sample_heun",
    "Heun steps, Karras et al. (2022) Alg. 2 (2 NFE/step, Euler to sigma = 0).")
sample_dpm_2 = _named(_churn_sampler("dpm_2"), "sample_dpm_2",
    "DPM-Solver-2-like midpoint steps at sqrt(sigma_hat sigma_next) + churn.")


# -- Ancestral samplers ---------------------------------------------------------------------------


def _ancestral_sampler(method: str):
  """Builds euler_ancestral / dpm_2_ancestral / dpmpp_2s_ancestral (step to sigma_down + noise)."""

  def sampler(denoiser: Denoiser, x: jax.Array, sigmas: jax.Array, *, key=None,
              noise_fn: NoiseFn | None = None, eta=1., s_noise=1.,
              return_trajectory: bool = False):
    x, sigmas = _setup(x, sigmas)
    noise = noise_source(key, noise_fn, x, needed=not is_zero(eta))

    def step(carry, i):
      x, count = carry
      sigma, sigma_next = sigmas[i], sigmas[i + 1]
      denoised = call_denoiser(denoiser, x, sigma)
      sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
      euler = lambda: x + to_d(x, sigma, denoised) * (sigma_down - sigma)
      if method == "euler":
        x_new, noisy = euler(), sigma_next > 0
      elif method == "dpm_2":  # midpoint in log sigma; noise only after the 2nd-order branch
        def midpoint():
          log_s, log_down = jnp.log(sigma), jnp.log(sigma_down)
          sigma_mid = jnp.exp(log_down - (log_down - log_s) * 0.5)
          x_2 = x + to_d(x, sigma, denoised) * (sigma_mid - sigma)
          d_2 = to_d(x_2, sigma_mid, call_denoiser(denoiser, x_2, sigma_mid))
          return x + d_2 * (sigma_down - sigma)
        x_new, noisy = lax.cond(sigma_down == 0, euler, midpoint), sigma_down != 0
      else:  # dpmpp_2s: DPM-Solver++(2S), Lu et al. 2022b Alg. 1 with r = 1/2, in t = -ln sigma
        def dpmpp_2s():
          t, t_next = _t_fn(sigma), _t_fn(sigma_down)
          h = t_next - t
          s = t + 0.5 * h
          x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - jnp.expm1(-h * 0.5) * denoised
          denoised_2 = call_denoiser(denoiser, x_2, _sigma_fn(s))
          return (_sigma_fn(t_next) / _sigma_fn(t)) * x - jnp.expm1(-h) * denoised_2
        x_new, noisy = lax.cond(sigma_down == 0, euler, dpmpp_2s), sigma_next > 0
      x_new = lax.cond(noisy, lambda: x_new + noise(count, sigma, sigma_next) * s_noise * sigma_up,
                       lambda: x_new)
      return (x_new, count + noisy.astype(jnp.int32)), x

    return _scan(step, (x, jnp.int32(0)), sigmas.shape[0] - 1, return_trajectory)

  return sampler


sample_euler_ancestral = _named(_ancestral_sampler("euler"), "sample_euler_ancestral",
    "Ancestral sampling with Euler steps (1 NFE/step).")
sample_dpm_2_ancestral = _named(_ancestral_sampler("dpm_2"), "sample_dpm_2_ancestral",
    "Ancestral sampling with DPM-2-like midpoint steps (2 NFE/step).")
sample_dpmpp_2s_ancestral = _named(_ancestral_sampler("dpmpp_2s"), "sample_dpmpp_2s_ancestral",
    "Ancestral sampling with DPM-Solver++(2S) steps (2 NFE/step).")


# -- Linear multistep -----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="order")
def lms_coeffs(sigmas: jax.Array, order: int = 4) -> jax.Array:
  """LMS coefficients [n, order]: c[i, j] multiplies the derivative of step i - j.

  c[i, j] = int_{sigma_i}^{sigma_{i+1}} prod_{k != j, k < o} (tau - sigma_{i-k}) / (sigma_{i-j} -
  sigma_{i-k}) dtau with o = min(i + 1, order); entries j >= o are 0. The integrand is a polynomial
  of degree o - 1, so ceil(order / 2)-point Gauss-Legendre quadrature is exact (k-diffusion uses
  scipy's adaptive quad on the same integrand). Computed in sigmas' dtype; jit-able.
  """
  n = sigmas.shape[0] - 1
  nodes, weights = np.polynomial.legendre.leggauss(max(1, (order + 1) // 2))
  i = jnp.arange(n)[:, None, None, None]  # [n, j, k, node]
  j = jnp.arange(order)[None, :, None, None]
  k = jnp.arange(order)[None, None, :, None]
  cur = jnp.minimum(i + 1, order)
  lo, hi = sigmas[i], sigmas[i + 1]
  tau = (lo + hi) / 2 + (hi - lo) / 2 * jnp.asarray(nodes, sigmas.dtype)
  s_j, s_k = sigmas[jnp.maximum(i - j, 0)], sigmas[jnp.maximum(i - k, 0)]
  used = (k < cur) & (k != j)
  factor = jnp.where(used, (tau - s_k) / jnp.where(used, s_j - s_k, 1), 1)
  quad = jnp.sum(jnp.asarray(weights, sigmas.dtype) * factor.prod(2, keepdims=True), -1,
                 keepdims=True)
  integral = ((hi - lo) / 2 * quad)[:, :, 0, 0]  # [n, order]
  return jnp.where(j[:, :, 0, 0] < cur[:, :, 0, 0], integral, 0)


def sample_lms(denoiser: Denoiser, x: jax.Array, sigmas: jax.Array, *, key=None,
               noise_fn: NoiseFn | None = None, order: int = 4, return_trajectory: bool = False):
  """Linear multistep (Adams-Bashforth in sigma) of `order` (static), 1 NFE/step; key unused."""
  del key, noise_fn
  x, sigmas = _setup(x, sigmas)
  coeffs = lms_coeffs(sigmas, order)

  def step(carry, i):
    x, ds = carry
    d = to_d(x, sigmas[i], call_denoiser(denoiser, x, sigmas[i]))
    ds = jnp.concatenate([d[None], ds[:-1]], 0)  # ds[j] = derivative of step i - j
    update = coeffs[i, 0] * ds[0]
    for jj in range(1, order):  # k-diffusion's sum order; unused terms add exact zeros
      update = update + coeffs[i, jj] * ds[jj]
    return (x + update, ds), x

  ds0 = jnp.zeros((order,) + x.shape, x.dtype)
  return _scan(step, (x, ds0), sigmas.shape[0] - 1, return_trajectory)


# -- DPM-Solver++ (Lu et al. 2022b, arXiv:2211.01095), in t = -ln sigma, h = t_next - t ----------


def sample_dpmpp_sde(denoiser: Denoiser, x: jax.Array, sigmas: jax.Array, *, key=None,
                     noise_fn: NoiseFn | None = None, eta=1., s_noise=1., r=1 / 2,
                     return_trajectory: bool = False):
  """Stochastic DPM-Solver++ (2 NFE/step): an ancestral stage to s = t + r h, then a second one
  from t to t_next using D_d = (1 - 1/(2r)) D + 1/(2r) D(x_2, sigma(s)). Two noise calls per step;
  the step to sigma = 0 is Euler (no noise)."""
  x, sigmas = _setup(x, sigmas)
  noise = noise_source(key, noise_fn, x, needed=not is_zero(eta))

  def step(carry, i):
    x, count = carry
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    denoised = call_denoiser(denoiser, x, sigma)

    def stochastic():
      t, t_next = _t_fn(sigma), _t_fn(sigma_next)
      h = t_next - t
      s = t + h * r
      fac = 1 / (2 * r)
      sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(s), eta)
      s_ = _t_fn(sd)
      x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - jnp.expm1(t - s_) * denoised
      x_2 = x_2 + noise(count, _sigma_fn(t), _sigma_fn(s)) * s_noise * su
      denoised_2 = call_denoiser(denoiser, x_2, _sigma_fn(s))
      sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
      t_next_ = _t_fn(sd)
      denoised_d = (1 - fac) * denoised + fac * denoised_2
      x_new = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - jnp.expm1(t - t_next_) * denoised_d
      return x_new + noise(count + 1, _sigma_fn(t), _sigma_fn(t_next)) * s_noise * su

    last = sigma_next == 0
    x_new = lax.cond(last, lambda: x + to_d(x, sigma, denoised) * (sigma_next - sigma), stochastic)
    return (x_new, count + jnp.where(last, 0, 2).astype(jnp.int32)), x

  return _scan(step, (x, jnp.int32(0)), sigmas.shape[0] - 1, return_trajectory)


def sample_dpmpp_2m(denoiser: Denoiser, x: jax.Array, sigmas: jax.Array, *, key=None,
                    noise_fn: NoiseFn | None = None, return_trajectory: bool = False):
  """DPM-Solver++(2M) (ODE, 1 NFE/step): x <- (sigma_next/sigma) x - (e^-h - 1) D', with
  D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_last / h (D' = D_i on the first and last step)."""
  del key, noise_fn
  x, sigmas = _setup(x, sigmas)

  def step(carry, i):
    x, old_denoised = carry
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    denoised = call_denoiser(denoiser, x, sigma)
    t, t_next = _t_fn(sigma), _t_fn(sigma_next)
    h = t_next - t
    r = (t - _t_fn(sigmas[jnp.maximum(i - 1, 0)])) / h
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    first_order = (i == 0) | (sigma_next == 0)
    denoised_d = jnp.where(first_order, denoised, denoised_d)  # the masked branch may be inf/nan
    return ((_sigma_fn(t_next) / _sigma_fn(t)) * x - jnp.expm1(-h) * denoised_d, denoised), x

  return _scan(step, (x, jnp.zeros_like(x)), sigmas.shape[0] - 1, return_trajectory)


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: jax.Array, sigmas: jax.Array, *, key=None,
                        noise_fn: NoiseFn | None = None, eta=1., s_noise=1.,
                        solver_type: str = "midpoint", return_trajectory: bool = False):
  """DPM-Solver++(2M) SDE (1 NFE/step), solver_type 'midpoint' or 'heun' for the 2nd-order term;
  noise sigma_next sqrt(1 - e^{-2 eta h}) s_noise per step (none with eta = 0 or to sigma = 0)."""
  if solver_type not in ("heun", "midpoint"):
    raise ValueError("solver_type must be 'heun' or 'midpoint'")
  x, sigmas = _setup(x, sigmas)
  noisy = not is_zero(eta)
  noise = noise_source(key, noise_fn, x, needed=noisy)

  def step(carry, i):
    x, old_denoised, h_last, count = carry
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    denoised = call_denoiser(denoiser, x, sigma)

    def sde():
      t, s = -jnp.log(sigma), -jnp.log(sigma_next)
      h = s - t
      eta_h = eta * h
      x_new = sigma_next / sigma * jnp.exp(-eta_h) * x + -jnp.expm1(-h - eta_h) * denoised
      r = h_last / h
      if solver_type == "heun":
        coef = (-jnp.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r)
      else:
        coef = 0.5 * -jnp.expm1(-h - eta_h) * (1 / r)
      x_new = jnp.where(i > 0, x_new + coef * (denoised - old_denoised), x_new)  # i = 0: r = 0
      if noisy:
        z = noise(count, sigma, sigma_next)
        x_new = x_new + z * sigma_next * jnp.sqrt(-jnp.expm1(-2 * eta_h)) * s_noise
      return x_new, h, count + int(noisy)

    # The step to sigma = 0 returns D (no noise) and keeps h_last, as k-diffusion.
    x, h_last, count = lax.cond(sigma_next == 0, lambda: (denoised, h_last, count), sde)
    return (x, denoised, h_last, count), carry[0]

  zero = jnp.zeros((), x.dtype)
  return _scan(step, (x, jnp.zeros_like(x), zero, jnp.int32(0)), sigmas.shape[0] - 1,
               return_trajectory)


def sample_dpmpp_3m_sde(denoiser: Denoiser, x: jax.Array, sigmas: jax.Array, *, key=None,
                        noise_fn: NoiseFn | None = None, eta=1., s_noise=1.,
                        return_trajectory: bool = False):
  """DPM-Solver++(3M) SDE (1 NFE/step): exponential integrator with h_eta = h (1 + eta) and 2nd/3rd
  order corrections phi_2 d1 - phi_3 d2 from the last two denoised outputs; the paper's FID
  sampler (spec 5.4, eta = 1)."""
  x, sigmas = _setup(x, sigmas)
  noisy = not is_zero(eta)
  noise = noise_source(key, noise_fn, x, needed=noisy)

  def step(carry, i):
    x, den_1, den_2, h, h_1, h_2, count = carry
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    denoised = call_denoiser(denoiser, x, sigma)

    def sde():
      t, s = -jnp.log(sigma), -jnp.log(sigma_next)
      h = s - t
      h_eta = h * (eta + 1)
      x_new = jnp.exp(-h_eta) * x + -jnp.expm1(-h_eta) * denoised
      phi_2 = jnp.expm1(-h_eta) / h_eta + 1
      # Three-point (i >= 2) and two-point (i == 1) multistep corrections; masked ones may be nan.
      r0, r1 = h_1 / h, h_2 / h
      d1_0 = (denoised - den_1) / r0
      d1_1 = (den_1 - den_2) / r1
      d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      phi_3 = phi_2 / h_eta - 0.5
      x_3 = x_new + phi_2 * d1 - phi_3 * d2
      x_2 = x_new + phi_2 * ((denoised - den_1) / (h_1 / h))
      x_new = jnp.where(i >= 2, x_3, jnp.where(i == 1, x_2, x_new))
      if noisy:
        z = noise(count, sigma, sigma_next)
        x_new = x_new + z * sigma_next * jnp.sqrt(-jnp.expm1(-2 * h * eta)) * s_noise
      return x_new, h, count + int(noisy)

    # The step to sigma = 0 returns D (no noise) and keeps the previous h, as k-diffusion.
    x, h, count = lax.cond(sigma_next == 0, lambda: (denoised, h, count), sde)
    return (x, denoised, den_1, h, h, h_1, count), carry[0]

  zero = jnp.zeros((), x.dtype)
  init = (x, jnp.zeros_like(x), jnp.zeros_like(x), zero, zero, zero, jnp.int32(0))
  return _scan(step, init, sigmas.shape[0] - 1, return_trajectory)


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,  # (denoiser, x, sigma_min, sigma_max, n)
    "dpm_adaptive": sample_dpm_adaptive,  # (denoiser, x, sigma_min, sigma_max)
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
}
"""Sampler name (k-diffusion's, without `sample_`) -> function."""

STOCHASTIC = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                        "dpmpp_2m_sde", "dpmpp_3m_sde"})
"""Samplers that need a key by default (churn and eta > 0 make others need one too)."""
