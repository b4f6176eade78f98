"""The analytic teachers against independent computations: autodiff, Monte Carlo, scipy, closed forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffdistill import analytic as A
from diffdistill import schedules

SCHEDS = sorted(schedules.SCHEDULES)


def _small_mixture(d=4, k=3, seed=0, diagonal=False):
  rng = np.random.default_rng(seed)
  means = rng.standard_normal((k, d))
  if diagonal:
    covs = rng.uniform(0.05, 0.5, (k, d))
  else:
    q = np.linalg.qr(rng.standard_normal((k, d, d)))[0]
    covs = np.einsum("kij,kj,klj->kil", q, rng.uniform(0.05, 0.5, (k, d)), q)
  return A.GaussianMixture(rng.uniform(0.5, 2.0, k), means, covs)


@pytest.mark.parametrize("name", SCHEDS)
def test_tweedie_identity_against_autodiff_of_log_prob(name, x64):
  """x0_hat = (x + sigma^2 grad log p_t(x)) / alpha, with grad from jax.grad of log_prob."""
  s = schedules.get(name)
  mix = A.mixture64()
  x0 = A.sample(mix, jax.random.PRNGKey(0), 6)
  t = jnp.linspace(s.t_min + 0.02 * (s.t_max - s.t_min), 0.7 * s.t_max, 6)
  x = s.alpha(t)[:, None] * x0 + s.sigma(t)[:, None] * jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  grad = jax.grad(lambda y: jnp.sum(A.log_prob(mix, y, t, schedule=s)))(x)
  tweedie = (x + s.sigma(t)[:, None] ** 2 * grad) / s.alpha(t)[:, None]
  np.testing.assert_allclose(A.denoise(mix, x, t, schedule=s), tweedie, rtol=0, atol=1e-8)
  np.testing.assert_allclose(A.score(mix, x, t, schedule=s), grad, rtol=1e-7, atol=1e-7)


def test_denoiser_agrees_with_monte_carlo_posterior_mean(x64):
  """Self-normalized importance sampling of p(x0 | x_t) with the prior as proposal."""
  s = schedules.VPLinear()
  mix = A.ring2d()
  x0s = A.sample(mix, jax.random.PRNGKey(3), 400_000)
  for t, x in [(0.3, jnp.array([0.7, 0.4])), (0.5, jnp.array([-0.2, 0.1])), (0.8, jnp.array([1.0, -1.0]))]:
    a, sg = s.alpha(t), s.sigma(t)
    logw = -0.5 * jnp.sum((x - a * x0s) ** 2, axis=1) / sg ** 2
    w = jax.nn.softmax(logw)
    mc = w @ x0s
    ess = 1.0 / jnp.sum(w ** 2)
    se = jnp.sqrt(jnp.sum(w[:, None] ** 2 * (x0s - mc) ** 2, axis=0))  # delta-method standard error
    exact = A.denoise(mix, x[None], jnp.array([t]), schedule=s)[0]
    assert ess > 1000
    assert bool(jnp.all(jnp.abs(exact - mc) < 5 * se + 1e-4)), (t, exact, mc, se)


def test_log_prob_matches_scipy(x64):
  s = schedules.EDM()
  mix = _small_mixture()
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
  t = 0.7
  a, sg = 1.0, 0.7
  ref = np.log(sum(float(w) * stats.multivariate_normal(a * np.asarray(m), a * a * np.asarray(c) + sg * sg * np.eye(4)).pdf(np.asarray(x))
                   for w, m, c in zip(mix.weights, mix.means, mix.covs)))
  np.testing.assert_allclose(A.log_prob(mix, x, jnp.full((5,), t), schedule=s), ref, rtol=1e-10)
  ref0 = np.log(sum(float(w) * stats.multivariate_normal(np.asarray(m), np.asarray(c)).pdf(np.asarray(x))
                    for w, m, c in zip(mix.weights, mix.means, mix.covs)))
  np.testing.assert_allclose(A.data_log_prob(mix, x), ref0, rtol=1e-10)


def test_diagonal_and_full_paths_agree(x64):
  s = schedules.VPCosine()
  diag = _small_mixture(diagonal=True)
  full = A.GaussianMixture(diag.weights, diag.means, jax.vmap(jnp.diag)(diag.eigvals))
  assert diag.eigvecs is None and full.eigvecs is not None
  x = jax.random.normal(jax.random.PRNGKey(0), (7, 4))
  t = jnp.linspace(0.1, 0.9, 7)
  np.testing.assert_allclose(A.denoise(diag, x, t, schedule=s), A.denoise(full, x, t, schedule=s), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(A.log_prob(diag, x, t, schedule=s), A.log_prob(full, x, t, schedule=s), rtol=1e-12)
  iso = A.GaussianMixture([1.0, 1.0], np.zeros((2, 3)), [0.5, 2.0])
  np.testing.assert_allclose(iso.covs[1], 2.0 * np.eye(3))


def test_sample_moments(x64):
  mix = _small_mixture()
  x = A.sample(mix, jax.random.PRNGKey(0), 400_000)
  np.testing.assert_allclose(jnp.mean(x, 0), mix.mean(), atol=0.01)
  np.testing.assert_allclose(jnp.cov(x.T), mix.covariance(), atol=0.02)


@pytest.mark.parametrize("name", SCHEDS)
def test_flow_map_matches_single_gaussian_closed_form(name, x64):
  s = schedules.get(name)
  g = _small_mixture(d=5, k=1, seed=2)
  x_T = s.alpha(s.t_max) * g.means[0] + s.sigma(s.t_max) * jax.random.normal(jax.random.PRNGKey(0), (8, 5))
  exact = A.gaussian_flow_map(g, x_T, schedule=s, t_start=s.t_max, t_end=s.t_min)
  ref = A.flow_map(A.denoiser(s), g, x_T, schedule=s, t_start=s.t_max, t_end=s.t_min, rtol=1e-10, atol=1e-10)
  rel = float(jnp.max(jnp.abs(ref - exact)) / jnp.max(jnp.abs(exact)))
  assert rel < 1e-6, rel
  # And forwards in time: the map is invertible.
  back = A.flow_map(A.denoiser(s), g, exact, schedule=s, t_start=s.t_min, t_end=s.t_max, rtol=1e-10, atol=1e-10)
  assert float(jnp.max(jnp.abs(back - x_T)) / jnp.max(jnp.abs(x_T))) < 1e-6


def test_flow_map_transports_mixture_marginals():
  """Noise pushed through the exact flow lands on the data distribution (ring: each mode hit)."""
  s = schedules.EDM()
  mix = A.ring2d()
  x_T = s.t_max * jax.random.normal(jax.random.PRNGKey(0), (4000, 2))
  x0, stats_ = A.flow_map(A.denoiser(s), mix, x_T, schedule=s, t_start=s.t_max, t_end=s.t_min,
                          return_stats=True)
  r = A.responsibilities(mix, x0)
  assert float(jnp.mean(jnp.max(r, axis=1) > 0.99)) > 0.97
  counts = jnp.bincount(jnp.argmax(r, 1), length=8) / 4000
  np.testing.assert_allclose(counts, 1 / 8, atol=0.025)
  assert int(stats_["nfe"]) > 0


def test_denoise_jits_once_for_new_mixtures():
  s = schedules.VPLinear()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(mix, x, t):
    return A.denoise(mix, x, t, schedule=s)

  x = jnp.ones((3, 4))
  f(_small_mixture(seed=0), x, jnp.full((3,), 0.5))
  f(_small_mixture(seed=1), x, jnp.full((3,), 0.6))
  chex.clear_trace_counter()


def test_ready_made_mixtures():
  assert A.mixture64().dim == 64 and A.mixture64().num_components == 16
  np.testing.assert_allclose(A.mixture64().means, A.mixture64().means)  # fixed seed
  assert A.ring2d().num_components == 8 and A.grid2d().num_components == 8
  with pytest.raises(ValueError, match="Unknown mixture"):
    A.get_mixture("swissroll")


@pytest.mark.parametrize("args, match", [
    (([1.0, 1.0], np.zeros((3, 2)), np.ones((2, 2))), r"means must have shape \[K, d\]"),
    (([1.0, -1.0], np.zeros((2, 2)), np.ones((2, 2))), "weights must be finite and > 0"),
    (([1.0, 1.0], np.zeros((2, 2)), np.ones((2, 3))), "covs must have shape"),
    (([1.0], np.zeros((1, 2)), np.array([[[1.0, 2.0], [2.0, 1.0]]])), "positive definite"),
    (([1.0], np.zeros((1, 2)), np.array([[[1.0, 0.5], [0.0, 1.0]]])), "symmetric"),
    (([1.0], np.zeros((1, 2)), np.array([[0.0, 1.0]])), "positive definite"),
])
def test_bad_mixtures(args, match):
  with pytest.raises(ValueError, match=match):
    A.GaussianMixture(*args)


def test_bad_x_and_flow_map_k():
  mix = A.ring2d()
  with pytest.raises(ValueError, match=r"x must have shape \[B, d\] with d = 2"):
    A.denoise(mix, jnp.ones((3, 5)), jnp.ones(3), schedule=schedules.EDM())
  with pytest.raises(ValueError, match="K = 1"):
    A.gaussian_flow_map(mix, jnp.ones((3, 2)), schedule=schedules.EDM(), t_start=1.0, t_end=0.1)


@pytest.mark.parametrize("sched", [schedules.RectifiedFlow(), schedules.TrigFlow(t_max=float(np.pi / 2))],
                         ids=["rectified_flow", "trigflow_to_pi_over_2"])
def test_flow_map_float32_from_pure_noise(sched):
  """Starting where alpha = 0: float32(pi/2) lies above pi/2, where cos < 0; no NaN, no step blow-up."""
  g = A.GaussianMixture([1.0], jnp.ones((1, 3)), jnp.array([[0.5, 0.2, 0.1]]))
  x_T = jax.random.normal(jax.random.PRNGKey(0), (8, 3)) * sched.sigma(sched.t_max)
  out = A.flow_map(A.denoiser(sched), g, x_T, schedule=sched, t_start=sched.t_max, t_end=sched.t_min,
                   rtol=1e-5, atol=1e-5)
  ref = A.gaussian_flow_map(g, x_T, schedule=sched, t_start=sched.t_max, t_end=sched.t_min)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=1e-4)


# ---- Bad inputs (issue 7): each a clear error or a correct answer. ----


def test_denoise_rejects_integer_x_and_times_outside_the_schedule():
  mix, s = A.ring2d(), schedules.VPLinear()
  with pytest.raises(ValueError, match="x must be a floating-point array"):
    A.denoise(mix, jnp.ones((4, 2), jnp.int32), 0.5, schedule=s)
  with pytest.raises(ValueError, match=r"t must lie in \[t_min, t_max\] = \[0.001, 1.0\]"):
    A.denoise(mix, jnp.ones((4, 2)), -1.0, schedule=s)
  with pytest.raises(ValueError, match="t must lie in"):
    A.score(mix, jnp.ones((4, 2)), jnp.array([0.5, 0.5, 0.5, 1.5]), schedule=s)


def test_schedule_by_name_is_the_schedule():
  mix, x = A.ring2d(), jax.random.normal(jax.random.PRNGKey(0), (8, 2))
  np.testing.assert_array_equal(A.denoise(mix, x, 0.3, schedule="vp_linear"),
                                A.denoise(mix, x, 0.3, schedule=schedules.VPLinear()))
  with pytest.raises(ValueError, match="schedule must be a schedules.Schedule or one of"):
    A.denoise(mix, x, 0.3, schedule=None)


@pytest.mark.parametrize("means, covs", [
    ([[0.0, np.nan], [1.0, 1.0]], [1.0, 1.0]),
    ([[0.0, np.inf], [1.0, 1.0]], [1.0, 1.0]),
    ([[0.0, 0.0], [1.0, 1.0]], [1.0, np.inf]),
    ([[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [np.inf, 1.0]]),
    ([[0.0, 0.0], [1.0, 1.0]], [[[1.0, 0.0], [0.0, 1.0]], [[np.inf, 0.0], [0.0, 1.0]]]),
], ids=["nan_mean", "inf_mean", "inf_iso_var", "inf_diag_var", "inf_full_cov"])
def test_mixture_rejects_non_finite_means_and_covariances(means, covs):
  with pytest.raises(ValueError, match="must be finite"):
    A.GaussianMixture(np.ones(2), np.asarray(means), np.asarray(covs))


def test_sample_checks_n_and_rng_and_accepts_both_key_kinds():
  mix = A.ring2d()
  for n, message in ((-1, "n must be an integer >= 0"), (2.5, "n must be an integer"),
                     (True, "n must be an integer")):
    with pytest.raises(ValueError, match=message):
      A.sample(mix, jax.random.key(0), n)
  with pytest.raises(ValueError, match=r"pass jax.random.key\(0\)"):
    A.sample(mix, 0, 4)
  with pytest.raises(ValueError, match="dtype must be a floating dtype"):
    A.sample(mix, jax.random.key(0), 4, dtype=jnp.int32)
  typed = A.sample(mix, jax.random.key(3), np.int64(5))
  raw = A.sample(mix, jax.random.PRNGKey(3), 5)
  assert typed.shape == (5, 2)
  np.testing.assert_array_equal(typed, raw)  # the same threefry bits either way


def test_ready_made_mixture_sizes_are_checked():
  for kwargs, name in (({"num_modes": 0}, "num_modes"), ({"num_modes": 2.5}, "num_modes")):
    with pytest.raises(ValueError, match=f"{name} must be an integer"):
      A.ring2d(**kwargs)
  with pytest.raises(ValueError, match="size must be an integer >= 1"):
    A.grid2d(size=0)
  with pytest.raises(ValueError, match="num_components must be an integer >= 1"):
    A.mixture64(num_components=0)
  assert A.ring2d(num_modes=np.int64(5)).num_components == 5


@pytest.mark.parametrize("times", [dict(t_start=5.0, t_end=1e-3), dict(t_start=1.0, t_end=-1.0)],
                         ids=["t_start_5", "t_end_-1"])
def test_flow_map_checks_its_times_before_solving(times):
  s = schedules.VPLinear()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 2))
  # A ValueError naming the time, not diffrax's "maximum number of solver steps" seconds later.
  with pytest.raises(ValueError, match=f"{'t_start' if times['t_start'] == 5.0 else 't_end'} must lie in"):
    A.flow_map(A.denoiser(s), A.ring2d(), x, schedule=s, **times)


def test_class_mixtures_and_the_guided_denoiser(x64):
  # Classes are component subsets: p(x | c) is the renormalized subset; the null label is p(x).
  # Guidance is D_null + w (D_c - D_null): w = 1 is the class's own denoiser, w = 0 the null one.
  mix, schedule = A.ring2d(), schedules.VPLinear()
  classes = np.arange(8) % 4
  laws = A.class_mixtures(mix, classes)
  assert len(laws) == 5 and laws[-1] is mix
  np.testing.assert_allclose(laws[1].means, np.asarray(mix.means)[[1, 5]])
  np.testing.assert_allclose(laws[1].weights, [0.5, 0.5])
  x = jax.random.normal(jax.random.key(0), (6, 2), jnp.float64)
  t = jnp.full((6,), 0.5)
  label = jnp.array([0, 1, 2, 3, 4, 1])
  guided = A.GuidedDenoiser(schedule)
  d = [A.denoise(m, x, t, schedule=schedule) for m in laws]
  want_c = jnp.stack([d[int(c)][i] for i, c in enumerate(label)])
  np.testing.assert_allclose(guided(laws, x, t, label=label), want_c, rtol=1e-12)
  np.testing.assert_allclose(guided(laws, x, t, label=label, w=1.0), want_c, rtol=1e-12)
  np.testing.assert_allclose(guided(laws, x, t, label=label, w=0.0), d[4], rtol=1e-12)
  w = jnp.linspace(0.0, 5.0, 6)
  np.testing.assert_allclose(guided(laws, x, t, label=label, w=w),
                             d[4] + w[:, None] * (want_c - d[4]), rtol=1e-12)
  with pytest.raises(ValueError, match="classes must be"):
    A.class_mixtures(mix, np.arange(7))
  with pytest.raises(ValueError, match="every class non-empty"):
    A.class_mixtures(mix, np.array([0, 0, 2, 2, 0, 0, 2, 2]))
