"""Training-free samplers: one file per family; `sample`, `SOLVERS`, `time_grid`.

Every public single step (`ddim_step`, `ddim_eta_step`, `euler_maruyama_step`, `euler_step`,
`heun_step`, `edm_stochastic_step`, `dpm_solver_{1,2,3}_step`, `dpm_solver_pp_{2s,2m,3m}_step`,
`pndm_prk_step`) has one signature,

    x_t = step(denoise, x_s, t_s, t_t, *, schedule, rng=None, **options)

with denoise(x, t) -> x0_hat, x: [B, ...], t_s, t_t scalars or [B] (traced is fine). It returns
only the new state. Stochastic steps need rng (ValueError without it); deterministic ones accept
rng=None and ignore it. Multistep steps take their history as options (d_prev, t_prev) and
accept d_s = D(x_s, t_s) when the caller already has it (the next step's d_prev), so a chain of
them costs one call per step. Each step equals its solver's engine in `sample` on the same grid
(tests/test_solvers_steps.py).

See docs/solvers.md for each family's update equation, its paper and what the tests verify.

`solvers.sample` (also `from diffdistill.solvers import sample`) is the sampling function; its
module is `diffdistill.solvers.sampling` (named apart, so that no import of the name `sample`
can mean the module).
"""

from diffdistill.solvers.adaptive import adaptive_sample
from diffdistill.solvers.ddim import ddim_eta_step, ddim_step, euler_maruyama_step
from diffdistill.solvers.dpm_solver_pp import (dpm_solver_pp_2m_step, dpm_solver_pp_2s_step,
                                               dpm_solver_pp_3m_step)
from diffdistill.solvers.dpm_solver import dpm_solver_1_step, dpm_solver_2_step, dpm_solver_3_step
from diffdistill.solvers.grids import SPACINGS, time_grid
from diffdistill.solvers.learn import fit as fit_learned, learn_grid, load_grid
from diffdistill.solvers.heun import edm_stochastic_step, euler_step, heun_step
from diffdistill.solvers.pndm import pndm_prk_step
from diffdistill.solvers.thresholding import dynamic_thresholding
from diffdistill.solvers.sampling import SOLVERS, SolverInfo, make_sampler, sample, steps_for_nfe

__all__ = ["sample", "make_sampler", "steps_for_nfe", "SOLVERS", "SolverInfo", "time_grid",
           "SPACINGS", "ddim_step", "ddim_eta_step", "euler_maruyama_step", "euler_step",
           "heun_step", "edm_stochastic_step", "dpm_solver_pp_2s_step", "dpm_solver_pp_2m_step",
           "dpm_solver_pp_3m_step", "dpm_solver_1_step", "dpm_solver_2_step",
           "dpm_solver_3_step", "pndm_prk_step", "adaptive_sample", "dynamic_thresholding", "learn_grid", "load_grid",
           "fit_learned"]
