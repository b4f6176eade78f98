"""Grids and multistep coefficients computed inside a trace, so that a sampler can be
differentiated with respect to its times.

The host path (`grids.host_grid` + each family's `plan`) evaluates the schedule and the
coefficient rows in float64 numpy when the sampler is traced; it stays the default. Here the
same quantities are jax values of a jnp array of times t = (t_0 > ... > t_N):

    alpha_i = alpha(t_i),  sigma_i = sigma(t_i),  lambda_i = logsnr(t_i) / 2,  h_i = lambda_{i+1} - lambda_i

and the rows (a, b, corrector) of `multistep.Plan` come from the very functions the host plans
use, called with `xp = jax.numpy` (`dpm_solver_pp.multistep_weights`, `unipc.step_weights`,
`pndm.AB_COEFFS`), so the two paths agree to float64 rounding (tests/test_learned_sampling.py).
`multistep.run` runs such a plan unchanged, and `jax.grad` flows from the samples to t.

Which rows are warm-up or lower-order-final rows, and whether the grid starts at alpha = 0
(lambda = -inf) or ends at sigma = 0, are static: they depend on N and on the two ends only,
which are concrete (`TracedGrid.starts_at_pure_noise`, `.ends_at_clean_data`). The interior
times must be strictly inside the open range (no interior point at alpha = 0).

Traceable solvers (`TRACEABLE`): ddim (= euler = dpm_solver_1), dpm_solver_pp_2m/3m,
unipc_1/2/3 and ipndm, the one-call-per-step solvers that lead at 5-10 NFE.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import schedules as schedules_lib
from diffdistill.solvers import ddim
from diffdistill.solvers import dpm_solver_pp
from diffdistill.solvers import grids
from diffdistill.solvers import multistep
from diffdistill.solvers import pndm
from diffdistill.solvers import unipc

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class TracedGrid:
  """`grids.HostGrid`'s fields as jax arrays [N + 1], with the two static end flags."""

  t: Array
  alpha: Array
  sigma: Array
  lam: Array
  starts_at_pure_noise: bool
  ends_at_clean_data: bool

  @property
  def num_steps(self) -> int:
    return self.t.shape[0] - 1

  @property
  def h(self) -> Array:
    return jnp.diff(self.lam)


def end_flags(schedule: schedules_lib.Schedule, t_start: float, t_end: float) -> tuple[bool, bool]:
  """(starts_at_pure_noise, ends_at_clean_data) of a grid with these concrete ends."""
  g = grids.host_grid(schedule, np.array([t_start, t_end], np.float64))
  return g.starts_at_pure_noise, g.ends_at_clean_data


def trace_grid(schedule: schedules_lib.Schedule, t, *, ends: tuple[bool, bool] | None = None
               ) -> TracedGrid:
  """The schedule on the times t ([N + 1], jnp, possibly traced), as `grids.host_grid` does it.

  ends: (starts_at_pure_noise, ends_at_clean_data); computed from t's ends when t is concrete,
  required when it is traced.
  """
  if ends is None:
    if isinstance(t, jax.core.Tracer):
      raise ValueError("trace_grid of traced times needs ends=(starts_at_pure_noise, "
                       "ends_at_clean_data) (see end_flags).")
    tn = np.asarray(t, np.float64)
    ends = end_flags(schedule, tn[0], tn[-1])
  t = jnp.asarray(t)
  if t.ndim != 1 or t.shape[0] < 2:
    raise ValueError(f"t must be 1-D with >= 2 times, got shape {t.shape}.")
  alpha, sigma = schedule.alpha(t), schedule.sigma(t)
  lam = 0.5 * schedule.logsnr(t)
  start_pure, end_clean = ends
  if start_pure:  # as host_grid: alpha below PURE_NOISE_RATIO sigma is exactly 0, lambda = -inf
    alpha = alpha.at[0].set(0.0)
    lam = lam.at[0].set(-jnp.inf)
  return TracedGrid(t=t, alpha=alpha, sigma=sigma, lam=lam, starts_at_pure_noise=bool(start_pure),
                    ends_at_clean_data=bool(end_clean))


def _ddim_rows(g: TracedGrid):
  """a_i = sigma_{i+1}/sigma_i, b_i = -alpha_{i+1} expm1(-h_i) (= alpha_{i+1} at h = inf), as
  `multistep.ddim_coefficients`."""
  a = g.sigma[1:] / g.sigma[:-1]
  h = g.h
  if g.starts_at_pure_noise:  # h_0 = inf: keep the inf out of the gradient of the other rows
    h = h.at[0].set(1.0)
  b = -g.alpha[1:] * jnp.expm1(-h)
  if g.starts_at_pure_noise:
    b = b.at[0].set(g.alpha[1])
  return a, b


def ddim_plan(g: TracedGrid) -> multistep.Plan:
  a, b = _ddim_rows(g)
  return multistep.Plan(g, "data", a=a, b=b[:, None])


def dpm_solver_pp_plan(g: TracedGrid, order: int, *, lower_order_final: bool = True,
                       taylor_d2: bool = False) -> multistep.Plan:
  """DPM-Solver++(2M/3M) rows from `dpm_solver_pp.multistep_weights(jnp, ...)`."""
  orders = multistep.step_orders(g, order, lower_order_final=lower_order_final)
  a, b1 = _ddim_rows(g)
  rows = []
  for i in range(g.num_steps):
    p = int(orders[i])
    if p == 1:
      w = [b1[i]]
    else:
      h_prev = [g.lam[i - k] - g.lam[i - k - 1] for k in range(p - 1)]
      w = dpm_solver_pp.multistep_weights(jnp, p, g.lam[i + 1] - g.lam[i], h_prev, g.alpha[i + 1],
                                          taylor_d2=taylor_d2)
    rows.append(jnp.stack([jnp.asarray(v, a.dtype) for v in w] + [jnp.zeros((), a.dtype)] * (order - p)))
  return multistep.Plan(g, "data", a=a, b=jnp.stack(rows))


def unipc_plan(g: TracedGrid, order: int, *, variant: str = "bh2",
               lower_order_final: bool = True) -> multistep.Plan:
  """UniPC-`order` rows from `unipc.step_weights(..., xp=jnp)`, laid out as `unipc.plan`."""
  if variant not in unipc.VARIANTS:
    raise ValueError(f"Unknown UniPC variant {variant!r}; expected one of {list(unipc.VARIANTS)}.")
  n = g.num_steps
  orders = multistep.step_orders(g, order, lower_order_final=lower_order_final)
  a = g.sigma[1:] / g.sigma[:-1]
  zero = jnp.zeros((), a.dtype)
  b_rows, r_rows = [], [jnp.zeros((order + 1,), a.dtype)]
  for i in range(n):
    p = int(orders[i])
    nodes = [g.lam[i - m] for m in range(p)]
    finite = not (i == 0 and g.starts_at_pure_noise)
    pred, corr = unipc.step_weights(nodes, g.lam[i + 1], g.alpha[i + 1], p, variant, xp=jnp,
                                    finite_h=finite)
    b_rows.append(jnp.concatenate([pred, jnp.zeros((order - p,), a.dtype)]))
    if i + 1 < n:
      r_rows.append(jnp.concatenate([corr, jnp.zeros((order - p,), a.dtype)]))
  p_c = jnp.zeros((n,), a.dtype).at[0].set(1.0)
  q_c = jnp.concatenate([zero[None], a[:-1]])
  return multistep.Plan(g, "data", a=a, b=jnp.stack(b_rows),
                        corrector=(p_c, q_c, jnp.stack(r_rows)))


def ipndm_plan(g: TracedGrid, *, order: int = 4) -> multistep.Plan:
  """iPNDM: `pndm.AB_COEFFS` on the DDIM transfer in the noise form, as `pndm.plan`."""
  n = g.num_steps
  orders = np.minimum(order, np.arange(n) + 1)
  if g.starts_at_pure_noise:
    orders = np.minimum(orders, np.maximum(np.arange(n), 1))
  first = 1 if g.starts_at_pure_noise else 0
  a = g.alpha[1:] / jnp.where(g.alpha[:-1] == 0, 1.0, g.alpha[:-1])
  if first:
    a = a.at[0].set(0.0)
  rows = []
  for i in range(n):
    p = int(orders[i])
    if i < first:
      row = [g.sigma[1]] + [0.0] * (order - 1)
    else:
      row = [(g.sigma[i + 1] - a[i] * g.sigma[i]) * c for c in pndm.AB_COEFFS[p]] + [0.0] * (order - p)
    rows.append(jnp.stack([jnp.asarray(v, a.dtype) for v in row]))
  gg = None
  if first:
    gg = jnp.zeros((n,), a.dtype).at[0].set(g.alpha[1])
  return multistep.Plan(g, "noise", a=a, b=jnp.stack(rows), g=gg)


@dataclasses.dataclass(frozen=True)
class Traceable:
  """A solver whose plan can be built on a traced grid: `traced(grid, **opts)` and the host
  twin `host(host_grid, **opts)` that `sample` uses."""

  traced: Callable
  host: Callable


def _dpp(order):
  return Traceable(
      traced=lambda g, lower_order_final=True, taylor_d2=False: dpm_solver_pp_plan(
          g, order, lower_order_final=lower_order_final, taylor_d2=taylor_d2),
      host=lambda g, lower_order_final=True, taylor_d2=False: dpm_solver_pp.multistep_plan(
          g, order, lower_order_final=lower_order_final, taylor_d2=taylor_d2))


def _unipc(order):
  return Traceable(
      traced=lambda g, variant="bh2", lower_order_final=True: unipc_plan(
          g, order, variant=variant, lower_order_final=lower_order_final),
      host=lambda g, variant="bh2", lower_order_final=True: unipc.plan(
          g, order, variant=variant, lower_order_final=lower_order_final))


_DDIM = Traceable(traced=ddim_plan, host=ddim.ddim_plan)
TRACEABLE: dict[str, Traceable] = {
    "ddim": _DDIM, "euler": _DDIM, "dpm_solver_1": _DDIM,
    "dpm_solver_pp_2m": _dpp(2), "dpm_solver_pp_3m": _dpp(3),
    "unipc_1": _unipc(1), "unipc_2": _unipc(2), "unipc_3": _unipc(3),
    "ipndm": Traceable(traced=ipndm_plan, host=lambda g: pndm.plan(g)),
}


def check_traceable(solver: str) -> Traceable:
  if solver not in TRACEABLE:
    raise ValueError(f"Solver {solver!r} has no traceable coefficient path; expected one of "
                     f"{list(TRACEABLE)}.")
  return TRACEABLE[solver]


def traced_plan(solver: str, g: TracedGrid, **options) -> multistep.Plan:
  """The plan of `solver` on the traced grid g (options as in SOLVERS[solver].options)."""
  return check_traceable(solver).traced(g, **options)


def sample_on_times(denoise: Callable[[Array, Array], Array], x_T: Array, t, *,
                    schedule: schedules_lib.Schedule, solver: str,
                    ends: tuple[bool, bool] | None = None, **options) -> Array:
  """x_{t_N} from x_T = x_{t_0} by `solver` on the times t ([N + 1], possibly traced).

  Differentiable with respect to t; N = len(t) - 1 steps, one denoiser call each. The solver's
  options are those of SOLVERS[solver] (e.g. lower_order_final, variant).
  """
  g = trace_grid(schedule, t, ends=ends)
  x_T = jnp.asarray(x_T)
  plan = traced_plan(solver, g, **options)
  return multistep.run(denoise, x_T, plan, in_dtype=x_T.dtype).astype(x_T.dtype)


__all__ = ["TracedGrid", "trace_grid", "end_flags", "traced_plan", "sample_on_times",
           "TRACEABLE", "Traceable", "check_traceable", "ddim_plan", "dpm_solver_pp_plan",
           "unipc_plan", "ipndm_plan"]
