"""Training-free samplers: one file per family; `sample`, `SOLVERS`, `time_grid`.

See docs/solvers.md for each family's update equation, its paper and what the tests verify.
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
from diffdistill.solvers.sample import SOLVERS, SolverInfo, make_sampler, sample, steps_for_nfe

__all__ = ["sample", "make_sampler", "steps_for_nfe", "SOLVERS", "SolverInfo", "time_grid",
           "SPACINGS", "ddim_step", "ddim_eta_step", "euler_maruyama_step", "euler_step",
           "heun_step", "edm_stochastic_step", "dpm_solver_pp_2s_step", "dpm_solver_pp_2m_step",
           "dpm_solver_pp_3m_step", "dpm_solver_1_step", "dpm_solver_2_step",
           "dpm_solver_3_step", "pndm_prk_step", "adaptive_sample", "dynamic_thresholding", "learn_grid", "load_grid",
           "fit_learned"]
