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

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.solvers import ddim
from diffdistill.solvers import dpm_solver_pp
from diffdistill.solvers import grids
from diffdistill.solvers import heun
from diffdistill.solvers import multistep

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SolverInfo:
  """A registered solver.

  order: the global order of accuracy (deterministic solvers; weak order for stochastic ones).
  evals_per_step: denoiser calls per step (the corrector of UniPC reuses the next call).
  multistep: whether it keeps a history of evaluations.
  nfe_rule: how nfe maps to steps, in words.
  options: the solver's keyword options and their defaults.
  """

  name: str
  order: int
  evals_per_step: int
  stochastic: bool
  multistep: bool
  nfe_rule: str
  reference: str
  options: tuple[tuple[str, Any], ...] = ()
  run: Callable | None = dataclasses.field(default=None, repr=False, compare=False)
  nfe_of_steps: Callable[[int, dict], int] | None = dataclasses.field(default=None, repr=False,
                                                                      compare=False)
  min_steps: int = 1


_one = lambda n, o: n
_two = lambda n, o: 2 * n
_three = lambda n, o: 3 * n
_heun_nfe = lambda n, o: 2 * n - 1 if o.get("final_euler", True) else 2 * n

_DDIM = "Song et al. 2021 (DDIM)"
_PP = "Lu et al. 2022b (DPM-Solver++)"
_EDM = "Karras et al. 2022 (EDM)"
_LOF = (("lower_order_final", True),)

SOLVERS: dict[str, SolverInfo] = {s.name: s for s in [
    SolverInfo("ddim", 1, 1, False, False, "nfe = steps", _DDIM, run=ddim.run_ddim,
               nfe_of_steps=_one),
    SolverInfo("euler", 1, 1, False, False, "nfe = steps",
               "Karras et al. 2022 (Euler in sigma/alpha; the DDIM map)", run=ddim.run_ddim,
               nfe_of_steps=_one),
    SolverInfo("heun", 2, 2, False, False, "nfe = 2 steps - 1 (final Euler step); 2 steps with "
               "final_euler=False", _EDM, options=(("final_euler", True),), run=heun.run_heun,
               nfe_of_steps=_heun_nfe),
    SolverInfo("dpm_solver_pp_2m", 2, 1, False, True, "nfe = steps", _PP, options=_LOF,
               run=dpm_solver_pp.run_2m, nfe_of_steps=_one, min_steps=2),
]}


def _check_solver(solver: str) -> SolverInfo:
  if not isinstance(solver, str) or solver not in SOLVERS:
    raise ValueError(f"Unknown solver {solver!r}; expected one of {list(SOLVERS)}.")
  return SOLVERS[solver]


def _resolve_options(info: SolverInfo, options: dict) -> dict:
  allowed = dict(info.options)
  unknown = set(options) - set(allowed)
  if unknown:
    raise ValueError(f"Unknown option(s) {sorted(unknown)} for solver {info.name!r}; it accepts "
                     f"{sorted(allowed) or 'none'}.")
  return {**allowed, **options}


def steps_for_nfe(solver: str, nfe: int, *, final_denoise: bool = False,
                  allow_nearest_nfe: bool = False, **options) -> tuple[int, int]:
  """(num_steps, actual_nfe) of `solver` for an NFE budget; ValueError if infeasible and not
  allow_nearest_nfe."""
  info = _check_solver(solver)
  opts = _resolve_options(info, options)
  if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
    raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}.")
  budget = nfe - int(final_denoise)
  feasible = []
  n = info.min_steps
  while info.nfe_of_steps(n, opts) <= max(budget, 0) or not feasible:
    feasible.append((n, info.nfe_of_steps(n, opts)))
    if feasible[-1][1] > budget:
      break
    n += 1
  exact = [f for f in feasible if f[1] == budget]
  if exact:
    steps, used = exact[0]
  elif not allow_nearest_nfe:
    options_txt = sorted({f[1] + int(final_denoise) for f in feasible})[:8]
    raise ValueError(
        f"Solver {solver!r} cannot use exactly nfe={nfe} ({info.nfe_rule}, at least "
        f"{info.min_steps} step(s){', plus 1 for final_denoise' if final_denoise else ''}); "
        f"feasible budgets include {options_txt}. Pass allow_nearest_nfe=True to use the "
        "nearest feasible one.")
  else:
    below = [f for f in feasible if f[1] <= budget]
    steps, used = below[-1] if below else feasible[0]
  return steps, used + int(final_denoise)


def sample(denoise: Callable[[Array, Array], Array], x_T: Array, *,
           schedule: schedules_lib.Schedule, solver: str, nfe: int, spacing="logsnr",
           t_start: float | None = None, t_end: float | None = None, rng: Array | None = None,
           final_denoise: bool = False, allow_nearest_nfe: bool = False, rho: float = 7.0,
           **options) -> Array:
  """Samples x_{t_end} from x_T = x_{t_start} with `nfe` calls of `denoise`.

  Args:
    denoise: `denoise(x, t) -> x0_hat` with x: [B, ...], t: [B] (params bound).
    x_T: [B, ...], the state at t_start (default schedule.t_max).
    schedule: the forward process the denoiser belongs to (static).
    solver: a name in SOLVERS (static).
    nfe: the exact number of denoiser calls (static), final_denoise included.
    spacing: "logsnr", "karras", "time_uniform", "time_quadratic" or an array of times.
    t_start, t_end: concrete scalars, t_min <= t_end < t_start <= t_max.
    rng: a PRNG key, required by stochastic solvers.
    final_denoise: return D(x_{t_end}, t_end) instead of x_{t_end} (one call, counted in nfe).
    allow_nearest_nfe: use the nearest feasible budget instead of raising.
    rho: the Karras exponent (spacing="karras").
    **options: solver options (SOLVERS[solver].options).
  Returns:
    [B, ...] in x_T's dtype.
  """
  info = _check_solver(solver)
  opts = _resolve_options(info, options)
  x_T = jnp.asarray(x_T)
  if x_T.ndim < 1:
    raise ValueError(f"x_T must have a batch axis, [B, ...]; got shape {x_T.shape}.")
  if not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f"x_T must be a floating array, got dtype {x_T.dtype}.")
  if info.stochastic and rng is None:
    raise ValueError(f"Solver {solver!r} is stochastic: pass rng=jax.random.key(...).")
  steps, _ = steps_for_nfe(solver, nfe, final_denoise=final_denoise,
                           allow_nearest_nfe=allow_nearest_nfe, **opts)
  if isinstance(spacing, str):
    t = grids.time_grid(schedule, steps, spacing=spacing, t_start=t_start, t_end=t_end, rho=rho)
  else:
    t = grids.check_user_grid(schedule, spacing, num_steps=steps, t_start=t_start, t_end=t_end)
  grid = grids.host_grid(schedule, t)
  in_dtype = x_T.dtype
  x = info.run(denoise, x_T, grid, schedule=schedule, rng=rng, in_dtype=in_dtype, **opts)
  if final_denoise:
    x = multistep.call(denoise, x, t[-1], multistep.compute_dtype(in_dtype), in_dtype)
  return x.astype(in_dtype)


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


__all__ = ["SolverInfo", "SOLVERS", "sample", "make_sampler", "steps_for_nfe"]
