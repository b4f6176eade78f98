"""The registry of training-free solvers, `SOLVERS`: each one's order, NFE rule, options and run.

Kept apart from `sampling` (the `sample` entry point) so that `learn`, which fits grids of these
solvers, and `sampling`, which runs learned ones, both import it without importing each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from diffdistill import _validate
from diffdistill.solvers import ddim
from diffdistill.solvers import deis
from diffdistill.solvers import dpm_solver
from diffdistill.solvers import dpm_solver_pp
from diffdistill.solvers import heun
from diffdistill.solvers import pndm
from diffdistill.solvers import unipc


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


def one_call_per_step(n, o):  # nfe = steps
  del o
  return n
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
               nfe_of_steps=one_call_per_step),
    SolverInfo("ddim_eta", 1, 1, True, False, "nfe = steps", _DDIM, options=(("eta", 0.5),),
               run=ddim.run_ddim_eta, nfe_of_steps=one_call_per_step),
    SolverInfo("ddpm", 1, 1, True, False, "nfe = steps", "Ho et al. 2020 (DDPM ancestral)",
               run=ddim.run_ddpm, nfe_of_steps=one_call_per_step),
    SolverInfo("euler", 1, 1, False, False, "nfe = steps",
               "Karras et al. 2022 (Euler in sigma/alpha; the DDIM map)", run=ddim.run_ddim,
               nfe_of_steps=one_call_per_step),
    SolverInfo("euler_maruyama", 1, 1, True, False, "nfe = steps",
               "Song et al. 2021 (reverse SDE)", run=ddim.run_euler_maruyama, nfe_of_steps=one_call_per_step),
    SolverInfo("heun", 2, 2, False, False, "nfe = 2 steps - 1 (final Euler step); 2 steps with "
               "final_euler=False", _EDM, options=(("final_euler", True),), run=heun.run_heun,
               nfe_of_steps=_heun_nfe),
    SolverInfo("edm_stochastic", 2, 2, True, False, "nfe = 2 steps - 1 (final Euler step)", _EDM,
               options=_CHURN, run=heun.run_edm_stochastic, nfe_of_steps=_heun_nfe),
    SolverInfo("dpm_solver_1", 1, 1, False, False, "nfe = steps", _DPM, run=dpm_solver.run_1,
               nfe_of_steps=one_call_per_step),
    SolverInfo("dpm_solver_2", 2, 2, False, False, "nfe = 2 steps", _DPM, run=dpm_solver.run_2,
               nfe_of_steps=_two),
    SolverInfo("dpm_solver_3", 3, 3, False, False, "nfe = 3 steps", _DPM, run=dpm_solver.run_3,
               nfe_of_steps=_three),
    SolverInfo("dpm_solver_fast", 3, 3, False, False, "any nfe: orders 3,..,3 then 2/1 steps",
               _DPM, note="order 3 for nfe = 2 (mod 3); the final order-1 step of the other "
               "budgets limits the asymptotic order to 2", run=dpm_solver.run_fast, nfe_of_steps=one_call_per_step,
               grid_steps=lambda k: len(dpm_solver.fast_orders(k))),
    SolverInfo("dpm_solver_pp_2s", 2, 2, False, False, "nfe = 2 steps", _PP,
               run=dpm_solver_pp.run_2s, nfe_of_steps=_two),
    SolverInfo("dpm_solver_pp_2m", 2, 1, False, True, "nfe = steps >= 2", _PP, options=_LOF,
               run=dpm_solver_pp.run_2m, nfe_of_steps=one_call_per_step, min_steps=2),
    SolverInfo("dpm_solver_pp_3m", 2, 1, False, True, "nfe = steps >= 3", _PP,
               options=_LOF + (("taylor_d2", False),),
               note="the published D2 weight is half its Taylor coefficient, so the method is "
               "second order; taylor_d2=True makes it third order",
               run=dpm_solver_pp.run_3m, nfe_of_steps=one_call_per_step, min_steps=3),
    SolverInfo("dpm_solver_pp_2m_sde", 1, 1, True, True, "nfe = steps >= 2", _PP, options=_LOF,
               run=dpm_solver_pp.run_2m_sde, nfe_of_steps=one_call_per_step, min_steps=2),
    SolverInfo("unipc_1", 2, 1, False, True, "nfe = steps", _UNIPC, options=_UNIPC_OPTS,
               run=unipc.make_run(1), nfe_of_steps=one_call_per_step),
    SolverInfo("unipc_2", 3, 1, False, True, "nfe = steps >= 2", _UNIPC, options=_UNIPC_OPTS,
               run=unipc.make_run(2), nfe_of_steps=one_call_per_step, min_steps=2),
    SolverInfo("unipc_3", 4, 1, False, True, "nfe = steps >= 3", _UNIPC, options=_UNIPC_OPTS,
               run=unipc.make_run(3), nfe_of_steps=one_call_per_step, min_steps=3),
    SolverInfo("deis_1", 1, 1, False, True, "nfe = steps", _DEIS, run=deis.make_deis_run(1),
               nfe_of_steps=one_call_per_step),
    SolverInfo("deis_2", 2, 1, False, True, "nfe = steps >= 2", _DEIS, run=deis.make_deis_run(2),
               nfe_of_steps=one_call_per_step, min_steps=2),
    SolverInfo("deis_3", 3, 1, False, True, "nfe = steps >= 3", _DEIS, run=deis.make_deis_run(3),
               nfe_of_steps=one_call_per_step, min_steps=3),
    SolverInfo("pndm", 4, 1, False, True, "nfe = 12 + (steps - 3), steps >= 4 (3 pseudo-RK4 "
               "steps of 4 calls, then 1 call per step)", "Liu et al. 2022 (PNDM)",
               note="fixed coefficients: order 4 on grids uniform in sigma/alpha, 2 on other "
               "smooth grids", run=pndm.run_pndm, nfe_of_steps=_pndm_nfe, min_steps=4),
    SolverInfo("ipndm", 4, 1, False, True, "nfe = steps >= 4", "Zhang & Chen 2023 (iPNDM)",
               note="fixed coefficients: equals lms (order 4) on grids uniform in sigma/alpha, "
               "order 2 on other smooth grids", run=pndm.run_ipndm, nfe_of_steps=one_call_per_step, min_steps=4),
    SolverInfo("lms", 4, 1, False, True, "nfe = steps >= 4", "k-diffusion (linear multistep)",
               options=(("order", 4),), run=deis.run_lms, nfe_of_steps=one_call_per_step, min_steps=4),
    SolverInfo("adaptive", 5, 6, False, False, "chosen by rtol/atol (returned with return_nfe)",
               "Tsitouras 2011 (Tsit5) via diffrax",
               options=(("rtol", 1e-4), ("atol", 1e-4), ("method", "tsit5"), ("max_steps", 4096),
                        ("return_nfe", False)), nfe_of_steps=_adaptive_nfe),
]}


def resolve_options(info: SolverInfo, options: dict) -> dict:
  allowed = dict(info.options)
  unknown = set(options) - set(allowed)
  if unknown:
    raise ValueError(f"Unknown option(s) {sorted(unknown)} for solver {info.name!r}; it accepts "
                     f"{sorted(allowed) or 'none'}.")
  return {**allowed, **options}


def steps_for(info: SolverInfo, nfe: int, *, final_denoise: bool = False,
              allow_nearest_nfe: bool = False, **options) -> tuple[int, int]:
  """(num_steps, actual_nfe) of the solver `info` for an NFE budget; ValueError if infeasible and
  not allow_nearest_nfe (`sampling.steps_for_nfe` takes the solver by name)."""
  solver = info.name
  opts = resolve_options(info, options)
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


__all__ = ["SolverInfo", "SOLVERS", "resolve_options", "steps_for", "one_call_per_step"]
