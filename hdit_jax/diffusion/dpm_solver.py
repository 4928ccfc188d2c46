"""DPM-Solver (Lu et al. 2022, arXiv:2206.00927) as k-diffusion's `DPMSolver` (spec section 5.2).

`sample_dpm_fast` (fixed steps, orders 3,...,3,{2,1}) and `sample_dpm_adaptive` (embedded (1,2) or
(2,3) pairs with a PID step-size controller, in `lax.while_loop`). Both work in the eps form with
t = -ln(sigma) and stop at sigma_min (no final jump to 0). Unlike the `sigmas`-grid samplers they
take k-diffusion's `(sigma_min, sigma_max[, n])` arguments.

This module also holds the primitives shared with `samplers.py` (denoiser call, noise source,
ancestral split); `samplers.py` imports them from here, so there is no import cycle.
"""

import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hdit_jax.diffusion import schedules

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
NoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def is_zero(v) -> bool:
  """True only for a concrete 0 (a traced value may be non-zero, so it counts as non-zero)."""
  return isinstance(v, (numbers.Real, np.floating, np.integer)) and v == 0


def working_dtype(x: jax.Array):
  """The dtype a sampler computes in: x's float dtype, at least float32."""
  return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def call_denoiser(denoiser: Denoiser, x: jax.Array, sigma: jax.Array) -> jax.Array:
  """D(x, sigma * 1_B) with a scalar sigma; x is [B, ...] in any layout (NHWC or NCHW)."""
  return denoiser(x, jnp.broadcast_to(sigma, (x.shape[0],))).astype(x.dtype)


def noise_source(key: jax.Array | None, noise_fn: NoiseFn | None, like: jax.Array,
                 needed: bool = True) -> NoiseFn:
  """Returns `noise(call_index, sigma, sigma_next)` -> N(0, I) shaped like `like`.

  `noise_fn` (if given) replaces the draws, e.g. with a pre-drawn pool indexed by call_index in
  k-diffusion's call order. Otherwise call i draws from `fold_in(key, i)`, which is i.i.d. across
  calls. k-diffusion's SDE samplers default to a Brownian-tree noise sampler instead; for a fixed
  schedule its increments (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| are i.i.d. N(0, I)
  as well, so both give the same distribution of samples (not bitwise equal to PyTorch anyway).
  """
  if noise_fn is not None:
    return lambda i, s, s_next: jnp.asarray(noise_fn(i, s, s_next), like.dtype)
  if key is None:
    if needed:
      raise ValueError("this sampler is stochastic: pass `key` (or `noise_fn`)")
    return lambda i, s, s_next: jnp.zeros(like.shape, like.dtype)
  return lambda i, s, s_next: jax.random.normal(jax.random.fold_in(key, i), like.shape, like.dtype)


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
  """Ancestral split of a step sigma_from -> sigma_to into (sigma_down, sigma_up).

  sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)) as
  k-diffusion, and sigma_down = sqrt(sigma_to^2 - sigma_up^2), evaluated (when sigma_up is not
  clipped) as sigma_to sqrt((1 - eta^2) + eta^2 sigma_to^2 / sigma_from^2), the same value without
  the cancellation of sigma_to^2 - sigma_up^2. That cancellation costs up to
  ~sigma_from^2 / sigma_to^2 ulp in float32 (~100 on a 10-step schedule), which the DPM-Solver's
  t(sigma_down) and noise scale then inherit; with it, float32 dpm_fast(eta=1) lands 9e-6 off
  PyTorch's float32 result, and 3e-6 without (PyTorch's own float32 error). eta = 0 gives
  (sigma_to, 0).
  """
  if is_zero(eta):
    return sigma_to, jnp.zeros_like(sigma_to)
  var = sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2
  sigma_up = jnp.minimum(sigma_to, eta * jnp.sqrt(var))
  down2 = sigma_to ** 2 * ((1 - eta ** 2) + eta ** 2 * (sigma_to ** 2 / sigma_from ** 2))
  return jnp.sqrt(jnp.where(sigma_up < sigma_to, jnp.maximum(down2, 0), 0)), sigma_up


def _sigma(t):
  return jnp.exp(-t)


def _t(sigma):
  return -jnp.log(sigma)


def _eps_fn(denoiser: Denoiser):
  """eps(x, t) = (x - D(x, e^-t)) / e^-t, the noise prediction at time t = -ln(sigma)."""
  return lambda x, t: (x - call_denoiser(denoiser, x, _sigma(t))) / _sigma(t)


def _step_1(x, t_next, h, eps):
  """DPM-Solver-1 (DDIM): x' = x - sigma(t_next) (e^h - 1) eps."""
  return x - _sigma(t_next) * jnp.expm1(h) * eps


def _u1(x, t, h, eps, r1):
  """Intermediate point at s1 = t + r1 h: u1 = x - sigma(s1) (e^{r1 h} - 1) eps."""
  s1 = t + r1 * h
  return x - _sigma(s1) * jnp.expm1(r1 * h) * eps, s1


def _step_2(x, t_next, h, eps, eps_r1, r1):
  """DPM-Solver-2 (paper Alg. 1) from eps at t and eps_r1 at t + r1 h."""
  return (x - _sigma(t_next) * jnp.expm1(h) * eps
          - _sigma(t_next) / (2 * r1) * jnp.expm1(h) * (eps_r1 - eps))


def _step_3(eps_fn, x, t, t_next, h, eps, eps_r1, r1=1 / 3, r2=2 / 3):
  """DPM-Solver-3 (paper Alg. 2) from eps at t and eps_r1 at t + r1 h; one more eval at t + r2 h."""
  s2 = t + r2 * h
  u2 = (x - _sigma(s2) * jnp.expm1(r2 * h) * eps
        - _sigma(s2) * (r2 / r1) * (jnp.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
  eps_r2 = eps_fn(u2, s2)
  return x - _sigma(t_next) * jnp.expm1(h) * eps - _sigma(t_next) / r2 * (jnp.expm1(h) / h - 1) * (
      eps_r2 - eps)


def _dpm_step(eps_fn, order: int, x, t, t_next):
  """One DPM-Solver step of `order` (1, 2 with r1 = 1/2, or 3) from t to t_next."""
  h = t_next - t
  eps = eps_fn(x, t)
  if order == 1:
    return _step_1(x, t_next, h, eps)
  r1 = 1 / 2 if order == 2 else 1 / 3
  u1, s1 = _u1(x, t, h, eps, r1)
  eps_r1 = eps_fn(u1, s1)
  if order == 2:
    return _step_2(x, t_next, h, eps, eps_r1, r1)
  return _step_3(eps_fn, x, t, t_next, h, eps, eps_r1)


def _eta_target(t, t_next, t_end, eta):
  """With eta > 0: step to t_next_ = min(t_end, t(sigma_down)) and add sigma_up-scaled noise."""
  if is_zero(eta):
    return t_next, None
  sd, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
  t_next_ = jnp.minimum(t_end, _t(sd))
  return t_next_, jnp.sqrt(_sigma(t_next) ** 2 - _sigma(t_next_) ** 2)


def _solver_setup(denoiser, x, sigma_min, sigma_max, key, noise_fn, eta):
  """x in the working dtype, the noise source, eps(x, t), and t = -log sigma at both ends."""
  if _concrete_nonpositive(sigma_min) or _concrete_nonpositive(sigma_max):
    raise ValueError("sigma_min and sigma_max must not be 0")
  dtype = working_dtype(x)
  x = jnp.asarray(x, dtype)
  noise = noise_source(key, noise_fn, x, needed=not is_zero(eta))
  t_start, t_end = _t(jnp.asarray(sigma_max, dtype)), _t(jnp.asarray(sigma_min, dtype))
  return x, noise, _eps_fn(denoiser), t_start, t_end


def sample_dpm_fast(denoiser: Denoiser, x: jax.Array, sigma_min, sigma_max, n: int, *,
                    key=None, noise_fn: NoiseFn | None = None, eta=0., s_noise=1.,
                    return_trajectory: bool = False):
  """DPM-Solver-Fast: n denoiser evaluations on m = floor(n/3) + 1 steps uniform in t = -ln sigma.

  Orders are [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]. Noise call i is made
  on step i (with eta > 0). Args: x [B, ...] the start (noise * sigma_max); n static. Returns x at
  sigma_min (and with return_trajectory, [m + 1, B, ...]: x before each step, then the result).
  """
  x, noise, eps_fn, t_start, t_end = _solver_setup(denoiser, x, sigma_min, sigma_max, key,
                                                   noise_fn, eta)
  dtype = x.dtype
  m = math.floor(n / 3) + 1
  ts = schedules.linspace(t_start, t_end, m + 1, dtype)
  orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]

  def step(x, i, order):
    t, t_next = ts[i], ts[i + 1]
    t_next_, su = _eta_target(t, t_next, t_end, eta)
    x_new = _dpm_step(eps_fn, order, x, t, t_next_)
    if su is not None:
      x_new = x_new + su * s_noise * noise(i, _sigma(t), _sigma(t_next))
    return x_new, x

  n3 = next((k for k, o in enumerate(orders) if o != 3), len(orders))  # leading order-3 run
  x, traj = lax.scan(lambda x, i: step(x, i, 3), x, jnp.arange(n3, dtype=jnp.int32))
  trajs = [traj]
  for i in range(n3, len(orders)):  # at most 2 lower-order tail steps
    x, x_cb = step(x, jnp.int32(i), orders[i])
    trajs.append(x_cb[None])
  if return_trajectory:
    return x, jnp.concatenate(trajs + [x[None]], 0)
  return x


def _concrete_nonpositive(v) -> bool:
  return isinstance(v, (numbers.Real, np.floating, np.integer)) and v <= 0


def sample_dpm_adaptive(denoiser: Denoiser, x: jax.Array, sigma_min, sigma_max, *, key=None,
                        noise_fn: NoiseFn | None = None, order: int = 3, rtol=0.05,
                        atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0.,
                        accept_safety=0.81, eta=0., s_noise=1., return_info: bool = False,
                        max_steps: int | None = None):
  """DPM-Solver-12 / -23 with adaptive steps (paper section 4.2 and Alg. 4/5), in `lax.while_loop`.

  Each attempt from s to t = s + h computes x_low (order - 1) and x_high (order) sharing the
  evaluations, error = ||(x_low - x_high) / delta||_2 / sqrt(numel) with
  delta = max(atol, rtol max(|x_low|, |x_prev|)), and a PID controller (Soderlind 2003) with
  limiter 1 + atan(f - 1) proposes h <- h f; the step is accepted if f >= accept_safety. Noise call
  i is made on the i-th accepted step (with eta > 0). k-diffusion runs the controller in Python
  double; here it runs in x's dtype (float32 step sizes differ by rounding; the counts match on
  the fixture, and the result is within 1.3e-4 of PyTorch's, whose float32 error is 1.9e-3).

  Args: x [B, ...] the start (noise * sigma_max); order 2 or 3 (static); max_steps an optional
    bound on attempts (k-diffusion has none). Returns x at sigma_min, and with return_info also
    {'steps', 'nfe', 'n_accept', 'n_reject'} (int32 scalars).
  """
  if order not in (2, 3):
    raise ValueError("order should be 2 or 3")
  x, noise, eps_fn, t_start, t_end = _solver_setup(denoiser, x, sigma_min, sigma_max, key,
                                                   noise_fn, eta)
  dtype = x.dtype
  forward = t_end > t_start
  if not is_zero(eta) and isinstance(sigma_min, numbers.Real) and sigma_min > sigma_max:
    raise ValueError("eta must be 0 for reverse sampling")
  pid_order = order if is_zero(eta) else (1.5 if not isinstance(eta, jax.Array) else
                                          jnp.where(eta != 0, 1.5, order))
  b1 = (pcoeff + icoeff + dcoeff) / pid_order
  b2 = -(pcoeff + 2 * dcoeff) / pid_order
  b3 = dcoeff / pid_order
  atol, rtol = jnp.asarray(atol, dtype), jnp.asarray(rtol, dtype)
  numel_sqrt = math.sqrt(x.size)
  zero = jnp.int32(0)

  def cond(state):
    s, info = state["s"], state["info"]
    running = jnp.where(forward, s < t_end - 1e-5, s > t_end + 1e-5)
    if max_steps is not None:
      running &= info["steps"] < max_steps
    return running

  def body(state):
    x, x_prev, s, h, errs, info = (state[k] for k in ("x", "x_prev", "s", "h", "errs", "info"))
    t = jnp.where(forward, jnp.minimum(t_end, s + h), jnp.maximum(t_end, s + h))
    t_, su = _eta_target(s, t, t_end, eta)
    hh = t_ - s
    eps = eps_fn(x, s)
    if order == 2:
      x_low = _step_1(x, t_, hh, eps)
      u1, s1 = _u1(x, s, hh, eps, 1 / 2)
      x_high = _step_2(x, t_, hh, eps, eps_fn(u1, s1), 1 / 2)
    else:
      u1, s1 = _u1(x, s, hh, eps, 1 / 3)
      eps_r1 = eps_fn(u1, s1)
      x_low = _step_2(x, t_, hh, eps, eps_r1, 1 / 3)
      x_high = _step_3(eps_fn, x, s, t_, hh, eps, eps_r1)
    delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
    error = jnp.sqrt(jnp.sum(jnp.square((x_low - x_high) / delta))) / numel_sqrt
    # PID controller: factor = e0^b1 e1^b2 e2^b3 on inverse errors, limited, accept if >= safety.
    inv_error = 1 / (error + 1e-8)
    errs = jnp.where(state["started"], errs, inv_error).at[0].set(inv_error)
    factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
    factor = 1 + jnp.arctan(factor - 1)
    accept = factor >= accept_safety
    errs = jnp.where(accept, jnp.stack([errs[0], errs[0], errs[1]]), errs)
    x_acc = x_high
    if su is not None:  # one noise call per accepted step
      x_acc = lax.cond(
          accept, lambda: x_high + su * s_noise * noise(info["n_accept"], _sigma(s), _sigma(t)),
          lambda: x_high)
    new_info = {"steps": info["steps"] + 1, "nfe": info["nfe"] + order,
                "n_accept": info["n_accept"] + accept.astype(jnp.int32),
                "n_reject": info["n_reject"] + (~accept).astype(jnp.int32)}
    return {"x": jnp.where(accept, x_acc, x), "x_prev": jnp.where(accept, x_low, x_prev),
            "s": jnp.where(accept, t, s), "h": h * factor, "errs": errs,
            "started": jnp.bool_(True), "info": new_info}

  h0 = jnp.where(forward, abs(h_init), -abs(h_init)).astype(dtype)
  state = {"x": x, "x_prev": x, "s": t_start, "h": h0, "errs": jnp.ones((3,), dtype),
           "started": jnp.bool_(False),
           "info": {"steps": zero, "nfe": zero, "n_accept": zero, "n_reject": zero}}
  state = lax.while_loop(cond, body, state)
  if return_info:
    return state["x"], state["info"]
  return state["x"]
