"""Solvers: API, every schedule, traces, bad input, thresholding, adaptive. Orders are in
test_solvers_orders.py, exact NFE in test_solvers_nfe.py, the public single steps against the
engine in test_solvers_steps.py, the shared PF-ODE in test_solvers_pf_ode.py."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, parametrization, schedules, solvers
from diffdistill.solvers import grids
from solver_testing import ALL_SCHEDULES, STOCHASTIC, counting, feasible_nfe, mixture, noise


def test_registry_records_order_evals_stochasticity():
  assert set(solvers.SOLVERS) == {
      "ddim", "ddim_eta", "ddpm", "euler", "euler_maruyama", "heun", "edm_stochastic",
      "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpm_solver_fast", "dpm_solver_pp_2s",
      "dpm_solver_pp_2m", "dpm_solver_pp_3m", "dpm_solver_pp_2m_sde", "unipc_1", "unipc_2",
      "unipc_3", "deis_1", "deis_2", "deis_3", "pndm", "ipndm", "lms", "adaptive"}
  s = solvers.SOLVERS
  assert (s["heun"].evals_per_step, s["dpm_solver_3"].evals_per_step, s["unipc_2"].evals_per_step) == (2, 3, 1)
  assert s["unipc_2"].order == 3 and s["deis_3"].order == 3 and s["lms"].order == 4
  assert set(STOCHASTIC) == {"ddim_eta", "ddpm", "euler_maruyama", "edm_stochastic",
                             "dpm_solver_pp_2m_sde"}


@pytest.mark.parametrize("sch", ALL_SCHEDULES, ids=lambda s: f"{s.name}_{s.t_max:.3g}")
def test_every_schedule_converges_on_gaussian_data(sch, x64):
  # Single-Gaussian data: the flow map is the closed form analytic.gaussian_flow_map.
  rng = np.random.default_rng(3)
  mix = analytic.GaussianMixture(np.ones(1), 0.3 * rng.standard_normal((1, 4)),
                                 np.exp(rng.uniform(-2, 0, (1, 4))))
  x = noise(sch, 16, 4, jnp.float64)
  exact = analytic.gaussian_flow_map(mix, x, schedule=sch, t_start=sch.t_max, t_end=sch.t_min)
  d = functools.partial(analytic.denoiser(sch), mix)
  for name, tol in (("dpm_solver_pp_2m", 1e-2),):
    errs = [float(jnp.max(jnp.abs(solvers.sample(d, x, schedule=sch, solver=name,
                                                 nfe=feasible_nfe(name, n)) - exact)))
            for n in (20, 40)]
    # Second order: doubling the NFE divides the error by ~4.
    assert errs[1] < errs[0] / 3 and errs[1] < tol, (name, errs)


def test_singlestep_scan_matches_public_steps(x64):
  sch = schedules.EDM()
  mix = mixture()
  d = functools.partial(analytic.denoiser(sch), mix)
  x = noise(sch, 6, 8, jnp.float64)
  t = solvers.time_grid(sch, 5, spacing="karras")
  y = x
  for i in range(4):
    y = solvers.heun_step(d, y, t[i], t[i + 1], schedule=sch)
  y = solvers.euler_step(d, y, t[4], t[5], schedule=sch)
  np.testing.assert_allclose(solvers.sample(d, x, schedule=sch, solver="heun", nfe=9,
                                            spacing="karras"), y, rtol=1e-10)
  y = x
  for i in range(5):
    y = solvers.dpm_solver_2_step(d, y, t[i], t[i + 1], schedule=sch)
  np.testing.assert_allclose(solvers.sample(d, x, schedule=sch, solver="dpm_solver_2", nfe=10,
                                            spacing="karras"), y, rtol=1e-10)


def test_one_trace_per_configuration_and_params_are_arguments():
  sch = schedules.VPLinear()
  traces = [0]

  def apply(mix, x, t):
    traces[0] += 1
    return analytic.denoise(mix, x, t, schedule=sch)

  x = noise(sch, 4, 8)
  for nfe in (6, 30):
    traces[0] = 0
    run = solvers.make_sampler(apply, schedule=sch, solver="unipc_3", nfe=nfe)
    run(mixture(seed=0), x).block_until_ready()
    first = traces[0]
    run(mixture(seed=5), x).block_until_ready()  # new params: no retrace
    assert traces[0] == first == 1, (nfe, traces[0])  # one call site in the scan body
  traces[0] = 0
  solvers.make_sampler(apply, schedule=sch, solver="heun", nfe=39)(mixture(), x)
  assert traces[0] == 3  # the two Heun calls in the scan body + the final Euler step


def test_bad_input_errors():
  sch = schedules.VPLinear()
  d = functools.partial(analytic.denoiser(sch), mixture())
  x = noise(sch, 4, 8)
  with pytest.raises(ValueError, match="Unknown solver 'dpm'.*ddim"):
    solvers.sample(d, x, schedule=sch, solver="dpm", nfe=10)
  with pytest.raises(ValueError, match="Unknown spacing 'cosine'.*logsnr"):
    solvers.sample(d, x, schedule=sch, solver="ddim", nfe=10, spacing="cosine")
  with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
    solvers.sample(d, x, schedule=sch, solver="ddim", nfe=0)
  with pytest.raises(ValueError, match="exactly nfe=9.*allow_nearest_nfe"):
    solvers.sample(d, x, schedule=sch, solver="dpm_solver_pp_2s", nfe=9)
  with pytest.raises(ValueError, match="exactly nfe=10"):
    solvers.sample(d, x, schedule=sch, solver="heun", nfe=10)
  with pytest.raises(ValueError, match="exactly nfe=2"):
    solvers.sample(d, x, schedule=sch, solver="dpm_solver_pp_3m", nfe=2)
  with pytest.raises(ValueError, match="exactly nfe=12"):
    solvers.sample(d, x, schedule=sch, solver="pndm", nfe=12)
  with pytest.raises(ValueError, match="t_start > t_end"):
    solvers.sample(d, x, schedule=sch, solver="ddim", nfe=10, t_start=0.5, t_end=0.5)
  with pytest.raises(ValueError, match="strictly decreasing"):
    solvers.sample(d, x, schedule=sch, solver="ddim", nfe=3, spacing=[1.0, 0.5, 0.6, 0.1])
  with pytest.raises(ValueError, match="user grid has 3 steps"):
    solvers.sample(d, x, schedule=sch, solver="ddim", nfe=4, spacing=[1.0, 0.5, 0.2, 0.1])
  with pytest.raises(ValueError, match="batch axis"):
    solvers.sample(d, x[0, 0], schedule=sch, solver="ddim", nfe=4)
  with pytest.raises(ValueError, match="t_start must be a concrete scalar"):
    solvers.sample(d, x, schedule=sch, solver="ddim", nfe=4, t_start=jnp.ones(4))
  with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B\]"):
    solvers.ddim_step(d, x, jnp.ones((4, 1)), 0.5, schedule=sch)
  with pytest.raises(ValueError, match="stochastic: pass rng"):
    solvers.sample(d, x, schedule=sch, solver="ddpm", nfe=4)
  with pytest.raises(ValueError, match="Unknown option.*'eta'.*accepts"):
    solvers.sample(d, x, schedule=sch, solver="ddim", nfe=4, eta=0.3)
  with pytest.raises(ValueError, match="nfe=None"):
    solvers.sample(d, x, schedule=sch, solver="adaptive", nfe=10)
  with pytest.raises(ValueError, match="t_min <= t_end < t_start <= t_max"):
    solvers.sample(d, x, schedule=sch, solver="ddim", nfe=4, t_start=2.0)


def test_allow_nearest_nfe_and_steps_for_nfe():
  assert solvers.steps_for_nfe("heun", 10, allow_nearest_nfe=True) == (5, 9)
  assert solvers.steps_for_nfe("dpm_solver_3", 10, allow_nearest_nfe=True) == (3, 9)
  assert solvers.steps_for_nfe("pndm", 5, allow_nearest_nfe=True) == (4, 13)
  assert solvers.steps_for_nfe("heun", 10, final_denoise=True) == (5, 10)
  assert solvers.steps_for_nfe("heun", 10, final_euler=False) == (5, 10)
  assert solvers.steps_for_nfe("dpm_solver_fast", 10) == (10, 10)


def test_time_grids():
  sch = schedules.VPLinear()
  for spacing in solvers.SPACINGS:
    t = solvers.time_grid(sch, 7, spacing=spacing)
    assert t.shape == (8,) and t[0] == sch.t_max and t[-1] == sch.t_min and np.all(np.diff(t) < 0)
  lam = np.asarray(sch.logsnr(jnp.asarray(solvers.time_grid(sch, 7, spacing="logsnr"))))
  np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-4)
  edm = schedules.EDM()
  t = solvers.time_grid(edm, 4, spacing="karras", rho=7.0)
  ref = (80.0 ** (1 / 7) + np.arange(5) / 4 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
  np.testing.assert_allclose(t, ref, rtol=1e-5)
  t = solvers.time_grid(schedules.RectifiedFlow(), 5, spacing="logsnr")
  assert t[0] == 1.0 and np.all(np.diff(t) < 0)


def test_dynamic_thresholding():  # data_max != 1: test_solvers_steps.py
  x0 = jnp.array([[0.5, -3.0, 2.0, 0.1], [0.2, 0.3, -0.4, 0.5]])
  out = solvers.dynamic_thresholding(lambda x, t: x, percentile=1.0)(x0, None)
  np.testing.assert_allclose(out[0], x0[0] / 3.0, rtol=1e-6)  # s = max|x0| = 3
  np.testing.assert_allclose(out[1], x0[1], rtol=1e-6)  # s = max(0.5, 1) = 1: unchanged
  with pytest.raises(ValueError, match="percentile"):
    solvers.dynamic_thresholding(lambda x, t: x, percentile=0.0)


def test_guidance_goes_through_guided_combinator():
  sch = schedules.VPLinear()
  mixes = [mixture(seed=0), mixture(seed=1)]

  def apply(params, x, t, label):
    outs = jnp.stack([analytic.denoise(m, x, t, schedule=sch) for m in params])
    return jnp.take_along_axis(outs, label[None, :, None], axis=0)[0]

  guided = parametrization.guided(apply, 1.0, null_cond={"label": 1})
  label = jnp.zeros((4,), jnp.int32)
  d = lambda x, t: guided(mixes, x, t, label=label)
  x = noise(sch, 4, 8)
  out = solvers.sample(d, x, schedule=sch, solver="dpm_solver_pp_2m", nfe=10)
  ref = solvers.sample(functools.partial(analytic.denoiser(sch), mixes[0]), x, schedule=sch,
                       solver="dpm_solver_pp_2m", nfe=10)
  np.testing.assert_allclose(out, ref, atol=1e-5)  # w = 1 is the conditional denoiser


def test_adaptive_reports_nfe_and_matches_reference(x64):
  sch = schedules.RectifiedFlow()
  mix = mixture()
  d, count = counting(functools.partial(analytic.denoiser(sch), mix))
  x = noise(sch, 8, 8, jnp.float64)
  out, nfe = solvers.sample(d, x, schedule=sch, solver="adaptive", nfe=None, rtol=1e-8,
                            atol=1e-8, return_nfe=True)
  jax.block_until_ready(out)
  assert int(nfe) == count[0] > 20
  ref = analytic.flow_map(analytic.denoiser(sch), mix, x, schedule=sch, t_start=1.0,
                          t_end=sch.t_min, rtol=1e-11, atol=1e-11)
  np.testing.assert_allclose(out, ref, atol=1e-6)


# One solver per code path of a last step into sigma = 0 by default: the data-form step orders
# (dpm_solver_pp_3m), the corrector (unipc_3), the singlestep tail (heun), the noise-form plan
# (deis_3; lms shares it) and PNDM's fixed coefficients; dpm_solver_3 takes heun's path.
SIGMA_ZERO_SOLVERS = ["dpm_solver_pp_3m", "unipc_3", "heun", "deis_3", "pndm",
                      pytest.param("dpm_solver_3", marks=pytest.mark.slow),
                      pytest.param("lms", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", SIGMA_ZERO_SOLVERS)
def test_final_step_to_sigma_zero_is_first_order_and_finite(name):
  # t_end = 0 on VP-linear: sigma = 0 and lambda = +inf at the last grid point. No solver may
  # evaluate a higher-order formula there; the result is the data prediction x0.
  sch = schedules.VPLinear(t_min=0.0)
  d = functools.partial(analytic.denoiser(sch), mixture())
  x = noise(sch, 8, 8)
  nfe = feasible_nfe(name, 15)
  out = solvers.sample(d, x, schedule=sch, solver=name, nfe=nfe, t_end=0.0)
  near = solvers.sample(d, x, schedule=sch, solver=name, nfe=nfe, t_end=1e-4)
  assert bool(jnp.all(jnp.isfinite(out))), name
  assert float(jnp.max(jnp.abs(out - near))) < 0.25, name  # different grids, same limit


def test_sample_is_the_function_and_its_module_is_sampling():
  # before: the module was solvers/sample.py, so `import diffdistill.solvers.sample as m` gave
  # the function (the package attribute shadows the submodule) and the module had no name
  from diffdistill.solvers import sample  # noqa: PLC0415 (the import is what is tested)
  module = importlib.import_module("diffdistill.solvers.sampling")
  assert sample is solvers.sample is module.sample and callable(sample)
  with pytest.raises(ModuleNotFoundError):
    importlib.import_module("diffdistill.solvers.sample")


def test_host_grids_are_float64_without_x64():
  # before: computed in float32 and cast (alpha off by 3e-7 relative on VP-linear)
  s = schedules.VPLinear()
  t = np.linspace(s.t_min, s.t_max, 11)
  m = s.beta_min * t + 0.5 * (s.beta_max - s.beta_min) * t * t
  g = grids.host_grid(s, t)
  assert not jax.config.jax_enable_x64 and g.alpha.dtype == np.float64
  np.testing.assert_allclose(g.alpha, np.exp(-0.5 * m), rtol=1e-13)
  np.testing.assert_allclose(g.lam, 0.5 * (-m - np.log(-np.expm1(-m))), rtol=1e-12)
