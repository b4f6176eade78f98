"""Solvers: exact NFE (counted calls of the denoiser) on rectified flow from pure noise
(t_max = 1, alpha = 0), exactness on point-mass data, stochastic samplers against data samples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, metrics, schedules, solvers
from solver_testing import DETERMINISTIC, STOCHASTIC, counting, feasible_nfe, mixture, noise

RF = schedules.RectifiedFlow(t_max=1.0)


@pytest.fixture(scope="module")
def rf_problem():
  mix = mixture()
  x = noise(RF, 8, 8)
  # The reference in float64, far more accurate than the solvers it grades.
  with jax.enable_x64(True):
    ref = analytic.flow_map(analytic.denoiser(RF), mix, x.astype(jnp.float64), schedule=RF,
                            t_start=1.0, t_end=RF.t_min)
  return mix, x, np.asarray(ref, np.float32)


@pytest.mark.parametrize("name", [n for n in solvers.SOLVERS if n != "adaptive"])
def test_nfe_is_exact_and_rectified_flow_from_pure_noise(name, rf_problem):
  mix, x, ref = rf_problem
  nfe = feasible_nfe(name, 20)
  final = name in ("ddim", "heun", "unipc_2", "dpm_solver_fast")
  d, count = counting(functools.partial(analytic.denoiser(RF), mix))
  out = solvers.sample(d, x, schedule=RF, solver=name, nfe=nfe + final, final_denoise=final,
                       rng=jax.random.key(0))
  jax.block_until_ready(out)
  assert count[0] == nfe + final
  assert bool(jnp.all(jnp.isfinite(out)))
  if not final and name not in STOCHASTIC:
    assert float(jnp.sqrt(jnp.mean((out - ref) ** 2))) < 0.12, name


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_exact_on_point_mass_data(name, x64):
  # With point-mass data D(x, t) = mu for every x, t, so the first-order part of every
  # deterministic solver must reproduce the exact flow x_t = alpha_t mu + (sigma_t/sigma_s)
  # (x_s - alpha_s mu) at any step count -- here from alpha = 0 (rectified flow at t = 1).
  mu = np.linspace(-1.0, 1.0, 3)[None]
  mix = analytic.GaussianMixture(np.ones(1), mu, np.full((1,), 1e-14))
  x = noise(RF, 5, 3, jnp.float64)
  exact = analytic.gaussian_flow_map(mix, x, schedule=RF, t_start=1.0, t_end=RF.t_min)
  out = solvers.sample(functools.partial(analytic.denoiser(RF), mix), x, schedule=RF,
                       solver=name, nfe=feasible_nfe(name, 13))
  np.testing.assert_allclose(out, exact, atol=1e-9)


@pytest.fixture(scope="module")
def ring_problem():
  mix = analytic.ring2d()
  data = analytic.sample(mix, jax.random.key(7), 1000)
  exact_sw = float(metrics.sliced_wasserstein(analytic.sample(mix, jax.random.key(8), 1000), data))
  return mix, data, exact_sw


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_solvers_sample_the_data_distribution(name, ring_problem):
  mix, data, exact_sw = ring_problem
  sch = schedules.VPLinear()
  d = functools.partial(analytic.denoiser(sch), mix)
  x = noise(sch, 1000, 2)
  out = solvers.sample(d, x, schedule=sch, solver=name, nfe=feasible_nfe(name, 50),
                       rng=jax.random.key(3))
  sw = float(metrics.sliced_wasserstein(out, data))
  assert sw < 3.0 * exact_sw + 0.02, (name, sw, exact_sw)
