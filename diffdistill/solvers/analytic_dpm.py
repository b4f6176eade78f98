"""Analytic-DPM: the optimal reverse variance of the ancestral (DDPM / DDIM-eta) sampler,
estimated by Monte Carlo from the teacher.

A DDIM-eta step s -> t (lambda_t > lambda_s, h = lambda_t - lambda_s) samples

    x_t = k x_s + (alpha_t - k alpha_s) D(x_s, s) + sqrt(v) z,   k = sqrt(sigma_t^2 - c^2) / sigma_s,
    c = eta sigma_t sqrt(1 - e^{-2h})

and `ddim_eta` uses v = c^2, the variance of q(x_t | x_s, x0). Among Gaussian reverse kernels with
this mean, the one closest in KL to the true reverse process has (Bao et al. 2022, Thm. 1, in
the DDIM form of their eq. 9)

    v*_s = c^2 + (alpha_t - k alpha_s)^2 (sigma_s / alpha_s)^2 (1 - Gamma_s),
    Gamma_s = E_{x_s ~ q_s} ||eps_hat(x_s, s)||^2 / d,     eps_hat = (x_s - alpha_s D) / sigma_s,

because E tr Cov[x0 | x_s] / d = (sigma_s / alpha_s)^2 (1 - Gamma_s). Gamma_s is estimated once per
grid from the teacher on data samples x0 (`estimate_gamma`) and clipped to [0, 1], which keeps
v* between its bounds c^2 and c^2 + (alpha_t - k alpha_s)^2 sigma_s^2 / alpha_s^2 (Bao et al.'s
Thm. 2 without the data-range bound). On a step from alpha_s = 0 the prior is the data
distribution itself and the same formula holds with (sigma_s/alpha_s)^2 (1 - Gamma_s) replaced by
tr Cov[x0] / d, which `estimate_gamma` returns as `prior_var`.

The fixed-variance choices it is compared with (Ho et al. 2020): v = c^2 at eta = 1 ("beta
tilde", the posterior variance) and v = sigma_s^2 - (alpha_s / alpha_t)^2 sigma_t^2 ("beta", the
forward step's variance).

References:
  Bao, Li, Zhu & Zhang, Analytic-DPM: an Analytic Estimate of the Optimal Reverse Variance in
  Diffusion Probabilistic Models, ICLR 2022.
  Ho, Jain & Abbeel, Denoising Diffusion Probabilistic Models, NeurIPS 2020 (beta, beta tilde).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import schedules as schedules_lib
from diffdistill.solvers import ddim
from diffdistill.solvers import grids
from diffdistill.solvers import multistep

Array = jax.Array
VARIANCES = ("analytic", "posterior", "forward")


def estimate_gamma(denoise: Callable[[Array, Array], Array], x0: Array, t, *,
                   schedule: schedules_lib.Schedule, rng: Array) -> tuple[np.ndarray, float]:
  """(Gamma at each time of t [T], prior_var): Gamma_s = mean over x0 and eps of
  ||eps_hat(alpha_s x0 + sigma_s eps, s)||^2 / d, and prior_var = tr Cov[x0] / d of the samples.

  x0: [M, ...] data samples; t: [T] concrete times (alpha(t) > 0 where Gamma is used).
  """
  t = np.asarray(t, np.float64)
  g = grids.host_grid(schedule, t)
  x0 = jnp.asarray(x0)
  cdt = multistep.compute_dtype(x0.dtype)
  d = int(np.prod(x0.shape[1:]))
  keys = jax.random.split(rng, t.size)

  @jax.jit
  def one(key, ti, a, s):
    eps = jax.random.normal(key, x0.shape, cdt)
    x = a * x0.astype(cdt) + s * eps
    e = (x - a * multistep.call(denoise, x, ti, cdt, x0.dtype)) / s
    return jnp.mean(jnp.sum(e.reshape(e.shape[0], -1) ** 2, axis=1)) / d

  gamma = np.array([float(one(keys[i], jnp.asarray(g.t[i], cdt), jnp.asarray(g.alpha[i], cdt),
                              jnp.asarray(g.sigma[i], cdt))) for i in range(t.size)])
  flat = np.asarray(x0, np.float64).reshape(x0.shape[0], -1)
  prior_var = float(np.mean(np.var(flat, axis=0)))
  return np.clip(gamma, 0.0, 1.0), prior_var


def reverse_variances(grid: grids.HostGrid, *, kind: str = "analytic", eta: float = 1.0,
                      gamma: np.ndarray | None = None, prior_var: float | None = None
                      ) -> np.ndarray:
  """The variance v_i of each step t_i -> t_{i+1}, [N] (see the module docstring).

  kind: "analytic" (v*, needs gamma at grid.t[:-1] and, from alpha = 0, prior_var), "posterior"
  (c^2) or "forward" (sigma_s^2 - (alpha_s/alpha_t)^2 sigma_t^2; the DDPM "beta" choice, eta = 1).
  """
  if kind not in VARIANCES:
    raise ValueError(f"kind must be one of {list(VARIANCES)}, got {kind!r}.")
  base = ddim.ddim_eta_plan(grid, eta)
  c2 = base.noise ** 2
  s_s, s_t, a_s, a_t = grid.sigma[:-1], grid.sigma[1:], grid.alpha[:-1], grid.alpha[1:]
  if kind == "posterior":
    return c2
  if kind == "forward":
    with np.errstate(divide="ignore", invalid="ignore"):
      v = s_s ** 2 - (a_s / a_t) ** 2 * s_t ** 2
    return np.where(a_t > 0, v, s_s ** 2)
  if gamma is None or np.shape(gamma) != (grid.num_steps,):
    raise ValueError(f"kind='analytic' needs gamma at the {grid.num_steps} step starts, got "
                     f"{None if gamma is None else np.shape(gamma)}.")
  with np.errstate(divide="ignore", invalid="ignore"):
    x0_var = (s_s / a_s) ** 2 * (1.0 - np.asarray(gamma))
  if grid.starts_at_pure_noise:
    if prior_var is None:
      raise ValueError("A grid from alpha = 0 needs prior_var (estimate_gamma returns it).")
    x0_var[0] = prior_var
  return c2 + base.b[:, 0] ** 2 * x0_var


def ancestral_plan(grid: grids.HostGrid, variances: np.ndarray, *, eta: float = 1.0
                   ) -> multistep.Plan:
  """DDIM-eta's mean with the noise standard deviation sqrt(variances) (engine rows)."""
  base = ddim.ddim_eta_plan(grid, eta)
  return multistep.Plan(grid, "data", a=base.a, b=base.b, noise=np.sqrt(np.asarray(variances)))


def sample(denoise: Callable[[Array, Array], Array], x_T: Array, *, schedule, nfe: int,
           rng: Array, kind: str = "analytic", eta: float = 1.0, spacing="logsnr",
           gamma: np.ndarray | None = None, prior_var: float | None = None) -> Array:
  """The ancestral sampler with `nfe` steps and the reverse variances of `kind`."""
  t = grids.time_grid(schedule, nfe, spacing=spacing)
  grid = grids.host_grid(schedule, t)
  v = reverse_variances(grid, kind=kind, eta=eta, gamma=gamma, prior_var=prior_var)
  return multistep.run(denoise, jnp.asarray(x_T), ancestral_plan(grid, v, eta=eta), rng=rng)


__all__ = ["estimate_gamma", "reverse_variances", "ancestral_plan", "sample", "VARIANCES"]
