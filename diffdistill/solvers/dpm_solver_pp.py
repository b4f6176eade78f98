"""DPM-Solver++ (data prediction): 2S singlestep, 2M / 3M multistep, and 2M-SDE.

With lambda = log(alpha / sigma), h = lambda_t - lambda_s, phi_1 = expm1(-h),
phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2, and D_i = D(x_i, t_i) (newest first: D_0 = D_s):

    2S   u = (sigma_u/sigma_s) x_s - alpha_u expm1(-h/2) D_s,  lambda_u = lambda_s + h/2,
         x_t = (sigma_t/sigma_s) x_s - alpha_t phi_1 D(u, t_u)                      (Alg. 1, r = 1/2)
    2M   x_t = (sigma_t/sigma_s) x_s - alpha_t phi_1 D_0 - (alpha_t phi_1 / 2) (D_0 - D_1) / r_0
    3M   x_t = (sigma_t/sigma_s) x_s - alpha_t phi_1 D_0 + alpha_t phi_2 D1 - alpha_t phi_3 D2,
         D1 = D1_0 + r_0/(r_0 + r_1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1)/(r_0 + r_1),
         D1_0 = (D_0 - D_1)/r_0,  D1_1 = (D_1 - D_2)/r_1,  r_k = h_k / h (previous step sizes)
    2M-SDE  x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) (D_0 + (D_0 - D_1)/(2 r_0))
                  + sigma_t sqrt(1 - e^{-2h}) z                                  (midpoint form)

Multistep solvers warm up with lower orders and (under 15 steps) take lower-order final steps,
as the reference implementations do; a step from alpha = 0 (h = inf) is first order and exact.

References:
  Lu et al., DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models,
  2022 (Algorithms 1, 2; App. for 3M and the SDE variant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import schedules as schedules_lib
from diffdistill.solvers import grids
from diffdistill.solvers import multistep
from diffdistill.solvers import singlestep

Array = jax.Array


def multistep_weights(xp, order: int, h, h_prev, alpha_t, *, taylor_d2: bool = False):
  """Weights of D_0, D_1, ... (newest first) in the 2M / 3M update, given h and the previous
  step sizes h_prev = (h_0, h_1); `xp` is numpy or jax.numpy.

  The published 3M weight of D2 (~ h^2 D''/2) is -alpha_t phi_3, half the Taylor coefficient
  -2 alpha_t phi_3 of the data-prediction expansion, so the published method has an O(h^3)
  local error in the D'' term and is second order (checked in tests/test_solvers_orders.py);
  taylor_d2=True uses the Taylor weight and makes it third order.
  """
  phi_1 = xp.expm1(-h)
  if order == 1:
    return [-alpha_t * phi_1]
  inv_r0 = h / h_prev[0]
  if order == 2:
    return [-alpha_t * phi_1 * (1.0 + 0.5 * inv_r0), 0.5 * alpha_t * phi_1 * inv_r0]
  inv_r1 = h / h_prev[1]
  phi_2 = phi_1 / h + 1.0
  phi_3 = phi_2 / h - 0.5
  frac = h_prev[0] / (h_prev[0] + h_prev[1])  # r0 / (r0 + r1)
  inv_sum = h / (h_prev[0] + h_prev[1])  # 1 / (r0 + r1)
  d10 = (inv_r0, -inv_r0, 0.0)
  d11 = (0.0, inv_r1, -inv_r1)
  d1 = [a + frac * (a - b) for a, b in zip(d10, d11)]
  d2 = [inv_sum * (a - b) for a, b in zip(d10, d11)]
  base = (-alpha_t * phi_1, 0.0, 0.0)
  w3 = (2.0 if taylor_d2 else 1.0) * alpha_t * phi_3
  return [b0 + alpha_t * phi_2 * c1 - w3 * c2 for b0, c1, c2 in zip(base, d1, d2)]


def _multistep_rows(grid, order, lower_order_final, taylor_d2=False):
  n = grid.num_steps
  orders = multistep.step_orders(grid, order, lower_order_final=lower_order_final)
  a = np.zeros(n)
  b = np.zeros((n, order))
  for i in range(n):
    a[i], b1 = multistep.ddim_coefficients(grid, i)
    p = int(orders[i])
    if p == 1:
      b[i, 0] = b1
      continue
    h = grid.lam[i + 1] - grid.lam[i]
    h_prev = [grid.lam[i - k] - grid.lam[i - k - 1] for k in range(p - 1)]
    b[i, :p] = multistep_weights(np, p, h, h_prev, grid.alpha[i + 1], taylor_d2=taylor_d2)
  return a, b, orders


def multistep_plan(grid: grids.HostGrid, order: int, *, lower_order_final: bool = True,
                   taylor_d2: bool = False):
  """DPM-Solver++(2M) (order 2) or (3M) as engine coefficients."""
  a, b, _ = _multistep_rows(grid, order, lower_order_final, taylor_d2)
  return multistep.Plan(grid, "data", a=a, b=b)


def sde_plan(grid: grids.HostGrid, *, lower_order_final: bool = True):
  """DPM-Solver++(2M) SDE (midpoint) as engine coefficients."""
  n = grid.num_steps
  orders = multistep.step_orders(grid, 2, lower_order_final=lower_order_final)
  a, b, noise = np.zeros(n), np.zeros((n, 2)), np.zeros(n)
  for i in range(n):
    h = grid.lam[i + 1] - grid.lam[i]
    e2 = 1.0 if np.isinf(h) else -np.expm1(-2.0 * h)  # 1 - e^{-2h}
    a[i] = grid.sigma[i + 1] / grid.sigma[i] * np.exp(-h)
    noise[i] = grid.sigma[i + 1] * np.sqrt(e2)
    # alpha_t (1 - e^{-2h}) = -alpha_t expm1(-h) (1 + e^{-h}): the ODE's weights times
    # (1 + e^{-h}), so the step-size ratio h / h_prev is written once, in multistep_weights.
    p = int(orders[i])
    h_prev = [grid.lam[i] - grid.lam[i - 1]] if p == 2 else []
    b[i, :p] = (1.0 + np.exp(-h)) * np.array(multistep_weights(np, p, h, h_prev,
                                                               grid.alpha[i + 1]))
  return multistep.Plan(grid, "data", a=a, b=b, noise=noise)


def _values(schedule, x, t):
  cdt = multistep.compute_dtype(x.dtype)
  t = jnp.broadcast_to(jnp.asarray(t, cdt), (x.shape[0],))
  tb = schedules_lib.broadcast_to(t, x)
  return schedule.alpha(tb), schedule.sigma(tb), 0.5 * schedule.logsnr(tb), t


def dpm_solver_pp_2s_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule,
                          rng=None) -> Array:
  """One DPM-Solver++(2S) step (r = 1/2), two denoiser calls; needs finite lambda at both ends.
  rng is ignored."""
  del rng
  a_s, s_s, l_s, ts = _values(schedule, x, t_s)
  a_t, s_t, l_t, _ = _values(schedule, x, t_t)
  h = l_t - l_s
  tu = schedule.t_from_logsnr(2.0 * (l_s + 0.5 * h)).reshape(ts.shape)
  a_u, s_u, _, _ = _values(schedule, x, tu)
  u = (s_u / s_s) * x - a_u * jnp.expm1(-0.5 * h) * denoise(x, ts)
  return ((s_t / s_s) * x - a_t * jnp.expm1(-h) * denoise(u, tu)).astype(x.dtype)


def dpm_solver_pp_2m_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule,
                          rng=None, d_prev: Array, t_prev, d_s: Array | None = None) -> Array:
  """One DPM-Solver++(2M) step from t_s to t_t given D_prev = D(x_prev, t_prev) of the previous
  step (any step sizes). d_s: D(x_s, t_s) if the caller already has it (it is the next step's
  d_prev), then no denoiser call is made; else one call. rng is ignored."""
  del rng
  a_s, s_s, l_s, ts = _values(schedule, x, t_s)
  a_t, s_t, l_t, _ = _values(schedule, x, t_t)
  _, _, l_p, _ = _values(schedule, x, t_prev)
  d = denoise(x, ts) if d_s is None else d_s
  w = multistep_weights(jnp, 2, l_t - l_s, (l_s - l_p,), a_t)
  return ((s_t / s_s) * x + w[0] * d + w[1] * d_prev).astype(x.dtype)


def dpm_solver_pp_3m_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule,
                          rng=None, d_prev: tuple[Array, Array], t_prev: tuple,
                          d_s: Array | None = None, taylor_d2: bool = False) -> Array:
  """One DPM-Solver++(3M) step given (D_1, D_2) at (t_prev1, t_prev2) (newest first).
  d_s: D(x_s, t_s) if already computed (then no call); rng is ignored."""
  del rng
  a_s, s_s, l_s, ts = _values(schedule, x, t_s)
  a_t, s_t, l_t, _ = _values(schedule, x, t_t)
  l_p1 = _values(schedule, x, t_prev[0])[2]
  l_p2 = _values(schedule, x, t_prev[1])[2]
  d = denoise(x, ts) if d_s is None else d_s
  w = multistep_weights(jnp, 3, l_t - l_s, (l_s - l_p1, l_p1 - l_p2), a_t, taylor_d2=taylor_d2)
  out = (s_t / s_s) * x + w[0] * d + w[1] * d_prev[0] + w[2] * d_prev[1]
  return out.astype(x.dtype)


def run_2m(denoise, x, grid, *, schedule, rng, in_dtype, lower_order_final=True):
  del schedule, rng
  return multistep.run(denoise, x, multistep_plan(grid, 2, lower_order_final=lower_order_final),
                       in_dtype=in_dtype)


def run_3m(denoise, x, grid, *, schedule, rng, in_dtype, lower_order_final=True,
           taylor_d2=False):
  del schedule, rng
  return multistep.run(denoise, x, multistep_plan(grid, 3, lower_order_final=lower_order_final,
                                                  taylor_d2=taylor_d2), in_dtype=in_dtype)


def run_2m_sde(denoise, x, grid, *, schedule, rng, in_dtype, lower_order_final=True):
  del schedule
  return multistep.run(denoise, x, sde_plan(grid, lower_order_final=lower_order_final), rng=rng,
                       in_dtype=in_dtype)


def run_2s(denoise, x, grid, *, schedule, rng, in_dtype):
  del rng
  return singlestep.run(dpm_solver_pp_2s_step, 2, denoise, x, grid, schedule=schedule,
                        in_dtype=in_dtype)


__all__ = ["dpm_solver_pp_2s_step", "dpm_solver_pp_2m_step", "dpm_solver_pp_3m_step",
           "multistep_plan", "sde_plan", "multistep_weights"]
