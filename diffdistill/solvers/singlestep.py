"""Runs a singlestep solver (several denoiser calls per step) as one scan over the grid.

A singlestep update places its intermediate stages in logSNR, which is undefined on a step that
starts at alpha = 0 (lambda = -inf: rectified flow / TrigFlow at pure noise) or ends at
sigma = 0. Such a step (only the first or last one can be) is taken instead as `evals` DDIM
sub-steps uniform in theta = arctan(sigma / alpha), each exact in those limits; the NFE is
unchanged. The remaining steps are one `lax.scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill.solvers import ddim
from diffdistill.solvers import grids
from diffdistill.solvers import multistep


def wrap(denoise, in_dtype):
  """The denoiser seen by the solver's arithmetic: compute dtype in and out, user dtype inside."""
  cdt = multistep.compute_dtype(in_dtype)
  return lambda x, t: denoise(x.astype(in_dtype), t).astype(cdt)


def degenerate_step(denoise, x, t_s, t_t, evals, *, schedule):
  """`evals` DDIM sub-steps uniform in theta from t_s to t_t (finite at alpha_s = 0, sigma_t = 0)."""
  ts = grids.theta_substeps(schedule, t_s, t_t, evals)
  for a, b in zip(ts[:-1], ts[1:]):
    x = ddim.ddim_step(denoise, x, jnp.asarray(a, x.dtype), jnp.asarray(b, x.dtype),
                       schedule=schedule)
  return x


def run(step, evals: int, denoise, x, grid: grids.HostGrid, *, schedule, in_dtype, rng=None,
        per_step=None, tail=None):
  """x_{t_N} from x_{t_0} by `step(denoise, x, t_s, t_t, **per_step_i[, rng=key])` on each step.

  per_step: dict of [N] arrays passed per step (e.g. EDM's churn gamma). tail: an optional
  (step_fn, evals) used for the last step instead (EDM Heun's final Euler step).
  """
  cdt = multistep.compute_dtype(in_dtype)
  dn = wrap(denoise, in_dtype)
  x = x.astype(cdt)
  n = grid.num_steps
  per_step = per_step or {}
  keys = None if rng is None else jax.random.split(rng, n)
  first_special = grid.starts_at_pure_noise
  last_special = tail is not None or grid.ends_at_clean_data
  last_evals = tail[1] if tail is not None else evals

  def last_step(x):
    if first_special and n == 1 or grid.ends_at_clean_data:
      return degenerate_step(dn, x, grid.t[-2], grid.t[-1], last_evals, schedule=schedule)
    kw = {k: jnp.asarray(np.asarray(v)[-1], cdt) for k, v in per_step.items()}
    if keys is not None:
      kw["rng"] = keys[-1]
    return tail[0](dn, x, jnp.asarray(grid.t[-2], cdt), jnp.asarray(grid.t[-1], cdt),
                   schedule=schedule, **kw)

  if n == 1 and (first_special or last_special):
    return last_step(x) if last_special else degenerate_step(
        dn, x, grid.t[0], grid.t[1], evals, schedule=schedule)
  lo, hi = int(first_special), n - int(last_special)
  if first_special:
    x = degenerate_step(dn, x, grid.t[0], grid.t[1], evals, schedule=schedule)
  if hi > lo:
    xs = {"t_s": jnp.asarray(grid.t[lo:hi], cdt), "t_t": jnp.asarray(grid.t[lo + 1:hi + 1], cdt),
          "extra": {k: jnp.asarray(np.asarray(v)[lo:hi], cdt) for k, v in per_step.items()}}
    if keys is not None:
      xs["key"] = keys[lo:hi]

    def body(x, s):
      kw = dict(s["extra"])
      if "key" in s:
        kw["rng"] = s["key"]
      return step(dn, x, s["t_s"], s["t_t"], schedule=schedule, **kw), None

    x, _ = jax.lax.scan(body, x, xs)
  if last_special:
    x = last_step(x)
  return x


__all__ = ["run", "degenerate_step", "wrap"]
