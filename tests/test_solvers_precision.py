"""Solvers: float32 and bfloat16 inputs at NFE 5 on the analytic teacher.

The default run covers one solver per code path (the multistep engine in data form, with a
corrector, in noise form and with noise; the singlestep scan with a tail and with keys; PNDM's
Runge-Kutta start; DPM-Solver-fast's sub-grids; the adaptive ODE solver); the sweep over every
solver is `slow`.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from diffdistill import analytic, schedules, solvers
from solver_testing import mixture, noise

ONE_PER_PATH = ("dpm_solver_pp_2m", "unipc_3", "ipndm", "ddpm", "heun", "edm_stochastic", "pndm",
                "dpm_solver_fast", "adaptive")


def _check_low_precision(names, dtype):
  sch = schedules.VPLinear()
  mix = mixture()
  d = functools.partial(analytic.denoiser(sch), mix)
  x = noise(sch, 16, 8, dtype)
  ref = analytic.flow_map(analytic.denoiser(sch), mix, x.astype(jnp.float32), schedule=sch,
                          t_start=sch.t_max, t_end=sch.t_min, rtol=1e-5, atol=1e-5)
  for name in names:
    if name == "adaptive":
      out = solvers.sample(d, x, schedule=sch, solver=name, nfe=None, rtol=1e-2, atol=1e-2)
    else:
      out = solvers.sample(d, x, schedule=sch, solver=name, nfe=5, allow_nearest_nfe=True,
                           rng=jax.random.key(0))
    assert out.dtype == dtype and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))), name
    if name == "dpm_solver_pp_2m":
      assert float(jnp.sqrt(jnp.mean((out.astype(jnp.float32) - ref) ** 2))) < 0.2


# float32 is every other solver test's dtype: its run here is a slow duplicate
@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow), jnp.bfloat16])
def test_low_precision_runs_without_nan_at_nfe5(dtype):
  _check_low_precision(ONE_PER_PATH, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_every_solver(dtype):
  _check_low_precision(list(solvers.SOLVERS), dtype)
