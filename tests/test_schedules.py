"""Schedules against their closed forms; time samplers against their densities."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from diffdistill import schedules

ALL = sorted(schedules.SCHEDULES)


def _grid(s, n=33):
  return jnp.linspace(s.t_min, s.t_max, n)


@pytest.mark.parametrize("name", ALL)
def test_t_from_logsnr_inverts_logsnr(name, x64):
  s = schedules.get(name)
  t = _grid(s)
  lam = s.logsnr(t)
  finite = jnp.isfinite(lam)
  np.testing.assert_allclose(s.t_from_logsnr(lam)[finite], t[finite], rtol=1e-10, atol=1e-12)
  # logsnr is the definition 2 log(alpha / sigma) wherever that is finite.
  np.testing.assert_allclose(lam[finite], (2 * jnp.log(s.alpha(t) / s.sigma(t)))[finite], rtol=1e-10, atol=1e-10)
  assert bool(jnp.all(jnp.diff(lam) < 0)), "logsnr must decrease with t"


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine", "vp_discrete"])
def test_variance_preserving(name, x64):
  s = schedules.get(name)
  t = _grid(s)
  assert s.variance_preserving
  np.testing.assert_allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0, atol=1e-13)


@pytest.mark.parametrize("name", ["ve", "edm", "rectified_flow", "trigflow"])
def test_not_variance_preserving(name):
  s = schedules.get(name)
  assert not s.variance_preserving
  t = _grid(s)
  assert float(jnp.max(jnp.abs(s.alpha(t) ** 2 + s.sigma(t) ** 2 - 1))) > 1e-2


def test_closed_forms(x64):
  t = jnp.array([0.1, 0.5, 0.9])
  s = schedules.VPLinear(beta_min=0.1, beta_max=20.0)
  np.testing.assert_allclose(s.alpha(t), np.exp(-0.25 * np.asarray(t) ** 2 * 19.9 - 0.5 * np.asarray(t) * 0.1),
                             rtol=1e-13)
  c = schedules.VPCosine(s=0.008)
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(c.alpha(t) ** 2, f(np.asarray(t)) / f(0.0), rtol=1e-12)
  r = schedules.RectifiedFlow()
  np.testing.assert_allclose(r.alpha(t), 1 - t)
  np.testing.assert_allclose(r.sigma(t), t)
  tf = schedules.TrigFlow(sigma_data=0.5)
  np.testing.assert_allclose(tf.alpha(t), np.cos(t), rtol=1e-14)
  np.testing.assert_allclose(tf.sigma(t), 0.5 * np.sin(t), rtol=1e-14)
  ve = schedules.VE(sigma_min=0.01, sigma_max=50.0)
  np.testing.assert_allclose(ve.sigma(t), 0.01 * 5000.0 ** np.asarray(t), rtol=1e-12)
  edm = schedules.EDM()
  np.testing.assert_allclose(edm.sigma(t), t)
  np.testing.assert_allclose(edm.alpha(t), 1.0)


def test_vp_discrete_matches_alphas_cumprod_at_knots(x64):
  betas = np.linspace(1e-4, 0.02, 1000)
  s = schedules.VPDiscrete.from_name("linear")
  n = np.array([1, 10, 500, 1000])
  np.testing.assert_allclose(s.alpha(jnp.asarray(n / 1000.0)) ** 2, np.cumprod(1 - betas)[n - 1], rtol=1e-12)
  # Piecewise linear in log alpha between knots.
  la = lambda u: jnp.log(s.alpha(jnp.asarray(u)))
  np.testing.assert_allclose(la(0.2505), 0.5 * (la(0.250) + la(0.251)), rtol=1e-12)
  for kind in ("scaled_linear", "cosine"):
    b = np.asarray(schedules.VPDiscrete.from_name(kind).betas)
    assert b.shape == (1000,) and np.all((b > 0) & (b < 1))


def test_rectified_flow_pure_noise_end():
  s = schedules.RectifiedFlow()
  assert float(s.logsnr(1.0)) == -math.inf
  assert float(s.t_from_logsnr(-jnp.inf)) == 1.0
  assert float(s.alpha(1.0)) == 0.0


@pytest.mark.parametrize("name", ALL)
def test_derivatives_match_finite_differences(name, x64):
  s = schedules.get(name)
  t = jnp.linspace(s.t_min + 0.05 * (s.t_max - s.t_min), s.t_max - 0.05 * (s.t_max - s.t_min), 5)
  h = 1e-6 * (s.t_max - s.t_min)
  for f, df in ((s.alpha, s.d_alpha), (s.sigma, s.d_sigma), (s.logsnr, s.d_logsnr)):
    np.testing.assert_allclose(df(t), (f(t + h) - f(t - h)) / (2 * h), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ALL)
def test_float32_finite_near_both_ends(name):
  s = schedules.get(name)
  t = jnp.array([s.t_min, s.t_min * 1.01, 0.5 * (s.t_min + s.t_max), s.t_max * 0.999], jnp.float32)
  for f in (s.alpha, s.sigma, s.logsnr, s.d_logsnr):
    assert bool(jnp.all(jnp.isfinite(f(t)))), f
  g = jax.grad(lambda u: jnp.sum(s.logsnr(u)))(t)
  assert bool(jnp.all(jnp.isfinite(g)))


def test_static_under_jit_no_retrace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(t):
    return schedules.VPLinear().logsnr(t)

  g = jax.jit(lambda t, s: s.logsnr(t), static_argnums=1)
  t = jnp.linspace(0.1, 0.9, 4)
  f(t)
  f(t + 0.1)
  assert schedules.VPLinear() == schedules.VPLinear() and hash(schedules.VPLinear()) == hash(schedules.VPLinear())
  np.testing.assert_allclose(g(t, schedules.EDM()), -2 * np.log(np.asarray(t)), rtol=1e-6)
  chex.clear_trace_counter()


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="nope"), "Unknown schedule 'nope'; expected one of"),
    (dict(name="vp_linear", t_min=0.5, t_max=0.5), "t_min < t_max"),
    (dict(name="rectified_flow", t_min=0.9, t_max=0.2), "t_min < t_max"),
    (dict(name="ve", sigma_min=-1.0), "sigma_min"),
    (dict(name="edm", sigma_min=1.0, sigma_max=0.5), "sigma_min < sigma_max"),
    (dict(name="edm", sigma_data=-0.5), "sigma_data"),
    (dict(name="vp_cosine", t_max=1.0), "t_max must be < 1"),
    (dict(name="vp_discrete", beta_schedule="quadratic"), "unknown beta schedule"),
    (dict(name="vp_linear", bogus=1), "Accepted"),
])
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    schedules.get(**kwargs)
  with pytest.raises(ValueError, match="every beta"):
    schedules.VPDiscrete(betas=(0.1, 1.5))


SAMPLERS = [schedules.UniformTime(), schedules.LogNormalSigma(), schedules.LogitNormalTime(mean=0.3),
            schedules.UniformLogSNR()]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
@pytest.mark.parametrize("name", ["vp_linear", "edm", "rectified_flow"])
def test_time_sampler_density(sampler, name, x64):
  s = schedules.get(name)
  if sampler.name == "logsnr_uniform" and name == "rectified_flow":
    s = schedules.RectifiedFlow(t_max=0.999)
  dens = lambda u: float(jnp.exp(sampler.log_density(jnp.asarray(u), schedule=s)))
  # The density integrates to 1 over [t_min, t_max] (split at a few points for quad's sake).
  pts = np.geomspace(s.t_min, s.t_max, 12)
  total = sum(integrate.quad(dens, a, b, limit=200)[0] for a, b in zip(pts[:-1], pts[1:]))
  assert abs(total - 1.0) < 1e-6
  # Samples follow it: empirical CDF at a few quantile points against the integrated density.
  t = np.asarray(sampler.sample(jax.random.PRNGKey(0), (20000,), schedule=s, dtype=jnp.float64))
  assert t.min() >= s.t_min and t.max() <= s.t_max
  for q in (0.2, 0.5, 0.8):
    u = np.quantile(t, q)
    cdf = sum(integrate.quad(dens, a, min(b, u), limit=200)[0] for a, b in zip(pts[:-1], pts[1:]) if a < u)
    assert abs(cdf - q) < 0.015, (q, cdf)


def test_importance_weights_reweight_expectations(x64):
  s = schedules.VPLinear()
  proposal, target = schedules.UniformTime(), schedules.UniformLogSNR()
  t = proposal.sample(jax.random.PRNGKey(1), (200000,), schedule=s, dtype=jnp.float64)
  w = schedules.importance_weight(t, target=target, proposal=proposal, schedule=s)
  t_target = target.sample(jax.random.PRNGKey(2), (200000,), schedule=s, dtype=jnp.float64)
  f = lambda u: jnp.sqrt(u)
  np.testing.assert_allclose(jnp.mean(w * f(t)), jnp.mean(f(t_target)), rtol=0.02)
  np.testing.assert_allclose(jnp.mean(w), 1.0, rtol=0.02)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
def test_time_samplers_under_jit(sampler):
  s = schedules.VPLinear()
  f = jax.jit(lambda rng: sampler.sample(rng, (64,), schedule=s))
  t = f(jax.random.PRNGKey(0))
  np.testing.assert_allclose(t, sampler.sample(jax.random.PRNGKey(0), (64,), schedule=s), rtol=1e-5)
  assert bool(jnp.all(jnp.isfinite(jax.jit(lambda u: sampler.log_density(u, schedule=s))(t))))


def test_time_sampler_errors():
  with pytest.raises(ValueError, match="Unknown time sampler"):
    schedules.get_time_sampler("beta")
  with pytest.raises(ValueError, match="p_std"):
    schedules.get_time_sampler("lognormal", p_std=0.0)
  with pytest.raises(ValueError, match="finite logsnr"):
    schedules.UniformLogSNR().sample(jax.random.PRNGKey(0), (3,), schedule=schedules.RectifiedFlow())


def test_broadcast_to():
  x = jnp.zeros((4, 3, 2))
  assert schedules.broadcast_to(jnp.ones(4), x).shape == (4, 1, 1)
  with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B\]"):
    schedules.broadcast_to(jnp.ones(3), x)


# ---- Bad inputs (issue 7): times outside the range, schedules by name. ----


@pytest.mark.parametrize("name", ALL)
def test_concrete_times_outside_the_range_are_an_error(name):
  s = schedules.get(name)
  below = s.t_min - 0.1 * max(1.0, s.t_max)
  above = s.t_max + 0.1 * max(1.0, s.t_max)
  for method in ("alpha", "sigma", "logsnr", "d_alpha", "d_sigma", "d_logsnr"):
    for bad in (below, above, jnp.array([s.t_min, above])):
      with pytest.raises(ValueError, match=r"t must lie in \[t_min, t_max\]"):
        getattr(s, method)(bad)
  # The ends themselves, also rounded to float32 or bfloat16, are fine.
  for dtype in (jnp.float32, jnp.bfloat16):
    ends = jnp.array([s.t_min, s.t_max], dtype)
    assert s.sigma(ends).shape == (2,)


def test_traced_times_are_not_checked_but_concrete_ones_are():
  s = schedules.VPLinear()
  with pytest.raises(ValueError, match="VPLinear's range"):
    s.sigma(-0.5)
  # Under jit t is a tracer: no check is possible (the docstring says to keep t in range).
  assert np.isfinite(jax.jit(s.sigma)(-0.5))


def test_schedules_resolve_names():
  assert schedules.resolve("vp_linear") == schedules.VPLinear()
  s = schedules.EDM(sigma_max=10.0)
  assert schedules.resolve(s) is s
  with pytest.raises(ValueError, match="schedule must be a schedules.Schedule or one of the names"):
    schedules.resolve(3)
  with pytest.raises(ValueError, match="Unknown schedule 'vp'"):
    schedules.resolve("vp")


def test_vp_cosine_float32_keeps_relative_accuracy_near_t_1():
  # cos(f(t)) for f(t) near pi/2 cancels in float32 (relative error 2e-3 at t = 0.99999); the
  # complementary form sin((1 - t) / (1 + s) pi/2) keeps it to a few ulp.
  s = schedules.VPCosine(t_max=0.99999)
  t32 = jnp.float32(0.99999)
  got = np.array([s.alpha(t32), s.logsnr(t32)], np.float64)
  with jax.enable_x64(True):
    t64 = jnp.float64(float(t32))  # the same time, evaluated in float64
    ref = np.array([s.alpha(t64), s.logsnr(t64)], np.float64)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_vp_discrete_in_bfloat16_is_float32_rounded_once():
  # before: the 1000-knot table itself was cast to bfloat16, merging neighbouring knots
  s = schedules.VPDiscrete.from_name("linear", 1000)
  t16 = jnp.linspace(s.t_min, s.t_max, 997).astype(jnp.bfloat16)
  t32 = t16.astype(jnp.float32)  # the same times, exactly
  for method in ("alpha", "sigma", "logsnr"):
    got, want = getattr(s, method)(t16), getattr(s, method)(t32)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2.0 ** -8, atol=1e-6,
                               err_msg=method)
  lam = jnp.linspace(-8.0, 8.0, 33).astype(jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(s.t_from_logsnr(lam), np.float32),
                             s.t_from_logsnr(lam.astype(jnp.float32)), rtol=2.0 ** -8)
