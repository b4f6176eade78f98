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

from diffdistill import _validate
from diffdistill import schedules as schedules_lib
from diffdistill.solvers import adaptive
from diffdistill.solvers import ddim
from diffdistill.solvers import deis
from diffdistill.solvers import dpm_solver
from diffdistill.solvers import dpm_solver_pp
from diffdistill.solvers import grids
from diffdistill.solvers import heun
from diffdistill.solvers import learn
from diffdistill.solvers import multistep
from diffdistill.solvers import pndm
from diffdistill.solvers import unipc

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SolverInfo:
  """A registered solver.

  order: the global order of accuracy (deterministic solvers; weak order for stochastic ones).
  evals_per_step: denoiser calls per step (the corrector of UniPC reuses the next call).
  multistep: whether it keeps a history of evaluations.
  nfe_rule: how nfe maps to steps, in words.
  options: the solver's keyword options and their defaults.
  note: where the measured order depends on the grid or the budget.
  """

  name: str
  order: int
  evals_per_step: int
  stochastic: bool
  multistep: bool
  nfe_rule: str
  reference: str
  options: tuple[tuple[str, Any], ...] = ()
  note: str = ""
  run: Callable | None = dataclasses.field(default=None, repr=False, compare=False)
  nfe_of_steps: Callable[[int, dict], int] | None = dataclasses.field(default=None, repr=False,
                                                                      compare=False)
  min_steps: int = 1
  grid_steps: Callable[[int], int] | None = dataclasses.field(default=None, repr=False,
                                                             compare=False)
  grid: Any = dataclasses.field(default=None, repr=False, compare=False)  # a learned solver's own


_one = lambda n, o: n
_two = lambda n, o: 2 * n
_three = lambda n, o: 3 * n
_heun_nfe = lambda n, o: 2 * n - 1 if o.get("final_euler", True) else 2 * n

_DDIM = "Song et al. 2021 (DDIM)"
_PP = "Lu et al. 2022b (DPM-Solver++)"
_EDM = "Karras et al. 2022 (EDM)"
_LOF = (("lower_order_final", True),)

_pndm_nfe = lambda n, o: 12 + (n - 3)
_UNIPC = "Zhao et al. 2023 (UniPC)"
_DEIS = "Zhang & Chen 2023 (DEIS)"
_DPM = "Lu et al. 2022a (DPM-Solver)"
_UNIPC_OPTS = (("variant", "bh2"), ("lower_order_final", True))
_CHURN = (("S_churn", 40.0), ("S_tmin", 0.05), ("S_tmax", 50.0), ("S_noise", 1.003),
          ("final_euler", True))


def _adaptive_nfe(n, o):
  raise ValueError("The adaptive solver chooses its NFE from rtol/atol: call sample(..., "
                   "solver='adaptive', nfe=None, rtol=..., atol=..., return_nfe=True).")


SOLVERS: dict[str, SolverInfo] = {s.name: s for s in [
    SolverInfo("ddim", 1, 1, False, False, "nfe = steps", _DDIM, run=ddim.run_ddim,
               nfe_of_steps=_one),
    SolverInfo("ddim_eta", 1, 1, True, False, "nfe = steps", _DDIM, options=(("eta", 0.5),),
               run=ddim.run_ddim_eta, nfe_of_steps=_one),
    SolverInfo("ddpm", 1, 1, True, False, "nfe = steps", "Ho et al. 2020 (DDPM ancestral)",
               run=ddim.run_ddpm, nfe_of_steps=_one),
    SolverInfo("euler", 1, 1, False, False, "nfe = steps",
               "Karras et al. 2022 (Euler in sigma/alpha; the DDIM map)", run=ddim.run_ddim,
               nfe_of_steps=_one),
    SolverInfo("euler_maruyama", 1, 1, True, False, "nfe = steps",
               "Song et al. 2021 (reverse SDE)", run=ddim.run_euler_maruyama, nfe_of_steps=_one),
    SolverInfo("heun", 2, 2, False, False, "nfe = 2 steps - 1 (final Euler step); 2 steps with "
               "final_euler=False", _EDM, options=(("final_euler", True),), run=heun.run_heun,
               nfe_of_steps=_heun_nfe),
    SolverInfo("edm_stochastic", 2, 2, True, False, "nfe = 2 steps - 1 (final Euler step)", _EDM,
               options=_CHURN, run=heun.run_edm_stochastic, nfe_of_steps=_heun_nfe),
    SolverInfo("dpm_solver_1", 1, 1, False, False, "nfe = steps", _DPM, run=dpm_solver.run_1,
               nfe_of_steps=_one),
    SolverInfo("dpm_solver_2", 2, 2, False, False, "nfe = 2 steps", _DPM, run=dpm_solver.run_2,
               nfe_of_steps=_two),
    SolverInfo("dpm_solver_3", 3, 3, False, False, "nfe = 3 steps", _DPM, run=dpm_solver.run_3,
               nfe_of_steps=_three),
    SolverInfo("dpm_solver_fast", 3, 3, False, False, "any nfe: orders 3,..,3 then 2/1 steps",
               _DPM, note="order 3 for nfe = 2 (mod 3); the final order-1 step of the other "
               "budgets limits the asymptotic order to 2", run=dpm_solver.run_fast, nfe_of_steps=_one,
               grid_steps=lambda k: len(dpm_solver.fast_orders(k))),
    SolverInfo("dpm_solver_pp_2s", 2, 2, False, False, "nfe = 2 steps", _PP,
               run=dpm_solver_pp.run_2s, nfe_of_steps=_two),
    SolverInfo("dpm_solver_pp_2m", 2, 1, False, True, "nfe = steps >= 2", _PP, options=_LOF,
               run=dpm_solver_pp.run_2m, nfe_of_steps=_one, min_steps=2),
    SolverInfo("dpm_solver_pp_3m", 2, 1, False, True, "nfe = steps >= 3", _PP,
               options=_LOF + (("taylor_d2", False),),
               note="the published D2 weight is half its Taylor coefficient, so the method is "
               "second order; taylor_d2=True makes it third order",
               run=dpm_solver_pp.run_3m, nfe_of_steps=_one, min_steps=3),
    SolverInfo("dpm_solver_pp_2m_sde", 1, 1, True, True, "nfe = steps >= 2", _PP, options=_LOF,
               run=dpm_solver_pp.run_2m_sde, nfe_of_steps=_one, min_steps=2),
    SolverInfo("unipc_1", 2, 1, False, True, "nfe = steps", _UNIPC, options=_UNIPC_OPTS,
               run=unipc.make_run(1), nfe_of_steps=_one),
    SolverInfo("unipc_2", 3, 1, False, True, "nfe = steps >= 2", _UNIPC, options=_UNIPC_OPTS,
               run=unipc.make_run(2), nfe_of_steps=_one, min_steps=2),
    SolverInfo("unipc_3", 4, 1, False, True, "nfe = steps >= 3", _UNIPC, options=_UNIPC_OPTS,
               run=unipc.make_run(3), nfe_of_steps=_one, min_steps=3),
    SolverInfo("deis_1", 1, 1, False, True, "nfe = steps", _DEIS, run=deis.make_deis_run(1),
               nfe_of_steps=_one),
    SolverInfo("deis_2", 2, 1, False, True, "nfe = steps >= 2", _DEIS, run=deis.make_deis_run(2),
               nfe_of_steps=_one, min_steps=2),
    SolverInfo("deis_3", 3, 1, False, True, "nfe = steps >= 3", _DEIS, run=deis.make_deis_run(3),
               nfe_of_steps=_one, min_steps=3),
    SolverInfo("pndm", 4, 1, False, True, "nfe = 12 + (steps - 3), steps >= 4 (3 pseudo-RK4 "
               "steps of 4 calls, then 1 call per step)", "Liu et al. 2022 (PNDM)",
               note="fixed coefficients: order 4 on grids uniform in sigma/alpha, 2 on other "
               "smooth grids", run=pndm.run_pndm, nfe_of_steps=_pndm_nfe, min_steps=4),
    SolverInfo("ipndm", 4, 1, False, True, "nfe = steps >= 4", "Zhang & Chen 2023 (iPNDM)",
               note="fixed coefficients: equals lms (order 4) on grids uniform in sigma/alpha, "
               "order 2 on other smooth grids", run=pndm.run_ipndm, nfe_of_steps=_one, min_steps=4),
    SolverInfo("lms", 4, 1, False, True, "nfe = steps >= 4", "k-diffusion (linear multistep)",
               options=(("order", 4),), run=deis.run_lms, nfe_of_steps=_one, min_steps=4),
    SolverInfo("adaptive", 5, 6, False, False, "chosen by rtol/atol (returned with return_nfe)",
               "Tsitouras 2011 (Tsit5) via diffrax",
               options=(("rtol", 1e-4), ("atol", 1e-4), ("method", "tsit5"), ("max_steps", 4096),
                        ("return_nfe", False)), nfe_of_steps=_adaptive_nfe),
]}


LEARNED_PREFIX = "learned:"


def _learned_info(solver: str) -> SolverInfo:
  """solver = "learned:<path>": a multistep solver with fitted coefficients and its own grid
  (learn.py), run from the saved file; not in SOLVERS, which lists the training-free solvers."""
  learned = learn.load(solver[len(LEARNED_PREFIX):]).check(kind="coefficients")
  return SolverInfo(solver, SOLVERS[learned.solver].order, 1, False, True,
                    f"nfe = {learned.nfe}, the file's", "Frankel et al. 2025 (S4S); Shaul et al. "
                    f"2024 (BNS): fitted corrections of {learned.solver}",
                    run=functools.partial(learn.run_learned, coefficients=learned),
                    nfe_of_steps=_one, min_steps=learned.t.size - 1, grid=learned.t)


def _check_solver(solver: str) -> SolverInfo:
  if isinstance(solver, str) and solver.startswith(LEARNED_PREFIX):
    return _learned_info(solver)
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
  nfe = _validate.check_int("nfe", nfe, min=1)
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
  opts = _resolve_options(info, options)
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
