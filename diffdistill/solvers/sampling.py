"""The sampler entry point, `sample`, and the registry of solvers, `SOLVERS`.

    x_end = sample(denoise, x_T, schedule=s, solver="dpm_solver_pp_2m", nfe=10)

`denoise(x, t) -> x0_hat` is a denoiser with its params bound (x: [B, ...], t: [B]). `nfe` is
the exact number of denoiser calls: a budget the solver cannot meet exactly is a ValueError
unless `allow_nearest_nfe=True` (then the largest feasible budget below it, or the smallest
above it when none is below; `steps_for_nfe` says which). The grid is computed on the host when
`sample` is traced; the steps are one `lax.scan`, so `jax.jit(sample, static_argnames=...)`
(or `make_sampler`) compiles the whole sampler once per (solver, nfe, shape).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from diffdistill import _validate
from diffdistill import schedules as schedules_lib
from diffdistill.solvers import adaptive
from diffdistill.solvers import grids
from diffdistill.solvers import learn
from diffdistill.solvers import multistep
from diffdistill.solvers import table
from diffdistill.solvers.table import SOLVERS, SolverInfo, one_call_per_step

Array = jax.Array


LEARNED_PREFIX = "learned:"


def _learned_info(solver: str) -> SolverInfo:
  """solver = "learned:<path>": a multistep solver with fitted coefficients and its own grid
  (learn.py), run from the saved file; not in SOLVERS, which lists the training-free solvers."""
  learned = learn.load(solver[len(LEARNED_PREFIX):]).check(kind="coefficients")
  return SolverInfo(solver, SOLVERS[learned.solver].order, 1, False, True,
                    f"nfe = {learned.nfe}, the file's", "Frankel et al. 2025 (S4S); Shaul et al. "
                    f"2024 (BNS): fitted corrections of {learned.solver}",
                    run=functools.partial(learn.run_learned, coefficients=learned),
                    nfe_of_steps=one_call_per_step, min_steps=learned.t.size - 1, grid=learned.t)


def _check_solver(solver: str) -> SolverInfo:
  if isinstance(solver, str) and solver.startswith(LEARNED_PREFIX):
    return _learned_info(solver)
  if not isinstance(solver, str) or solver not in SOLVERS:
    raise ValueError(f"Unknown solver {solver!r}; expected one of {list(SOLVERS)}.")
  return SOLVERS[solver]


def steps_for_nfe(solver: str, nfe: int, *, final_denoise: bool = False,
                  allow_nearest_nfe: bool = False, **options) -> tuple[int, int]:
  """(num_steps, actual_nfe) of `solver` for an NFE budget; ValueError if infeasible and not
  allow_nearest_nfe."""
  return table.steps_for(_check_solver(solver), nfe, final_denoise=final_denoise,
                         allow_nearest_nfe=allow_nearest_nfe, **options)


def sample(denoise: Callable[[Array, Array], Array], x_T: Array, *,
           schedule: schedules_lib.Schedule, solver: str, nfe: int | None, spacing="logsnr",
           t_start: float | None = None, t_end: float | None = None, rng: Array | None = None,
           final_denoise: bool = False, allow_nearest_nfe: bool = False, rho: float = 7.0,
           **options) -> Array:
  """Samples x_{t_end} from x_T = x_{t_start} with `nfe` calls of `denoise`.

  Args:
    denoise: `denoise(x, t) -> x0_hat` with x: [B, ...], t: [B] (params bound).
    x_T: [B, ...], the state at t_start (default schedule.t_max).
    schedule: the forward process the denoiser belongs to (static), or its registry name.
    solver: a name in SOLVERS (static).
    nfe: the exact number of denoiser calls (static), final_denoise included.
    spacing: "logsnr", "karras", "time_uniform", "time_quadratic" or an array of times.
    t_start, t_end: concrete scalars, t_min <= t_end < t_start <= t_max.
    rng: a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), required by stochastic
      solvers.
    final_denoise: return D(x_{t_end}, t_end) instead of x_{t_end} (one call, counted in nfe).
    allow_nearest_nfe: use the nearest feasible budget instead of raising.
    rho: the Karras exponent (spacing="karras").
    **options: solver options (SOLVERS[solver].options).
  Returns:
    [B, ...] in x_T's dtype; for solver="adaptive" with return_nfe=True, (x, nfe).

  Non-finite values: called eagerly (concrete x_T), a NaN or inf in x_T is a ValueError naming
  x_T, and a non-finite sample (the denoiser returned NaN or inf at some grid time) a ValueError
  naming denoise; both are host-side checks after the fact, so none costs anything under jit.
  Under the caller's jit (`make_sampler`) nothing is checked: with a fixed-step solver a
  non-finite row of x_T gives a non-finite row of the result and leaves the other rows as they
  would be; a denoiser's NaN spreads to the rows it is returned for.

  solver="learned:<path>" runs learned coefficients saved by `learn.save` on their own grid
  (spacing does not apply; see docs/learned_sampling.md).
  The adaptive solver takes nfe=None and the options rtol, atol, method ("tsit5"/"dopri5"),
  max_steps and return_nfe (see adaptive.adaptive_sample); spacing does not apply to it.
  """
  info = _check_solver(solver)
  opts = table.resolve_options(info, options)
  schedule = schedules_lib.resolve(schedule)
  x_T = jnp.asarray(x_T)
  if x_T.ndim < 1:
    raise ValueError(f"x_T must have a batch axis, [B, ...]; got shape {x_T.shape}.")
  if not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f"x_T must be a floating array, got dtype {x_T.dtype}.")
  _validate.check_finite("x_T", x_T)
  if rng is not None:
    rng = _validate.check_key("rng", rng)
  # Each output checked where it is made, at trace time: one of shape [B, 1] would broadcast
  # silently in the steps.
  denoise = _validate.checked_denoiser(denoise)
  if solver == "adaptive":
    if nfe is not None:
      raise ValueError("solver='adaptive' chooses its own NFE: pass nfe=None (and rtol/atol); "
                       "return_nfe=True returns it.")
    return_nfe = opts.pop("return_nfe")
    x, used = adaptive.adaptive_sample(denoise, x_T, schedule=schedule, t_start=t_start,
                                       t_end=t_end, **opts)
    if final_denoise:
      x = multistep.call(denoise, x, grids.resolve_range(schedule, t_start, t_end)[1],
                         multistep.compute_dtype(x_T.dtype), x_T.dtype).astype(x_T.dtype)
      used = used + 1
    _check_finite_result(x)
    return (x, used) if return_nfe else x
  if info.stochastic and rng is None:
    raise ValueError(f"Solver {solver!r} is stochastic: pass rng=jax.random.key(...).")
  steps, _ = steps_for_nfe(solver, nfe, final_denoise=final_denoise,
                           allow_nearest_nfe=allow_nearest_nfe, **opts)
  if info.grid_steps is not None:  # DPM-Solver-fast: `steps` is the call budget.
    opts["budget"] = steps
    steps = info.grid_steps(steps)
  if info.grid is not None:  # a learned solver runs on the grid it was fitted on
    if steps != info.grid.size - 1:
      raise ValueError(f"{solver!r} was fitted for nfe={info.grid.size - 1} (its own grid); got "
                       f"nfe={nfe}. Fit one for that nfe.")
    t = grids.check_user_grid(schedule, info.grid, t_start=t_start, t_end=t_end)
  elif isinstance(spacing, str):
    t = grids.time_grid(schedule, steps, spacing=spacing, t_start=t_start, t_end=t_end, rho=rho)
  else:
    t = grids.check_user_grid(schedule, spacing, num_steps=steps, t_start=t_start, t_end=t_end)
  grid = grids.host_grid(schedule, t)
  in_dtype = x_T.dtype
  x = info.run(denoise, x_T, grid, schedule=schedule, rng=rng, in_dtype=in_dtype, **opts)
  if final_denoise:
    x = multistep.call(denoise, x, t[-1], multistep.compute_dtype(in_dtype), in_dtype)
  _check_finite_result(x)
  return x.astype(in_dtype)


def _check_finite_result(x: Array) -> None:
  """Where x is concrete (not under the caller's jit): a non-finite sample from a finite x_T
  means the denoiser returned NaN or inf at some time of the grid."""
  rows = _validate.nonfinite_rows(x)
  if rows is not None and rows.size:
    raise ValueError(f"denoise(x, t) returned NaN or inf at some time of the grid: {rows.size} of "
                     f"{x.shape[0]} samples are non-finite (the first: row {rows[0]}) although "
                     "x_T is finite. Check the denoiser over [t_end, t_start].")


def make_sampler(apply: Callable, *, schedule: schedules_lib.Schedule, solver: str, nfe: int,
                 **kwargs) -> Callable:
  """A jitted `run(params, x_T, rng=None) -> x_end` for a denoiser `apply(params, x, t)`.

  Params are an argument (a new teacher does not recompile); everything else is fixed here.
  """

  @jax.jit
  def run(params, x_T, rng=None):
    return sample(functools.partial(apply, params), x_T, schedule=schedule, solver=solver,
                  nfe=nfe, rng=rng, **kwargs)

  return run


__all__ = ["SolverInfo", "SOLVERS", "LEARNED_PREFIX", "sample", "make_sampler", "steps_for_nfe"]
