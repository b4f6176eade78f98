"""First-order samplers: DDIM (= Euler in sigma/alpha = DPM-Solver-1), DDIM-eta, DDPM ancestral,
and Euler-Maruyama on the reverse SDE.

With x = alpha x0 + sigma eps, lambda = log(alpha / sigma) and h = lambda_t - lambda_s:

    DDIM      x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) D_s
                  = alpha_t D_s + sigma_t eps_s,                   eps_s = (x_s - alpha_s D_s) / sigma_s
    Euler     x_t / alpha_t = x_s / alpha_s + (sigma_t/alpha_t - sigma_s/alpha_s) eps_s   (same map)
    DDIM-eta  x_t = alpha_t D_s + sqrt(sigma_t^2 - c^2) eps_s + c z,
              c = eta sigma_t sqrt(1 - exp(-2h))                  (eta = 1: DDPM ancestral)
    EM        x_t = x_s + [f x_s - g^2 (alpha_s D_s - x_s) / sigma_s^2] dt + g sqrt(|dt|) z,
              f = alpha'/alpha, g^2 = (sigma^2)' - 2 f sigma^2, dt = t_t - t_s < 0.

The sigma-ratio form is exact when alpha_s = 0 (h = inf): x_t = (sigma_t/sigma_s) x_s + alpha_t D_s.

References:
  Song, Meng & Ermon, Denoising Diffusion Implicit Models, ICLR 2021 (eq. 12).
  Ho, Jain & Abbeel, Denoising Diffusion Probabilistic Models, NeurIPS 2020.
  Lu et al., DPM-Solver, NeurIPS 2022 (DPM-Solver-1 = DDIM, Sec. 3.3).
  Song et al., Score-Based Generative Modeling through SDEs, ICLR 2021 (reverse SDE, eq. 6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import schedules as schedules_lib
from diffdistill.solvers import grids
from diffdistill.solvers import multistep

Array = jax.Array


def _coeffs(schedule, x, t):
  t = jnp.asarray(t, multistep.compute_dtype(x.dtype))
  tb = schedules_lib.broadcast_to(t, x)
  return schedule.alpha(tb), schedule.sigma(tb), jnp.broadcast_to(t, (x.shape[0],))


def ddim_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule,
              rng=None) -> Array:
  """One DDIM step x_s -> x_t = (sigma_t/sigma_s) x_s + (alpha_t - alpha_s sigma_t/sigma_s) D(x_s, s).

  x: [B, ...]; t_s, t_t: scalars or [B]. Exact at alpha_s = 0. One denoiser call.
  Deterministic: rng is accepted (the common step signature) and ignored.
  """
  del rng
  a_s, s_s, ts = _coeffs(schedule, x, t_s)
  a_t, s_t, _ = _coeffs(schedule, x, t_t)
  d = denoise(x, ts)
  ratio = s_t / s_s
  return (ratio * x + (a_t - a_s * ratio) * d).astype(x.dtype)


def ddim_eta_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule,
                  rng: Array | None = None, eta: float = 1.0) -> Array:
  """One DDIM-eta step: x_t = alpha_t D_s + sqrt(sigma_t^2 - c^2) eps_s + c z,
  c = eta sigma_t sqrt(1 - exp(-2h)). eta = 1 (the default) is the DDPM ancestral step: it
  samples the posterior q(x_t | x_s, x0 = D_s). Needs rng (z ~ N(0, I))."""
  multistep.require_rng(rng, "ddim_eta_step")
  a_s, s_s, ts = _coeffs(schedule, x, t_s)
  a_t, s_t, _ = _coeffs(schedule, x, t_t)
  lam_s, lam_t = jnp.log(a_s) - jnp.log(s_s), jnp.log(a_t) - jnp.log(s_t)
  c = eta * s_t * jnp.sqrt(-jnp.expm1(-2.0 * (lam_t - lam_s)))
  d = denoise(x, ts)
  eps = (x - a_s * d) / s_s
  z = jax.random.normal(rng, x.shape, x.dtype)
  return (a_t * d + jnp.sqrt(s_t * s_t - c * c) * eps + c * z).astype(x.dtype)


def euler_maruyama_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule,
                        rng: Array | None = None) -> Array:
  """One Euler-Maruyama step of the reverse SDE dx = [f x - g^2 score] dt + g dw (dt < 0):
  x_t = x_s + (f x_s - g^2 score) dt + sqrt(g^2 |dt|) z. Needs rng; needs alpha_s > 0."""
  multistep.require_rng(rng, "euler_maruyama_step")
  a_s, s_s, ts = _coeffs(schedule, x, t_s)
  tb = schedules_lib.broadcast_to(ts, x)
  f = schedule.d_alpha(tb) / a_s
  g2 = 2.0 * s_s * schedule.d_sigma(tb) - 2.0 * f * s_s * s_s
  dt = schedules_lib.broadcast_to(jnp.broadcast_to(jnp.asarray(t_t, ts.dtype), ts.shape) - ts, x)
  d = denoise(x, ts)
  score = (a_s * d - x) / (s_s * s_s)
  z = jax.random.normal(rng, x.shape, x.dtype)
  return (x + (f * x - g2 * score) * dt + jnp.sqrt(g2 * jnp.abs(dt)) * z).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Coefficient plans for the scan (multistep.Plan), one row per step.
# ---------------------------------------------------------------------------------------------


def ddim_plan(grid: grids.HostGrid) -> multistep.Plan:
  n = grid.num_steps
  ab = np.array([multistep.ddim_coefficients(grid, i) for i in range(n)])
  return multistep.Plan(grid, "data", a=ab[:, 0], b=ab[:, 1:2])


def ddim_eta_plan(grid: grids.HostGrid, eta: float) -> multistep.Plan:
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must lie in [0, 1], got {eta}.")
  h = grid.h
  s_s, s_t, a_s, a_t = grid.sigma[:-1], grid.sigma[1:], grid.alpha[:-1], grid.alpha[1:]
  one_minus = np.where(np.isinf(h), 1.0, -np.expm1(-2.0 * np.where(np.isinf(h), 0.0, h)))
  c = eta * s_t * np.sqrt(one_minus)
  a = np.sqrt(np.maximum(s_t * s_t - c * c, 0.0)) / s_s
  return multistep.Plan(grid, "data", a=a, b=(a_t - a_s * a)[:, None], noise=c)


def euler_maruyama_plan(grid: grids.HostGrid, schedule) -> multistep.Plan:
  t = grid.t
  a_s, s_s = grid.alpha[:-1], grid.sigma[:-1]
  with np.errstate(divide="ignore", invalid="ignore"):
    f = grids._eval(schedule.d_alpha, t[:-1]) / a_s
    g2 = 2.0 * s_s * grids._eval(schedule.d_sigma, t[:-1]) - 2.0 * f * s_s * s_s
    dt = np.diff(t)
    a = 1.0 + f * dt + g2 * dt / (s_s * s_s)
    b = -g2 * a_s * dt / (s_s * s_s)
    noise = np.sqrt(g2 * np.abs(dt))
  if grid.starts_at_pure_noise:
    # f = alpha'/alpha is infinite at alpha = 0: the first step samples the exact DDPM posterior.
    first = ddim_eta_plan(grids.HostGrid(*(v[:2] for v in (grid.t, grid.alpha, grid.sigma,
                                                           grid.lam))), 1.0)
    a[0], b[0], noise[0] = first.a[0], first.b[0, 0], first.noise[0]
  return multistep.Plan(grid, "data", a=a, b=b[:, None], noise=noise)


def run_ddim(denoise, x, grid, *, schedule, rng, in_dtype):
  del schedule, rng
  return multistep.run(denoise, x, ddim_plan(grid), in_dtype=in_dtype)


def run_ddim_eta(denoise, x, grid, *, schedule, rng, in_dtype, eta=0.5):
  del schedule
  return multistep.run(denoise, x, ddim_eta_plan(grid, eta), rng=rng, in_dtype=in_dtype)


def run_ddpm(denoise, x, grid, *, schedule, rng, in_dtype):
  del schedule
  return multistep.run(denoise, x, ddim_eta_plan(grid, 1.0), rng=rng, in_dtype=in_dtype)


def run_euler_maruyama(denoise, x, grid, *, schedule, rng, in_dtype):
  return multistep.run(denoise, x, euler_maruyama_plan(grid, schedule), rng=rng, in_dtype=in_dtype)


__all__ = ["ddim_step", "ddim_eta_step", "euler_maruyama_step", "ddim_plan", "ddim_eta_plan",
           "euler_maruyama_plan"]
