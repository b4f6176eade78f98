"""The linear-multistep engine: every one-evaluation-per-step solver as precomputed coefficients.

DDIM, Euler, DPM-Solver++(2M/3M), their SDE variant, UniPC, DEIS, iPNDM, LMS, DDPM and
Euler-Maruyama all take the form, at step i (t_i -> t_{i+1}),

    F_i      = D(x_i, t_i)                     (data form)  or  (x_i - alpha_i D_i) / sigma_i  (noise)
    x_i^c    = p_i x_i + q_i x_{i-1}^c + sum_j r_ij F_{i-j}               (UniC corrector; else x_i)
    x_{i+1}  = a_i x_i^c + sum_j b_ij F_{i-j} + g_i D_i + n_i z_i,        z_i ~ N(0, I)

with all of a, b, g, n, p, q, r computed on the host from the grid (float64 numpy) when the
sampler is traced. The sampler is then one `lax.scan` whose body makes one denoiser call and
a few fused multiply-adds; warm-up orders, lower-order final steps and infinite-logSNR ends
are rows of zeros in b, not branches. Each family module turns its paper's update into these
coefficients; its public single-step function is checked against the engine in the tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill.solvers import grids


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """Coefficients of an N-step linear multistep sampler (numpy, float64).

  form: "data" (history holds D) or "noise" (history holds eps).
  a: [N]; b: [N, K]; g, noise: [N] or None; corrector: (p [N], q [N], r [N, K']) or None.
  """

  grid: grids.HostGrid
  form: str
  a: np.ndarray
  b: np.ndarray
  g: np.ndarray | None = None
  noise: np.ndarray | None = None
  corrector: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

  def __post_init__(self):
    n = self.grid.num_steps
    if self.form not in ("data", "noise"):
      raise ValueError(f"form must be 'data' or 'noise', got {self.form!r}.")
    arrays = [self.a, self.b] + [v for v in (self.g, self.noise) if v is not None]
    if self.corrector is not None:
      arrays += list(self.corrector)
    for v in arrays:
      if v.shape[0] != n or not np.all(np.isfinite(v)):
        raise ValueError(f"Plan coefficients must have N={n} finite rows; got {v.shape}, {v}.")


def compute_dtype(dtype) -> jnp.dtype:
  """Solver arithmetic runs in at least float32 (bfloat16 states are only stored/passed as such)."""
  return jnp.result_type(dtype, jnp.float32)


def call(denoise, x, t, out_dtype, in_dtype):
  """D(x, t) with x cast to the user's dtype and t broadcast to [B]; the result in out_dtype."""
  tb = jnp.full((x.shape[0],), t, dtype=out_dtype)
  return denoise(x.astype(in_dtype), tb).astype(out_dtype)


def run(denoise, x, plan: Plan, *, rng=None, in_dtype=None, hist=None):
  """Runs `plan` from x = x_{t_0}; returns x_{t_N}. `hist` ([K, ...], newest first) seeds the
  history (PNDM's Runge-Kutta start); otherwise it starts empty (zeros with zero weights)."""
  in_dtype = in_dtype or x.dtype
  cdt = compute_dtype(in_dtype)
  x = x.astype(cdt)
  g = plan.grid
  k_b = plan.b.shape[1]
  k = max(k_b, plan.corrector[2].shape[1] if plan.corrector is not None else 0)
  if hist is None:
    hist = jnp.zeros((k,) + x.shape, cdt)
  elif hist.shape[0] < k:
    hist = jnp.concatenate([hist.astype(cdt), jnp.zeros((k - hist.shape[0],) + x.shape, cdt)])
  c = lambda v: jnp.asarray(v, cdt)
  xs = {"t": c(g.t[:-1]), "alpha": c(g.alpha[:-1]), "sigma": c(g.sigma[:-1]), "a": c(plan.a),
        "b": c(plan.b)}
  if plan.g is not None:
    xs["g"] = c(plan.g)
  if plan.noise is not None:
    if rng is None:
      raise ValueError("This solver is stochastic: pass rng=jax.random.key(...).")
    xs["noise"] = c(plan.noise)
    xs["key"] = jax.random.split(rng, g.num_steps)
  if plan.corrector is not None:
    xs["p"], xs["q"], xs["r"] = (c(v) for v in plan.corrector)

  def body(carry, s):
    x, x_prev, hist = carry
    d = call(denoise, x, s["t"], cdt, in_dtype)
    f = d if plan.form == "data" else (x - s["alpha"] * d) / s["sigma"]
    hist = jnp.concatenate([f[None], hist[:-1]])
    xc = x
    if plan.corrector is not None:
      xc = s["p"] * x + s["q"] * x_prev + jnp.tensordot(s["r"], hist[:s["r"].shape[0]], axes=1)
    x_next = s["a"] * xc + jnp.tensordot(s["b"], hist[:k_b], axes=1)
    if plan.g is not None:
      x_next = x_next + s["g"] * d
    if plan.noise is not None:
      x_next = x_next + s["noise"] * jax.random.normal(s["key"], x.shape, cdt)
    return (x_next, xc, hist), None

  (x, _, _), _ = jax.lax.scan(body, (x, x, hist), xs)
  return x


def step_orders(grid: grids.HostGrid, order: int, *, lower_order_final: bool = False) -> np.ndarray:
  """The order used at each step: warm-up min(order, i + 1), at most the number of history
  nodes with finite logSNR, 1 on a step into sigma = 0, and with lower_order_final (as the
  DPM-Solver++ / UniPC codes do for fewer than 15 steps) min(order, N - i) at the end."""
  n = grid.num_steps
  i = np.arange(n)
  p = np.minimum(order, i + 1)
  if grid.starts_at_pure_noise:
    p = np.minimum(p, np.maximum(i, 1))
  if lower_order_final and n < 15:
    p = np.minimum(p, n - i)
  if grid.ends_at_clean_data:
    p[-1] = 1
  return p


def ddim_coefficients(grid: grids.HostGrid, i: int) -> tuple[float, float]:
  """x_{i+1} = a x_i + b D_i with a = sigma_{i+1}/sigma_i, b = -alpha_{i+1} expm1(-h)
  (= alpha_{i+1} when h = inf, i.e. alpha_i = 0)."""
  h = grid.lam[i + 1] - grid.lam[i]
  a = grid.sigma[i + 1] / grid.sigma[i]
  b = grid.alpha[i + 1] if np.isinf(h) else -grid.alpha[i + 1] * np.expm1(-h)
  return a, b


__all__ = ["Plan", "run", "step_orders", "ddim_coefficients", "compute_dtype", "call"]
