"""DEIS (tAB) and LMS: Adams-Bashforth exponential integrators in the noise prediction.

On y = x / alpha the probability-flow ODE is dy/drho = eps(x, t) with rho = sigma / alpha, so

    x_{i+1} = (alpha_{i+1}/alpha_i) x_i + alpha_{i+1} sum_j eps_{i-j} int_{rho_i}^{rho_{i+1}} L_j d rho

with L_j the Lagrange basis through the last p nodes (variable step sizes, exact coefficients):

    deis_p (tAB)  L_j a polynomial in t (DEIS's time-AB; the integral by 8-point Gauss-Legendre
                  in rho, with t(rho) from the schedule)
    lms           L_j a polynomial in rho, p = 4 (k-diffusion's linear multistep; exact)

Warm-up orders min(p, i + 1). A step from alpha = 0 is the DDIM step x = alpha_1 D_0 + sigma_1 eps_0.

References:
  Zhang & Chen, Fast Sampling of Diffusion Models with Exponential Integrator, ICLR 2023
  (eq. 14, tAB-DEIS).
  Karras et al. 2022 / Crowson, k-diffusion `sample_lms` (linear multistep in sigma).
"""

from __future__ import annotations

import numpy as np

from diffdistill.solvers import grids
from diffdistill.solvers import multistep

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)


def lagrange_integrals(nodes, lo, hi, t_of_rho=None):
  """int_lo^hi L_j(v(rho)) d rho for the Lagrange basis through `nodes` (in the variable v).

  v is rho itself (t_of_rho None) or t(rho) evaluated by t_of_rho at the quadrature points.
  """
  half, mid = 0.5 * (hi - lo), 0.5 * (hi + lo)
  rho_q = mid + half * _GL_NODES
  v_q = rho_q if t_of_rho is None else t_of_rho(rho_q)
  nodes = np.asarray(nodes)
  out = np.zeros(len(nodes))
  for j in range(len(nodes)):
    basis = np.ones_like(v_q)
    for m in range(len(nodes)):
      if m != j:
        basis = basis * (v_q - nodes[m]) / (nodes[j] - nodes[m])
    out[j] = half * np.sum(_GL_WEIGHTS * basis)
  return out


def plan(grid: grids.HostGrid, order: int, *, variable: str, schedule=None) -> multistep.Plan:
  """Engine coefficients for tAB (variable='t') or LMS (variable='rho') of the given order."""
  n = grid.num_steps
  with np.errstate(divide="ignore"):
    rho = grid.sigma / grid.alpha
  orders = multistep.step_orders(grid, order)
  a, b, g = np.zeros(n), np.zeros((n, order)), np.zeros(n)
  t_of_rho = None
  if variable == "t":
    t_of_rho = lambda r: grids.t_from_lam(schedule, -np.log(r))
  for i in range(n):
    p = int(orders[i])
    if grid.alpha[i] == 0:
      b[i, 0], g[i] = grid.sigma[i + 1], grid.alpha[i + 1]
      continue
    a[i] = grid.alpha[i + 1] / grid.alpha[i]
    if p == 1:
      b[i, 0] = grid.sigma[i + 1] - a[i] * grid.sigma[i]
      continue
    nodes = [(grid.t if variable == "t" else rho)[i - m] for m in range(p)]
    b[i, :p] = grid.alpha[i + 1] * lagrange_integrals(nodes, rho[i], rho[i + 1], t_of_rho=t_of_rho)
  return multistep.Plan(grid, "noise", a=a, b=b, g=g if grid.starts_at_pure_noise else None)


def make_deis_run(order):
  def run(denoise, x, grid, *, schedule, rng, in_dtype):
    del rng
    return multistep.run(denoise, x, plan(grid, order, variable="t", schedule=schedule),
                         in_dtype=in_dtype)
  return run


def run_lms(denoise, x, grid, *, schedule, rng, in_dtype, order=4):
  del schedule, rng
  if order not in (1, 2, 3, 4):
    raise ValueError(f"lms order must be 1, 2, 3 or 4, got {order}.")
  return multistep.run(denoise, x, plan(grid, order, variable="rho"), in_dtype=in_dtype)


__all__ = ["plan", "lagrange_integrals"]
