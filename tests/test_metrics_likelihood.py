"""PF-ODE likelihood against the analytic mixtures' exact log-densities (analytic.log_prob)."""

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from diffdistill import analytic, metrics, schedules


def _mix64(mix):
  return jax.tree.map(lambda a: a.astype(jnp.float64)
                      if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a, mix)


def _setup(schedule, *, dim, n, seed=0):
  mix = _mix64(analytic.mixture64(dim=dim, num_components=4, seed=seed))
  x0 = analytic.sample(mix, jax.random.key(seed), n, jnp.float64)
  t = jnp.float64(schedule.t_min)
  x = schedule.alpha(t) * x0 + schedule.sigma(t) * jax.random.normal(jax.random.key(seed + 1),
                                                                      x0.shape, jnp.float64)
  denoise = lambda x, t: analytic.denoise(mix, x, t, schedule=schedule)
  exact = -analytic.log_prob(mix, x, schedule.t_min, schedule=schedule)
  prior = lambda x_T: analytic.log_prob(mix, x_T, schedule.t_max, schedule=schedule)
  return x, denoise, exact, prior


# RectifiedFlow has sqrt(alpha^2 + sigma^2) != 1 (the d log r terms) and alpha(t_max) = 0.
# Each test compiles one adaptive solve (~2 s, more on a loaded machine): all but one are slow.
@pytest.mark.parametrize("schedule", [
    pytest.param(schedules.VPLinear(), id="vp_linear", marks=pytest.mark.slow),
    pytest.param(schedules.RectifiedFlow(), id="rectified_flow")])
def test_exact_trace_nll_equals_log_density(x64, schedule):
  x, denoise, exact, prior = _setup(schedule, dim=4, n=4)
  nll = metrics.pf_ode_nll(denoise, x, schedule=schedule, divergence="exact", prior_logp=prior,
                           rtol=1e-7, atol=1e-7)
  assert nll.shape == (4,)
  np.testing.assert_allclose(nll, exact, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_hutchinson_nll_within_three_standard_errors(x64):
  schedule = schedules.VPLinear()
  x, denoise, exact, prior = _setup(schedule, dim=4, n=48, seed=1)
  nll = metrics.pf_ode_nll(denoise, x, schedule=schedule, divergence="hutchinson",
                           rng=jax.random.key(0), num_probes=2, prior_logp=prior, rtol=1e-4,
                           atol=1e-4)
  err = np.asarray(nll - exact)
  assert np.std(err) > 1e-3  # the probes do add noise: the check below is not vacuous
  assert abs(err.mean()) < 3 * err.std(ddof=1) / math.sqrt(len(err))


@pytest.mark.slow
def test_default_gaussian_prior_mismatch(x64):
  # N(0, sigma(t_max)^2 I) instead of the exact marginal at t_max under VP-linear (alpha(1) = 6.5e-3).
  schedule = schedules.VPLinear()
  x, denoise, exact, _ = _setup(schedule, dim=16, n=16, seed=2)
  nll = metrics.pf_ode_nll(denoise, x, schedule=schedule, rtol=1e-8, atol=1e-8)
  mismatch = np.asarray(nll - exact)
  assert np.all(np.abs(mismatch) < 0.05)
  assert abs(mismatch.mean()) < 0.01


@pytest.mark.slow
def test_bits_per_dim_is_the_dequantized_nll(x64):
  schedule = schedules.RectifiedFlow()
  mix = _mix64(analytic.mixture64(dim=4, num_components=2, seed=3))
  denoise = lambda x, t: analytic.denoise(mix, x, t, schedule=schedule)
  images = np.random.default_rng(0).integers(0, 256, (3, 2, 2, 1))
  flat = lambda x, t: denoise(x.reshape(3, 4), t).reshape(x.shape)
  bpd = metrics.pf_ode_bits_per_dim(flat, images, schedule=schedule, rng=jax.random.key(5))
  u = jax.random.uniform(jax.random.split(jax.random.key(5))[0], images.shape, jnp.float64)
  nll = metrics.pf_ode_nll(flat, (images + u) / 128.0 - 1.0, schedule=schedule)
  np.testing.assert_allclose(bpd, (nll + 4 * math.log(128)) / (4 * math.log(2)), rtol=1e-12)


def test_bad_inputs():
  schedule = schedules.VPLinear()
  denoise = lambda x, t: x
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="divergence"):
    metrics.pf_ode_nll(denoise, x, schedule=schedule, divergence="trace")
  with pytest.raises(ValueError, match="rng"):
    metrics.pf_ode_nll(denoise, x, schedule=schedule, divergence="hutchinson")
  with pytest.raises(ValueError, match="num_probes"):
    metrics.pf_ode_nll(denoise, x, schedule=schedule, divergence="hutchinson",
                       rng=jax.random.key(0), num_probes=0)
  with pytest.raises(ValueError, match="floating"):
    metrics.pf_ode_nll(denoise, jnp.zeros((2, 3), jnp.int32), schedule=schedule)
  with pytest.raises(ValueError, match="8-bit"):
    metrics.pf_ode_bits_per_dim(denoise, x, schedule=schedule, rng=jax.random.key(0))
