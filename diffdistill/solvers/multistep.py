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

  The rows may also be jax arrays computed inside a trace from a traced grid
  (`traceable.TracedGrid`, for samplers differentiated with respect to their times); their
  finiteness cannot be checked then, only their shapes.
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
      if v.shape[0] != n or (isinstance(v, np.ndarray) and not np.all(np.isfinite(v))):
        raise ValueError(f"Plan coefficients must have N={n} finite rows; got {v.shape}, {v}.")


def compute_dtype(dtype) -> jnp.dtype:
  """Solver arithmetic runs in at least float32 (bfloat16 states are only stored/passed as such)."""
  return jnp.result_type(dtype, jnp.float32)


def require_rng(rng, what: str) -> None:
  """A stochastic step or sampler needs a PRNG key."""
  if rng is None:
    raise ValueError(f"{what} is stochastic: pass rng=jax.random.key(...).")


def call(denoise, x, t, out_dtype, in_dtype):
  """D(x, t) with x cast to the user's dtype and t broadcast to [B]; the result in out_dtype."""
  tb = jnp.full((x.shape[0],), t, dtype=out_dtype)
  return denoise(x.astype(in_dtype), tb).astype(out_dtype)


def _to_slots(coef: np.ndarray, k: int) -> np.ndarray:
  """Rows of weights on F_{i-j} (j = 0..K'-1) -> weights on ring slots: F_{i-j} sits in slot (i - j) mod k."""
  n, kk = coef.shape
  if not isinstance(coef, np.ndarray):  # traced rows: the same sums as a 0/1 contraction
    onehot = (np.arange(k)[None, None, :] == ((np.arange(n)[:, None] - np.arange(kk)) % k)[..., None])
    return jnp.einsum("nj,njk->nk", coef, jnp.asarray(onehot, coef.dtype))
  out = np.zeros((n, k))
  for j in range(kk):
    np.add.at(out, (np.arange(n), (np.arange(n) - j) % k), coef[:, j])
  return out


def _combine(w, ring):
  """sum_j w_j ring_j as elementwise multiply-adds (K is small and static), so that XLA fuses
  the whole update into one pass over the states; a tensordot is a separate dot kernel."""
  out = w[0] * ring[0]
  for j in range(1, ring.shape[0]):
    out = out + w[j] * ring[j]
  return out


def run(denoise, x, plan: Plan, *, rng=None, in_dtype=None, hist=None):
  """Runs `plan` from x = x_{t_0}; returns x_{t_N}. `hist` ([K, ...], newest first) seeds the
  history (PNDM's Runge-Kutta start); otherwise it starts empty (zeros with zero weights).

  The history is a ring buffer of K states: step i writes F_i into slot i mod K in place, and
  the coefficient rows are permuted to slots on the host, so no step copies the history; with
  the combinations written as multiply-adds (`_combine`) XLA fuses each update into one pass.
  Together they cut the per-NFE overhead of unipc_3 from ~7 % to ~1 % of a 64-D mixture call
  (bench/README.md).
  """
  in_dtype = in_dtype or x.dtype
  cdt = compute_dtype(in_dtype)
  x = x.astype(cdt)
  g = plan.grid
  k = max(plan.b.shape[1], plan.corrector[2].shape[1] if plan.corrector is not None else 0)
  ring = jnp.zeros((k,) + x.shape, cdt)
  if hist is not None:
    # Seeded F_{-1-j} = hist[j] belongs in slot (-1 - j) mod K = K - 1 - j.
    m = min(hist.shape[0], k)
    ring = ring.at[k - m:].set(hist[:m][::-1].astype(cdt))
  c = lambda v: jnp.asarray(v, cdt)
  xs = {"t": c(g.t[:-1]), "alpha": c(g.alpha[:-1]), "sigma": c(g.sigma[:-1]), "a": c(plan.a),
        "b": c(_to_slots(plan.b, k)), "slot": jnp.arange(g.num_steps, dtype=jnp.int32) % k}
  if plan.g is not None:
    xs["g"] = c(plan.g)
  if plan.noise is not None:
    require_rng(rng, "This solver")
    xs["noise"] = c(plan.noise)
    xs["key"] = jax.random.split(rng, g.num_steps)
  if plan.corrector is not None:
    p, q, r = plan.corrector
    xs["p"], xs["q"], xs["r"] = c(p), c(q), c(_to_slots(r, k))

  def body(carry, s):
    x, x_prev, ring = carry
    d = call(denoise, x, s["t"], cdt, in_dtype)
    f = d if plan.form == "data" else (x - s["alpha"] * d) / s["sigma"]
    ring = jax.lax.dynamic_update_index_in_dim(ring, f, s["slot"], 0)
    xc = x
    if plan.corrector is not None:
      xc = s["p"] * x + s["q"] * x_prev + _combine(s["r"], ring)
    x_next = s["a"] * xc + _combine(s["b"], ring)
    if plan.g is not None:
      x_next = x_next + s["g"] * d
    if plan.noise is not None:
      x_next = x_next + s["noise"] * jax.random.normal(s["key"], x.shape, cdt)
    return (x_next, xc, ring), None

  (x, _, _), _ = jax.lax.scan(body, (x, x, ring), xs)
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


__all__ = ["Plan", "run", "step_orders", "ddim_coefficients", "compute_dtype", "call", "require_rng"]
