"""EDM's samplers: Heun's 2nd-order method (Alg. 1) and the stochastic sampler (Alg. 2).

Both integrate the probability-flow ODE in sigma_hat = sigma / alpha on y = x / alpha, where it
reads dy / dsigma_hat = eps_hat(x, t) = (x - alpha D(x, t)) / sigma:

    Euler   y' = y_s + (sigma_hat_t - sigma_hat_s) eps_s          (= the DDIM map)
    Heun    y_t = y_s + (sigma_hat_t - sigma_hat_s) (eps_s + eps(y', t)) / 2

and, as in EDM, the last step is an Euler step (N steps cost 2N - 1 calls; `final_euler=False`
makes every step Heun, 2N calls). The stochastic sampler first raises the noise level,
sigma_hat -> sigma_hat (1 + gamma), gamma = min(S_churn / N, sqrt(2) - 1) for
S_tmin <= sigma_hat <= S_tmax, adding sqrt(sigma_hat_new^2 - sigma_hat^2) S_noise z to y, then
takes the Heun step from the raised level (the raised level is clipped at t_max).

References:
  Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models,
  NeurIPS 2022 (Algorithms 1 and 2; Table 5 for S_churn = 40, S_tmin = 0.05, S_tmax = 50,
  S_noise = 1.003).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import schedules as schedules_lib
from diffdistill.solvers import ddim
from diffdistill.solvers import multistep
from diffdistill.solvers import singlestep

Array = jax.Array


def _values(schedule, x, t):
  cdt = multistep.compute_dtype(x.dtype)
  t = jnp.broadcast_to(jnp.asarray(t, cdt), (x.shape[0],))
  tb = schedules_lib.broadcast_to(t, x)
  return schedule.alpha(tb), schedule.sigma(tb), t


def heun_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule,
              rng=None) -> Array:
  """One Heun step from t_s to t_t (two denoiser calls; needs alpha_s > 0 and sigma_t > 0):
  x_t = (alpha_t/alpha_s) x_s + (sigma_t - alpha_t sigma_s/alpha_s) (eps_s + eps') / 2.
  Deterministic: rng is accepted and ignored."""
  del rng
  a_s, s_s, ts = _values(schedule, x, t_s)
  a_t, s_t, tt = _values(schedule, x, t_t)
  d_s = denoise(x, ts)
  eps_s = (x - a_s * d_s) / s_s
  ratio = a_t / a_s
  x_e = ratio * x + (s_t - ratio * s_s) * eps_s  # the Euler (DDIM) predictor
  eps_e = (x_e - a_t * denoise(x_e, tt)) / s_t
  return (ratio * x + (s_t - ratio * s_s) * 0.5 * (eps_s + eps_e)).astype(x.dtype)


euler_step = ddim.ddim_step


def _churn(denoise, x, t_s, rng, gamma, s_noise, schedule):
  """Raises the noise level of x from t_s to t_hat with sigma_hat(t_hat) = (1 + gamma) sigma_hat(t_s)."""
  a_s, s_s, ts = _values(schedule, x, t_s)
  lam_s = 0.5 * schedule.logsnr(ts)
  t_hat = jnp.minimum(schedule.t_from_logsnr(2.0 * (lam_s - jnp.log1p(gamma))), schedule.t_max)
  a_h, s_h, t_hat = _values(schedule, x, t_hat)
  sh_s, sh_h = s_s / a_s, s_h / a_h
  z = jax.random.normal(rng, x.shape, x.dtype)
  x_hat = (a_h / a_s) * x + a_h * jnp.sqrt(jnp.maximum(sh_h * sh_h - sh_s * sh_s, 0.0)) * s_noise * z
  return x_hat, t_hat


def edm_stochastic_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule,
                        rng: Array | None = None, gamma, s_noise: float = 1.003,
                        final: bool = False) -> Array:
  """One step of EDM's stochastic sampler: churn by gamma, then Heun (Euler if `final`).
  Needs rng (the churn noise)."""
  multistep.require_rng(rng, "edm_stochastic_step")
  x_hat, t_hat = _churn(denoise, x, t_s, rng, gamma, s_noise, schedule)
  step = ddim.ddim_step if final else heun_step
  return step(denoise, x_hat, t_hat, t_t, schedule=schedule)


def run_heun(denoise, x, grid, *, schedule, rng, in_dtype, final_euler=True):
  del rng
  tail = (ddim.ddim_step, 1) if final_euler else None
  return singlestep.run(heun_step, 2, denoise, x, grid, schedule=schedule, in_dtype=in_dtype,
                        tail=tail)


def churn_gammas(grid, *, S_churn, S_tmin, S_tmax):
  """gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_hat_i <= S_tmax, else 0."""
  with np.errstate(divide="ignore"):
    sigma_hat = grid.sigma[:-1] / grid.alpha[:-1]
  g = min(S_churn / grid.num_steps, math.sqrt(2.0) - 1.0)
  return np.where((sigma_hat >= S_tmin) & (sigma_hat <= S_tmax), g, 0.0)


def run_edm_stochastic(denoise, x, grid, *, schedule, rng, in_dtype, S_churn=40.0, S_tmin=0.05,
                       S_tmax=50.0, S_noise=1.003, final_euler=True):
  if S_churn < 0 or S_noise < 0 or S_tmin > S_tmax:
    raise ValueError(f"edm_stochastic needs S_churn >= 0, S_noise >= 0, S_tmin <= S_tmax; got "
                     f"S_churn={S_churn}, S_noise={S_noise}, S_tmin={S_tmin}, S_tmax={S_tmax}.")
  multistep.require_rng(rng, "edm_stochastic")
  gammas = churn_gammas(grid, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax)

  def step(dn, x, t_s, t_t, *, schedule, rng, gamma):
    return edm_stochastic_step(dn, x, t_s, t_t, schedule=schedule, rng=rng, gamma=gamma,
                               s_noise=S_noise)

  def last(dn, x, t_s, t_t, *, schedule, rng, gamma):
    return edm_stochastic_step(dn, x, t_s, t_t, schedule=schedule, rng=rng, gamma=gamma,
                               s_noise=S_noise, final=True)

  tail = (last, 1) if final_euler else None
  return singlestep.run(step, 2, denoise, x, grid, schedule=schedule, in_dtype=in_dtype, rng=rng,
                        per_step={"gamma": gammas}, tail=tail)


__all__ = ["heun_step", "euler_step", "edm_stochastic_step", "churn_gammas"]
