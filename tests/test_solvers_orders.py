"""Empirical order of every deterministic solver against analytic.flow_map (float64).

The slope of log error against log NFE between two budgets in the small-step regime must lie
within 0.4 of SOLVERS[name].order. The problem: an 8-D, K = 4 mixture under VP-linear from
t = 1 (where lambda is about -10 and the denoiser hardly depends on x, so the lower-order
warm-up steps of the multistep methods cost O(h^{p+1}) in practice) to t = 0.3, uniform in
logSNR. pndm/ipndm/lms use fixed AB coefficients that assume steps uniform in sigma/alpha:
PNDM is checked on such a grid (EDM, sigma 80 -> 20), and iPNDM is checked to be the
variable-step LMS there. The large sweep over schedules and budgets is
experiments/solver_orders (and the `slow` test below).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, schedules, solvers
from solver_testing import DETERMINISTIC, mixture

VP = schedules.VPLinear()
T_END = 0.3
BUDGETS = (64, 128)
ON_RHO_UNIFORM_GRIDS = ("pndm", "ipndm")


def _problem(sch, t_start, t_end, n=16):
  mix = mixture()
  x0 = analytic.sample(mix, jax.random.key(0), n)
  x = sch.alpha(t_start) * x0 + sch.sigma(t_start) * jax.random.normal(jax.random.key(1), x0.shape,
                                                                       jnp.float64)
  ref = analytic.flow_map(analytic.denoiser(sch), mix, x, schedule=sch, t_start=t_start,
                          t_end=t_end, rtol=1e-12, atol=1e-12)
  return functools.partial(analytic.denoiser(sch), mix), x, ref


def _slope(name, d, x, ref, sch, t_start, t_end, budgets, spacing="logsnr", **opts):
  errs, used = [], []
  for b in budgets:
    _, nfe = solvers.steps_for_nfe(name, b, allow_nearest_nfe=True, **opts)
    out = solvers.sample(d, x, schedule=sch, solver=name, nfe=nfe, spacing=spacing,
                         t_start=t_start, t_end=t_end, **opts)
    errs.append(float(jnp.sqrt(jnp.mean((out - ref) ** 2))))
    used.append(nfe)
  return -np.log(errs[1] / errs[0]) / np.log(used[1] / used[0]), errs


@pytest.fixture(scope="module")
def vp_problem():
  with jax.enable_x64(True):  # the reference is computed once for the module
    return _problem(VP, 1.0, T_END)


@pytest.mark.parametrize("name", [n for n in DETERMINISTIC if n not in ON_RHO_UNIFORM_GRIDS])
def test_empirical_order(name, vp_problem, x64):
  d, x, ref = vp_problem
  budgets = (65, 128) if name == "dpm_solver_fast" else BUDGETS  # = 2 mod 3: final order-2 step
  slope, errs = _slope(name, d, x, ref, VP, 1.0, T_END, budgets)
  assert abs(slope - solvers.SOLVERS[name].order) < 0.4, (name, slope, errs)


def test_dpm_solver_pp_3m_published_vs_taylor_weight(vp_problem, x64):
  # The published D2 weight makes 3M second order; the Taylor weight makes it third order.
  d, x, ref = vp_problem
  slope, _ = _slope("dpm_solver_pp_3m", d, x, ref, VP, 1.0, T_END, BUDGETS, taylor_d2=True)
  assert abs(slope - 3.0) < 0.4, slope


def test_pndm_order_four_and_ipndm_is_lms_on_uniform_sigma_grids(x64):
  edm = schedules.EDM()  # t = sigma = sigma / alpha: time_uniform is uniform in sigma/alpha
  d, x, ref = _problem(edm, 80.0, 20.0)
  slope, errs = _slope("pndm", d, x, ref, edm, 80.0, 20.0, (33, 65), spacing="time_uniform")
  assert abs(slope - 4.0) < 0.4, (slope, errs)
  kw = dict(schedule=edm, nfe=16, spacing="time_uniform", t_start=80.0, t_end=20.0)
  np.testing.assert_allclose(solvers.sample(d, x, solver="ipndm", **kw),
                             solvers.sample(d, x, solver="lms", **kw), rtol=1e-10, atol=1e-12)


def test_first_order_exponential_integrator_is_exact_for_linear_in_lambda_data(x64):
  # If D(x_lambda, lambda) is constant the DDIM step is the exact exponential integrator; with
  # the analytic mixture this holds at lambda -> -inf (pure noise): one step from t = 1 on
  # rectified flow to t = 0.999 matches the flow map to O(alpha^2).
  rf = schedules.RectifiedFlow()
  d, x, _ = _problem(rf, 1.0, 0.999)
  ref = analytic.flow_map(analytic.denoiser(rf), mixture(), x, schedule=rf, t_start=1.0,
                          t_end=0.999, rtol=1e-12, atol=1e-12)
  out = solvers.sample(d, x, schedule=rf, solver="ddim", nfe=1, t_start=1.0, t_end=0.999)
  assert float(jnp.max(jnp.abs(out - ref))) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("sch", [schedules.VPCosine(), schedules.EDM(), schedules.RectifiedFlow(0.001, 0.999)],
                         ids=lambda s: s.name)
def test_empirical_order_other_schedules(sch, x64):
  t_start = sch.t_max
  t_end = float(sch.t_from_logsnr(jnp.asarray(float(VP.logsnr(T_END)))))
  d, x, ref = _problem(sch, t_start, t_end)
  for name in DETERMINISTIC:
    if name in ON_RHO_UNIFORM_GRIDS:
      continue
    budgets = (131, 257) if name == "dpm_solver_fast" else (128, 256)
    slope, errs = _slope(name, d, x, ref, sch, t_start, t_end, budgets)
    assert abs(slope - solvers.SOLVERS[name].order) < 0.4, (sch.name, name, slope, errs)
