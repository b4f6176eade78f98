"""DPM-Solver (noise prediction): singlestep orders 1, 2, 3 and DPM-Solver-fast.

With eps = (x - alpha D) / sigma, lambda = log(alpha / sigma), h = lambda_t - lambda_s and
intermediate times s_k at lambda_s + r_k h:

    DPM-Solver-1  x_t = (alpha_t/alpha_s) x_s - sigma_t expm1(h) eps_s                 (= DDIM)
    DPM-Solver-2  u = (alpha_1/alpha_s) x_s - sigma_1 expm1(r_1 h) eps_s,     r_1 = 1/2
                  x_t = (alpha_t/alpha_s) x_s - sigma_t expm1(h) eps_s
                        - sigma_t/(2 r_1) expm1(h) (eps(u, s_1) - eps_s)
    DPM-Solver-3  u_1 as above with r_1 = 1/3;  D_1 = eps(u_1, s_1) - eps_s
                  u_2 = (alpha_2/alpha_s) x_s - sigma_2 expm1(r_2 h) eps_s
                        - sigma_2 r_2/r_1 (expm1(r_2 h)/(r_2 h) - 1) D_1,         r_2 = 2/3
                  x_t = (alpha_t/alpha_s) x_s - sigma_t expm1(h) eps_s
                        - sigma_t / r_2 (expm1(h)/h - 1) (eps(u_2, s_2) - eps_s)

DPM-Solver-fast spends a budget of K calls on M = K // 3 + 1 steps of orders
[3, ..., 3, 2, 1] (K = 0 mod 3), [3, ..., 3, 1] (1 mod 3) or [3, ..., 3, 2] (2 mod 3), on an
M-step grid (the paper's rule, Sec. 3.4): the order-3 steps are one scan, the at most two
lower-order final steps follow it.

References:
  Lu et al., DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around
  10 Steps, NeurIPS 2022 (Algorithms 1 and 2 / eq. 3.7; Sec. 3.4 for DPM-Solver-fast).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.solvers import ddim
from diffdistill.solvers import grids
from diffdistill.solvers import multistep
from diffdistill.solvers import singlestep

Array = jax.Array


def _values(schedule, x, t):
  cdt = multistep.compute_dtype(x.dtype)
  t = jnp.broadcast_to(jnp.asarray(t, cdt), (x.shape[0],))
  tb = schedules_lib.broadcast_to(t, x)
  return schedule.alpha(tb), schedule.sigma(tb), 0.5 * schedule.logsnr(tb), t


def _at(schedule, x, lam, ts):
  t = schedule.t_from_logsnr(2.0 * lam).reshape(ts.shape)
  return _values(schedule, x, t)


def dpm_solver_1_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule,
                      rng=None) -> Array:
  """DPM-Solver-1 (the DDIM map), one call. Deterministic: rng is ignored."""
  return ddim.ddim_step(denoise, x, t_s, t_t, schedule=schedule, rng=rng)


def dpm_solver_2_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule,
                      rng=None, r1: float = 0.5) -> Array:
  """One DPM-Solver-2 step (two calls; finite lambda at both ends). rng is ignored."""
  del rng
  a_s, s_s, l_s, ts = _values(schedule, x, t_s)
  a_t, s_t, l_t, _ = _values(schedule, x, t_t)
  h = l_t - l_s
  a_1, s_1, _, t1 = _at(schedule, x, l_s + r1 * h, ts)
  eps_s = (x - a_s * denoise(x, ts)) / s_s
  u = (a_1 / a_s) * x - s_1 * jnp.expm1(r1 * h) * eps_s
  eps_1 = (u - a_1 * denoise(u, t1)) / s_1
  phi = jnp.expm1(h)
  out = (a_t / a_s) * x - s_t * phi * eps_s - (s_t / (2.0 * r1)) * phi * (eps_1 - eps_s)
  return out.astype(x.dtype)


def dpm_solver_3_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule,
                      rng=None, r1: float = 1.0 / 3.0, r2: float = 2.0 / 3.0) -> Array:
  """One DPM-Solver-3 step (three calls; finite lambda at both ends). rng is ignored."""
  del rng
  a_s, s_s, l_s, ts = _values(schedule, x, t_s)
  a_t, s_t, l_t, _ = _values(schedule, x, t_t)
  h = l_t - l_s
  a_1, s_1, _, t1 = _at(schedule, x, l_s + r1 * h, ts)
  a_2, s_2, _, t2 = _at(schedule, x, l_s + r2 * h, ts)
  eps_s = (x - a_s * denoise(x, ts)) / s_s
  u1 = (a_1 / a_s) * x - s_1 * jnp.expm1(r1 * h) * eps_s
  d1 = (u1 - a_1 * denoise(u1, t1)) / s_1 - eps_s
  phi_12 = jnp.expm1(r2 * h)
  u2 = (a_2 / a_s) * x - s_2 * phi_12 * eps_s - s_2 * (r2 / r1) * (phi_12 / (r2 * h) - 1.0) * d1
  d2 = (u2 - a_2 * denoise(u2, t2)) / s_2 - eps_s
  phi = jnp.expm1(h)
  out = (a_t / a_s) * x - s_t * phi * eps_s - (s_t / r2) * (phi / h - 1.0) * d2
  return out.astype(x.dtype)


def fast_orders(nfe: int) -> tuple[int, ...]:
  """The per-step orders of DPM-Solver-fast for a budget of nfe calls (they sum to nfe)."""
  m = nfe // 3 + 1
  if nfe % 3 == 0:
    return (3,) * (m - 2) + (2, 1)
  if nfe % 3 == 1:
    return (3,) * (m - 1) + (1,)
  return (3,) * (m - 1) + (2,)


def run_1(denoise, x, grid, *, schedule, rng, in_dtype):
  return ddim.run_ddim(denoise, x, grid, schedule=schedule, rng=rng, in_dtype=in_dtype)


def run_2(denoise, x, grid, *, schedule, rng, in_dtype):
  del rng
  return singlestep.run(dpm_solver_2_step, 2, denoise, x, grid, schedule=schedule,
                        in_dtype=in_dtype)


def run_3(denoise, x, grid, *, schedule, rng, in_dtype):
  del rng
  return singlestep.run(dpm_solver_3_step, 3, denoise, x, grid, schedule=schedule,
                        in_dtype=in_dtype)


_STEP = {1: dpm_solver_1_step, 2: dpm_solver_2_step, 3: dpm_solver_3_step}


def run_fast(denoise, x, grid, *, schedule, rng, in_dtype, budget):
  """Order-3 steps in one scan, then the (at most two) lower-order final steps; `budget` calls
  on a grid of len(fast_orders(budget)) steps."""
  del rng
  orders = fast_orders(budget)
  if len(orders) != grid.num_steps:
    raise ValueError(f"dpm_solver_fast with {budget} calls needs a {len(orders)}-step grid, got "
                     f"{grid.num_steps} steps.")
  n3 = orders.count(3)
  if n3:
    sub = grids.host_grid(schedule, grid.t[:n3 + 1])
    x = singlestep.run(dpm_solver_3_step, 3, denoise, x, sub, schedule=schedule, in_dtype=in_dtype)
  for i, p in enumerate(orders[n3:], start=n3):
    sub = grids.host_grid(schedule, grid.t[i:i + 2])
    x = singlestep.run(_STEP[p], p, denoise, x, sub, schedule=schedule, in_dtype=in_dtype)
  return x


__all__ = ["dpm_solver_1_step", "dpm_solver_2_step", "dpm_solver_3_step", "fast_orders"]
