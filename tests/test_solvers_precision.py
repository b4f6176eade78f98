"""Solvers: float32 and bfloat16 inputs at NFE 5 on the analytic teacher."""

import functools

import jax
import jax.numpy as jnp
import pytest

from diffdistill import analytic, schedules, solvers
from solver_testing import mixture, noise


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_runs_without_nan_at_nfe5(dtype):
  sch = schedules.VPLinear()
  mix = mixture()
  d = functools.partial(analytic.denoiser(sch), mix)
  x = noise(sch, 16, 8, dtype)
  ref = analytic.flow_map(analytic.denoiser(sch), mix, x.astype(jnp.float32), schedule=sch,
                          t_start=sch.t_max, t_end=sch.t_min, rtol=1e-5, atol=1e-5)
  for name in solvers.SOLVERS:
    if name == "adaptive":
      out = solvers.sample(d, x, schedule=sch, solver=name, nfe=None, rtol=1e-2, atol=1e-2)
    else:
      out = solvers.sample(d, x, schedule=sch, solver=name, nfe=5, allow_nearest_nfe=True,
                           rng=jax.random.key(0))
    assert out.dtype == dtype and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))), name
    if name == "dpm_solver_pp_2m":
      assert float(jnp.sqrt(jnp.mean((out.astype(jnp.float32) - ref) ** 2))) < 0.2


