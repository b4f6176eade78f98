"""Traceable coefficients, learned grids and coefficients, and Analytic-DPM variances."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, schedules, solvers
from diffdistill.solvers import grids, traceable


def _rows(plan):
  out = [plan.a, plan.b, plan.g, plan.noise]
  out += list(plan.corrector) if plan.corrector is not None else [None] * 3
  return out


@pytest.mark.parametrize("schedule_name,n,spacing,jit", [
    ("vp_linear", 10, "karras", True), ("vp_linear", 4, "time_uniform", False),
    ("rectified_flow", 10, "logsnr", False), ("edm", 10, "time_uniform", False)])
def test_traced_plans_equal_host_plans(x64, schedule_name, n, spacing, jit):
  """Every traceable solver's rows from a jnp grid equal the host float64 rows, to float64
  rounding relative to each array's scale (rectified flow starts at alpha = 0; the EDM
  time-uniform grid makes UniPC's node matrices ill-conditioned: ~1e-13 there). One case runs
  under jit (what learn_grid does), the others op by op (the same jnp functions, cheaper)."""
  sch = schedules.get(schedule_name)
  t = grids.time_grid(sch, n, spacing=spacing)
  hg = grids.host_grid(sch, t)
  ends = (hg.starts_at_pure_noise, hg.ends_at_clean_data)
  names = ["dpm_solver_pp_2m", "unipc_3"] if jit else list(traceable.TRACEABLE)
  rows = lambda tt: {name: _rows(traceable.TRACEABLE[name].traced(
      traceable.trace_grid(sch, tt, ends=ends))) for name in names}
  traced = (jax.jit(rows) if jit else rows)(jnp.asarray(t))
  for solver in names:
    entry = traceable.TRACEABLE[solver]
    for h, tr in zip(_rows(entry.host(hg)), traced[solver]):
      assert (h is None) == (tr is None), solver
      if h is None:
        continue
      tr = np.asarray(tr)
      assert tr.dtype == np.float64 and tr.shape == h.shape, solver
      np.testing.assert_allclose(tr, h, rtol=0, atol=1e-12 * np.max(np.abs(h)), err_msg=solver)


def test_sample_on_times_equals_sample_and_has_finite_time_gradients(x64):
  """The traced sampler equals `sample` on the same grid; its gradient in the interior times
  is finite and nonzero (and zero for nothing but the fixed ends)."""
  sch = schedules.VPLinear()
  mix = analytic.ring2d()
  denoise = functools.partial(analytic.denoiser(sch), mix)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (32, 2), jnp.float64)
  t = grids.time_grid(sch, 6, spacing="karras")
  for solver in ("unipc_2",):
    ref = solvers.sample(denoise, x_T, schedule=sch, solver=solver, nfe=6, spacing=t)
    got = traceable.sample_on_times(denoise, x_T, jnp.asarray(t), schedule=sch, solver=solver)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-12)
    grad = jax.grad(lambda tt: jnp.sum(traceable.sample_on_times(
        denoise, x_T, tt, schedule=sch, solver=solver, ends=(False, False)) ** 2))(jnp.asarray(t))
    assert np.all(np.isfinite(grad)) and np.all(np.abs(grad[1:-1]) > 0), (solver, grad)
