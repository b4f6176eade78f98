"""UniPC: the unified predictor (UniP-p) and corrector (UniC-p), data prediction, B(h) = bh1 / bh2.

With lambda = log(alpha / sigma), h = lambda_t - lambda_s, nodes r_m = (lambda_{s-m} - lambda_s)/h
(m = 1..p-1) and r_p = 1, D1_m = (D_{s-m} - D_s) / r_m:

    UniP-p  x_t = (sigma_t/sigma_s) x_s - alpha_t expm1(-h) D_s - alpha_t B(h) sum_m a_m D1_m
    UniC-p  x_t^c = (sigma_t/sigma_s) x_s^c - alpha_t expm1(-h) D_s
                    - alpha_t B(h) (sum_m a^c_m D1_m + a^c_p (D_t - D_s)),   D_t = D(x_t, t)

where R a = g solves R_{km} = r_m^{k-1}, g_k = k! phi_{k+1}(-h) / B(h) (phi_{k+1}(-h) =
h_phi_k in the reference code), a = [1/2] for UniP-2 and a^c = [1/2] for UniC-1,
B(h) = -h (bh1) or expm1(-h) (bh2). The corrector reuses D_t, the next step's evaluation, so a
step costs one call; it is skipped after the last step. UniPC-p (UniP-p + UniC-p) has order
p + 1. Warm-up orders min(p, i + 1) and, under 15 steps, lower-order final steps as in the
reference code. A step from alpha = 0 (h = inf) uses B(h) = expm1(-h) = -1 for both variants.

References:
  Zhao et al., UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
  Models, NeurIPS 2023 (Algorithms 2, 3; Theorem 3.3 for the order p + 1).
"""

from __future__ import annotations

import math

import numpy as np

from diffdistill.solvers import grids
from diffdistill.solvers import multistep

VARIANTS = ("bh1", "bh2")


def step_weights(lam_nodes, lam_t, alpha_t, p, variant, *, xp=np, finite_h=None):
  """(predictor weights over D_s, D_{s-1}, .., D_{s-p+1}; corrector weights over D_t, D_s, ..,
  D_{s-p+1}) for one step of order p, with lam_nodes = (lambda_s, lambda_{s-1}, ...).

  `xp` is numpy (host plans) or jax.numpy (traced grids, `traceable.py`); there `finite_h`
  says statically whether h is finite (False only for a step from alpha = 0)."""
  h = lam_t - lam_nodes[0]
  finite = bool(np.isfinite(h)) if finite_h is None else finite_h
  hh = -h
  h_phi_1 = xp.expm1(hh)
  b_h = hh if (variant == "bh1" and finite) else h_phi_1
  rks = [(lam_nodes[m] - lam_nodes[0]) / h for m in range(1, p)] + [1.0]
  rows, g = [], []
  h_phi_k = h_phi_1 / hh - 1.0 if finite else -1.0
  for k in range(1, p + 1):
    rows.append([r ** (k - 1) for r in rks])
    g.append(h_phi_k * math.factorial(k) / b_h)
    h_phi_k = h_phi_k / hh - 1.0 / math.factorial(k + 1)
  rmat, g = xp.array(rows), xp.array(g)
  pred = [-alpha_t * h_phi_1] + [0.0] * (p - 1)
  if p >= 2:
    rhos_p = [0.5] if p == 2 else xp.linalg.solve(rmat[:-1, :-1], g[:-1])
    for m in range(1, p):
      k = -alpha_t * b_h * rhos_p[m - 1] / rks[m - 1]
      pred[m] = pred[m] + k
      pred[0] = pred[0] - k
  rhos_c = [0.5] if p == 1 else xp.linalg.solve(rmat, g)
  corr = [0.0, -alpha_t * h_phi_1] + [0.0] * (p - 1)
  for m in range(1, p):
    k = -alpha_t * b_h * rhos_c[m - 1] / rks[m - 1]
    corr[1 + m] = corr[1 + m] + k
    corr[1] = corr[1] - k
  k = -alpha_t * b_h * rhos_c[-1]
  corr[0] = corr[0] + k
  corr[1] = corr[1] - k
  stack = lambda v: xp.stack([xp.asarray(c) for c in v])
  return stack(pred), stack(corr)


def plan(grid: grids.HostGrid, order: int, *, variant: str = "bh2",
         lower_order_final: bool = True) -> multistep.Plan:
  """UniPC-`order` as engine coefficients: predictor rows (a, b) and corrector rows (p, q, r)."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown UniPC variant {variant!r}; expected one of {list(VARIANTS)}.")
  n = grid.num_steps
  orders = multistep.step_orders(grid, order, lower_order_final=lower_order_final)
  a, b = np.zeros(n), np.zeros((n, order))
  p_c, q_c, r_c = np.zeros(n), np.zeros(n), np.zeros((n, order + 1))
  p_c[0] = 1.0  # no correction before the first evaluation
  for i in range(n):
    p = int(orders[i])
    a[i] = grid.sigma[i + 1] / grid.sigma[i]
    nodes = [grid.lam[i - m] for m in range(p)]
    pred, corr = step_weights(nodes, grid.lam[i + 1], grid.alpha[i + 1], p, variant)
    b[i, :p] = pred
    if i + 1 < n:  # the corrector of step i runs after the evaluation at t_{i+1}
      q_c[i + 1] = a[i]
      r_c[i + 1, :p + 1] = corr
  return multistep.Plan(grid, "data", a=a, b=b, corrector=(p_c, q_c, r_c))


def make_run(order):
  def run(denoise, x, grid, *, schedule, rng, in_dtype, variant="bh2", lower_order_final=True):
    del schedule, rng
    return multistep.run(denoise, x, plan(grid, order, variant=variant,
                                          lower_order_final=lower_order_final), in_dtype=in_dtype)
  return run


__all__ = ["plan", "step_weights", "VARIANTS"]
