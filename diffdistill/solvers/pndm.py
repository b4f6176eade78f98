"""PNDM (pseudo numerical methods) and iPNDM: fixed-coefficient multistep on the DDIM transfer.

The transfer phi(x_s, e, s -> t) = (alpha_t/alpha_s)(x_s - sigma_s e) + sigma_t e is DDIM with
noise e. With e_k = eps(x_k, t_k):

    pseudo-LMS (order 4)   e' = (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24
    iPNDM warm-up          e' = e_i;  (3 e_i - e_{i-1})/2;  (23 e_i - 16 e_{i-1} + 5 e_{i-2})/12
    pseudo-RK4 (PNDM's first 3 steps; midpoint m halfway in rho = sigma/alpha)
        e1 = eps(x, s);  e2 = eps(phi(x, e1, s->m), m);  e3 = eps(phi(x, e2, s->m), m)
        e4 = eps(phi(x, e3, s->t), t);  x_t = phi(x, (e1 + 2 e2 + 2 e3 + e4)/6, s->t)

so x_{i+1} = phi(x_i, e', t_i -> t_{i+1}). PNDM (F-PNDM) costs 12 + (N - 3) calls for N >= 4
steps. The fixed coefficients assume equal steps: the order is 4 on grids uniform in rho and
falls to 2 on other smooth grids (the coefficient error is O(h) relative); `lms` is the
variable-step version.

References:
  Liu et al., Pseudo Numerical Methods for Diffusion Models on Manifolds, ICLR 2022 (eqs. 12-14).
  Zhang & Chen, Fast Sampling of Diffusion Models with Exponential Integrator, ICLR 2023
  (iPNDM, App. B).
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

AB_COEFFS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
             4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _values(schedule, x, t):
  cdt = multistep.compute_dtype(x.dtype)
  t = jnp.broadcast_to(jnp.asarray(t, cdt), (x.shape[0],))
  tb = schedules_lib.broadcast_to(t, x)
  return schedule.alpha(tb), schedule.sigma(tb), t


def pndm_prk_step(denoise, x: Array, t_s, t_t, *, schedule: schedules_lib.Schedule, rng=None,
                  d_s: Array | None = None) -> Array:
  """One pseudo-RK4 step (four calls; three if d_s = D(x_s, t_s) is given, which the caller
  keeps for the LMS history, eps_s = (x_s - alpha_s d_s) / sigma_s). rng is ignored."""
  del rng
  a_s, s_s, ts = _values(schedule, x, t_s)
  a_t, s_t, tt = _values(schedule, x, t_t)
  rho_m = 0.5 * (s_s / a_s + s_t / a_t)
  tm = schedule.t_from_logsnr(-2.0 * jnp.log(rho_m)).reshape(ts.shape)
  a_m, s_m, tm = _values(schedule, x, tm)

  def eps(y, a, s, t):
    return (y - a * denoise(y, t)) / s

  def phi(e, a, s):
    return (a / a_s) * (x - s_s * e) + s * e

  e1 = eps(x, a_s, s_s, ts) if d_s is None else (x - a_s * d_s) / s_s
  e2 = eps(phi(e1, a_m, s_m), a_m, s_m, tm)
  e3 = eps(phi(e2, a_m, s_m), a_m, s_m, tm)
  e4 = eps(phi(e3, a_t, s_t), a_t, s_t, tt)
  return phi((e1 + 2.0 * e2 + 2.0 * e3 + e4) / 6.0, a_t, s_t).astype(x.dtype)


def plan(grid: grids.HostGrid, *, first_order: int = 1, order: int = 4) -> multistep.Plan:
  """Fixed-coefficient AB on the DDIM transfer; step i uses order min(order, i + first_order)."""
  n = grid.num_steps
  orders = np.minimum(order, np.arange(n) + first_order)
  if grid.starts_at_pure_noise and first_order == 1:
    orders = np.minimum(orders, np.maximum(np.arange(n), 1))
  a, b, g = np.zeros(n), np.zeros((n, order)), np.zeros(n)
  for i in range(n):
    if grid.alpha[i] == 0:
      b[i, 0], g[i] = grid.sigma[i + 1], grid.alpha[i + 1]
      continue
    a[i] = grid.alpha[i + 1] / grid.alpha[i]
    p = int(orders[i])
    b[i, :p] = (grid.sigma[i + 1] - a[i] * grid.sigma[i]) * np.array(AB_COEFFS[p])
  return multistep.Plan(grid, "noise", a=a, b=b, g=g if grid.starts_at_pure_noise else None)


def run_ipndm(denoise, x, grid, *, schedule, rng, in_dtype):
  del schedule, rng
  return multistep.run(denoise, x, plan(grid), in_dtype=in_dtype)


def run_pndm(denoise, x, grid, *, schedule, rng, in_dtype):
  """Three pseudo-RK4 steps (a bounded prefix), then pseudo-LMS steps in one scan."""
  del rng
  cdt = multistep.compute_dtype(in_dtype)
  dn = singlestep.wrap(denoise, in_dtype)
  x = x.astype(cdt)
  hist = []
  for i in range(3):
    t_s, t_t = grid.t[i], grid.t[i + 1]
    if grid.alpha[i] == 0:  # eps is x / sigma exactly at pure noise
      hist.append(x / grid.sigma[i])
      x = singlestep.degenerate_step(dn, x, t_s, t_t, 4, schedule=schedule)
    else:
      d_s = dn(x, jnp.full((x.shape[0],), t_s, cdt))
      hist.append((x - float(grid.alpha[i]) * d_s) / float(grid.sigma[i]))
      x = pndm_prk_step(dn, x, jnp.asarray(t_s, cdt), jnp.asarray(t_t, cdt), schedule=schedule,
                        d_s=d_s)
  rest = grids.host_grid(schedule, grid.t[3:])
  return multistep.run(denoise, x, plan(rest, first_order=4),
                       hist=jnp.stack(hist[::-1]), in_dtype=in_dtype)


__all__ = ["pndm_prk_step", "plan", "AB_COEFFS"]
