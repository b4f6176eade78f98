"""The probability-flow ODE shared by analytic.flow_map and the adaptive solver
(diffdistill/_pf_ode.py): low precision from pure noise, an end at sigma = 0, one compilation
for the exact teacher built afresh."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import _pf_ode, analytic, schedules, solvers
from solver_testing import counting


def _gaussian(d=3):
  return analytic.GaussianMixture([1.0], jnp.linspace(-1.0, 1.0, d)[None],
                                  jnp.linspace(0.1, 0.5, d)[None])


# bfloat16 rounds the denoiser's input to 3 digits, and near sigma = 0 that error is divided by
# sigma: a few % of |x| (|x| ~ 2) whatever rtol, as in any solver fed bfloat16.
@pytest.mark.parametrize("dtype, rtol, tol", [(jnp.float32, 1e-4, 2e-3), (jnp.bfloat16, 1e-2, 0.2)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("sch", [schedules.RectifiedFlow(), schedules.TrigFlow(t_max=float(np.pi / 2))],
                         ids=["rectified_flow_from_1", "trigflow_from_pi_over_2"])
def test_adaptive_from_pure_noise_in_low_precision(sch, dtype, rtol, tol):
  # float32(pi/2) > pi/2: cos(theta) < 0 at the start unless clamped (else NaN, then the solver
  # stops at max_steps with an error).
  g = _gaussian()
  x_T = jax.random.normal(jax.random.key(0), (8, 3)).astype(dtype)
  out = solvers.sample(functools.partial(analytic.denoiser(sch), g), x_T, schedule=sch,
                       solver="adaptive", nfe=None, rtol=rtol, atol=rtol, max_steps=256)
  ref = analytic.gaussian_flow_map(g, x_T.astype(jnp.float32), schedule=sch, t_start=sch.t_max,
                                   t_end=sch.t_min)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol)


VP0 = schedules.VPLinear(t_min=0.0)


def test_flow_map_ends_and_starts_at_sigma_zero(x64):
  g = _gaussian()
  x_T = jax.random.normal(jax.random.key(1), (8, 3), jnp.float64)
  exact = analytic.gaussian_flow_map(g, x_T, schedule=VP0, t_start=1.0, t_end=0.0)
  out = analytic.flow_map(analytic.denoiser(VP0), g, x_T, schedule=VP0, t_start=1.0, t_end=0.0,
                          rtol=1e-10, atol=1e-10, max_steps=2000)
  np.testing.assert_allclose(out, exact, rtol=1e-8, atol=1e-8)
  back = analytic.flow_map(analytic.denoiser(VP0), g, exact, schedule=VP0, t_start=0.0,
                           t_end=1.0, rtol=1e-10, atol=1e-10, max_steps=2000)
  np.testing.assert_allclose(back, x_T, rtol=1e-7, atol=1e-7)


def test_adaptive_ends_at_sigma_zero_and_counts_the_last_call(x64):
  g = _gaussian()
  x_T = jax.random.normal(jax.random.key(2), (8, 3), jnp.float64)
  d, count = counting(functools.partial(analytic.denoiser(VP0), g))
  out, nfe = solvers.sample(d, x_T, schedule=VP0, solver="adaptive", nfe=None, t_end=0.0,
                            rtol=1e-9, atol=1e-9, max_steps=2000, return_nfe=True)
  jax.block_until_ready(out)
  assert int(nfe) == count[0]
  exact = analytic.gaussian_flow_map(g, x_T, schedule=VP0, t_start=1.0, t_end=0.0)
  np.testing.assert_allclose(out, exact, rtol=1e-7, atol=1e-7)


def test_exact_denoiser_is_a_value_and_flow_map_compiles_once(monkeypatch):
  sch = schedules.EDM()
  assert analytic.denoiser(sch) == analytic.denoiser(schedules.EDM())
  assert hash(analytic.denoiser(sch)) == hash(analytic.denoiser(schedules.EDM()))
  # flow_map's traced body calls _pf_ode.solve once per trace: a second trace raises.
  monkeypatch.setattr(_pf_ode, "solve", chex.assert_max_traces(_pf_ode.solve, n=1))
  g = analytic.GaussianMixture([1.0], jnp.zeros((1, 7)), jnp.ones((1, 7)))
  x = jnp.ones((5, 7))  # a shape no other test compiles flow_map for
  try:
    for _ in range(3):
      analytic.flow_map(analytic.denoiser(sch), g, x, schedule=sch, t_start=2.0, t_end=1.0,
                        rtol=1e-3, atol=1e-3)
  finally:
    chex.clear_trace_counter()


def test_exact_denoiser_takes_no_conditioning():
  sch = schedules.EDM()
  g = _gaussian()
  x = jnp.ones((2, 3))
  np.testing.assert_allclose(analytic.denoiser(sch)(g, x, jnp.ones(2)),
                             analytic.denoise(g, x, jnp.ones(2), schedule=sch))
  with pytest.raises(ValueError, match="no conditioning.*'label'"):
    analytic.denoiser(sch)(g, x, jnp.ones(2), label=jnp.zeros(2, jnp.int32))
