"""Metrics: ~0 between two samples of one law, clearly positive when a mode is dropped or shifted,
and equal to closed forms where those exist."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from diffdistill import analytic as A
from diffdistill import metrics as M

N = 3000


@pytest.fixture(scope="module")
def ring_samples():
  mix = A.ring2d()
  x = A.sample(mix, jax.random.PRNGKey(0), N)
  y = A.sample(mix, jax.random.PRNGKey(1), N)
  far = A.sample(mix, jax.random.PRNGKey(2), 2 * N)
  dropped = far[jnp.argmax(A.responsibilities(mix, far), 1) != 0][:N]
  return mix, x, y, dropped


@pytest.mark.parametrize("metric", [M.sliced_wasserstein, M.mmd2, M.energy_distance, M.frechet_distance],
                         ids=lambda f: getattr(f, "__name__", str(f)))
def test_zero_for_same_law_positive_for_dropped_or_shifted_mode(metric, ring_samples):
  mix, x, y, dropped = ring_samples
  # Compare squared distances throughout (MMD^2, energy and Frechet already are).
  power = 2 if metric is M.sliced_wasserstein else 1
  same = float(metric(x, y)) ** power
  drop = float(metric(x, dropped)) ** power
  in_mode0 = (jnp.argmax(A.responsibilities(mix, y), 1) == 0)[:, None]
  shifted = float(metric(x, jnp.where(in_mode0, y + jnp.array([0.0, 1.0]), y))) ** power
  assert drop > 10 * abs(same) and shifted > 10 * abs(same), (same, drop, shifted)


def test_sliced_wasserstein_of_a_shift(x64):
  """Translating a sample by c gives sqrt(mean_theta (theta.c)^2) -> |c| / sqrt(d) over many directions."""
  x = jax.random.normal(jax.random.PRNGKey(0), (500, 4))
  c = jnp.array([0.3, -0.2, 0.5, 0.1])
  sw = M.sliced_wasserstein(x, x + c, num_projections=20000)
  np.testing.assert_allclose(sw, jnp.linalg.norm(c) / 2.0, rtol=0.02)
  # Unequal sizes go through the quantile functions; a sample against itself repeated is ~0.
  assert float(M.sliced_wasserstein(x, jnp.concatenate([x, x]))) < 1e-2


def test_frechet_distance_closed_form(x64):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((5, 5))
  b = rng.standard_normal((5, 5))
  c1, c2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
  m1, m2 = rng.standard_normal(5), rng.standard_normal(5)
  ref = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
  np.testing.assert_allclose(M.frechet_distance_from_moments(m1, c1, m2, c2), ref, rtol=1e-8)
  # A rank-deficient covariance (as with few samples) still gives a finite, correct answer.
  c3 = np.diag([1.0, 0.0, 2.0, 0.0, 1.0])
  ref3 = np.sum((m1 - m2) ** 2) + np.trace(c3 + c2) - 2 * np.sum(np.sqrt(np.maximum(np.linalg.eigvals(c3 @ c2).real, 0)))
  np.testing.assert_allclose(M.frechet_distance_from_moments(m1, c3, m2, c2), ref3, rtol=1e-6)


def test_mmd_is_unbiased_and_blocks_do_not_matter(x64):
  mix = A.ring2d()
  vals = [float(M.mmd2(A.sample(mix, jax.random.PRNGKey(i), 400), A.sample(mix, jax.random.PRNGKey(100 + i), 400)))
          for i in range(12)]
  assert abs(np.mean(vals)) < 3 * np.std(vals) / np.sqrt(len(vals)) + 1e-6
  assert min(vals) < 0 < max(vals)  # an unbiased estimator of 0 takes both signs
  x, y = A.sample(mix, jax.random.PRNGKey(0), 333), A.sample(mix, jax.random.PRNGKey(1), 250) + 0.3
  np.testing.assert_allclose(M.mmd2(x, y, block=64), M.mmd2(x, y, block=1000), rtol=1e-10)
  np.testing.assert_allclose(M.energy_distance(x, y, block=50), M.energy_distance(x, y, block=512), rtol=1e-10)


def test_mmd_and_energy_against_direct_formulas(x64):
  x = jax.random.normal(jax.random.PRNGKey(0), (40, 3))
  y = jax.random.normal(jax.random.PRNGKey(1), (30, 3)) + 0.5
  h = jnp.array([0.5, 2.0])
  k = lambda a, b: jnp.sum(jnp.exp(-jnp.sum((a[:, None] - b[None]) ** 2, -1)[..., None] / h), -1)
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  ref = ((kxx.sum() - jnp.trace(kxx)) / (40 * 39) + (kyy.sum() - jnp.trace(kyy)) / (30 * 29) - 2 * kxy.mean())
  np.testing.assert_allclose(M.mmd2(x, y, bandwidths=h), ref, rtol=1e-10)
  d = lambda a, b: jnp.sqrt(jnp.sum((a[:, None] - b[None]) ** 2, -1))
  ref_e = 2 * d(x, y).mean() - d(x, x).sum() / (40 * 39) - d(y, y).sum() / (30 * 29)
  np.testing.assert_allclose(M.energy_distance(x, y), ref_e, rtol=1e-6)


def test_per_sample_error():
  x = jnp.zeros((4, 2))
  ref = jnp.array([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [0.0, 0.0]])
  e = M.per_sample_error(x, ref)
  np.testing.assert_allclose([e["median"], e["rms"], e["max"]], [1.0, np.sqrt(6 / 4), 2.0], rtol=1e-6)
  with pytest.raises(ValueError, match="same shape"):
    M.per_sample_error(x, ref[:3])


def test_mixture_metrics(ring_samples, x64):
  mix, x, _, dropped = ring_samples
  s = M.mode_stats(mix, dropped)
  np.testing.assert_allclose(s["coverage"], 7 / 8)
  np.testing.assert_allclose(s["weight_tv"], 1 / 8, atol=0.03)
  s_all = M.mode_stats(mix, x)
  assert float(s_all["coverage"]) == 1.0 and float(s_all["weight_tv"]) < 0.03
  xx = jnp.asarray(x, jnp.float64)
  np.testing.assert_allclose(M.mixture_log_likelihood(mix, xx), jnp.mean(A.data_log_prob(mix, xx)), rtol=1e-12)
  # Exact samples reach the entropy-level likelihood; blurred samples a lower one.
  assert float(M.mixture_log_likelihood(mix, xx + 0.2 * jax.random.normal(jax.random.PRNGKey(5), xx.shape))) < \
      float(M.mixture_log_likelihood(mix, xx)) - 0.5
  np.testing.assert_array_equal(M.mode_counts(mix, xx, block=128), M.mode_counts(mix, xx, block=4096))


def test_mode_covariance_error_sees_shrunk_modes_and_counts_an_empty_mode_as_one():
  """Two well-separated anisotropic 3-D modes. Exact samples: the error is the sampling noise
  (~sqrt((d + 1) / N_k)); samples pulled toward their mode by c have C_k = c^2 Sigma_k, so the
  error is 1 - c^2; an empty mode contributes its weight times 1."""
  covs = jnp.array([[[1.0, 0.3, 0.0], [0.3, 0.5, 0.0], [0.0, 0.0, 2.0]], jnp.diag(jnp.array([0.2, 1.0, 0.7]))])
  mix = A.GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[20.0, 0, 0], [-20.0, 0, 0]]), covs)
  x = A.sample(mix, jax.random.PRNGKey(0), 40000)
  exact = M.mode_stats(mix, x)
  assert float(exact["cov_error"]) < 0.03
  k = jnp.argmax(A.responsibilities(mix, x), axis=1)
  shrunk = M.mode_stats(mix, mix.means[k] + 0.6 * (x - mix.means[k]))
  np.testing.assert_allclose(shrunk["cov_errors"], 1 - 0.36, atol=0.03)
  assert float(shrunk["weight_tv"]) == float(exact["weight_tv"])  # the weights cannot see it
  only_second = M.mode_stats(mix, x[k == 1])
  np.testing.assert_allclose(only_second["cov_errors"][0], 1.0)
  np.testing.assert_allclose(only_second["cov_error"], 0.3 + 0.7 * only_second["cov_errors"][1], rtol=1e-6)


def test_mode_tail_share_and_core_cov_error_split_smear_from_shape():
  """Two modes in 32-D, 10 apart, std 0.1: an exact sample lies at ~1.0 radius sqrt(tr Sigma)
  from its mean (none beyond 1.5). Moving a fifth of mode 0's samples 40 % of the way to mode 1
  (still assigned to 0) smears it: tail_share is exactly the moved share (weighted), and the core
  is exactly the unmoved samples, whose covariance error the core error then equals."""
  d = 32
  means = jnp.zeros((2, d)).at[1, 0].set(10.0)
  mix = A.GaussianMixture(jnp.array([0.4, 0.6]), means, jnp.full((2,), 0.01))
  x = A.sample(mix, jax.random.PRNGKey(3), 4000)
  exact = M.mode_stats(mix, x)
  assert float(exact["tail_share"]) == 0.0
  np.testing.assert_allclose(exact["core_cov_error"], exact["cov_error"], rtol=1e-6)
  k = np.asarray(jnp.argmax(A.responsibilities(mix, x), axis=1))
  moved = np.flatnonzero(k == 0)[::5]
  smeared = np.asarray(x).copy()
  smeared[moved] += 0.4 * np.asarray(means[1] - means[0])
  s = M.mode_stats(mix, smeared)
  np.testing.assert_allclose(s["tail_share"], 0.4 * len(moved) / np.sum(k == 0), rtol=1e-6)
  core = M.mode_stats(mix, np.delete(smeared, moved, axis=0))
  np.testing.assert_allclose(s["core_cov_error"], core["cov_error"], rtol=1e-5)
  assert float(s["cov_error"]) > 10 * float(s["core_cov_error"])  # the smear dominates the error
  with pytest.raises(ValueError, match="tail_radius"):
    M.mode_stats(mix, x, tail_radius=0.0)


class MetricVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_no_jit_agree(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 3))
    y = jax.random.normal(jax.random.PRNGKey(1), (48, 3)) + 1.0
    f = self.variant(lambda a, b: M.energy_distance(a, b) + M.frechet_distance(a, b))
    np.testing.assert_allclose(f(x, y), M.energy_distance(x, y) + M.frechet_distance(x, y), rtol=1e-5)


def test_bad_input():
  with pytest.raises(ValueError, match="same d"):
    M.mmd2(jnp.ones((5, 2)), jnp.ones((5, 3)))
  with pytest.raises(ValueError, match="at least 2 samples"):
    M.sliced_wasserstein(jnp.ones((1, 2)), jnp.ones((5, 2)))


# ---- Bad inputs (issue 7): each a clear error or a correct answer. ----


def test_bad_parameters_are_errors_not_numbers():
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
  with pytest.raises(ValueError, match="bandwidths must be .* > 0"):
    M.mmd2(x, x + 1.0, bandwidths=jnp.array([-1.0]))
  with pytest.raises(ValueError, match="cov_x must be positive semi-definite"):
    M.frechet_distance_from_moments(jnp.zeros(2), -jnp.eye(2), jnp.zeros(2), -jnp.eye(2))
  with pytest.raises(ValueError, match="cov_y must be a symmetric"):
    M.frechet_distance_from_moments(jnp.zeros(2), jnp.eye(2), jnp.zeros(2), jnp.array([[1.0, 0.5],
                                                                                      [0.0, 1.0]]))
  with pytest.raises(ValueError, match="num_projections must be an integer >= 1"):
    M.sliced_wasserstein(x, x + 1.0, num_projections=0)
  for fn in (M.mmd2, M.energy_distance):
    with pytest.raises(ValueError, match="block must be an integer >= 1"):
      fn(x, x, block=0)
  with pytest.raises(ValueError, match="block must be an integer >= 1"):
    M.mode_counts(A.ring2d(), x, block=0)
  with pytest.raises(ValueError, match="min_fraction must lie in"):
    M.mode_stats(A.ring2d(), x, min_fraction=2.0)


@pytest.mark.parametrize("fn", [M.sliced_wasserstein, M.mmd2, M.energy_distance, M.frechet_distance,
                                M.per_sample_error,
                                lambda x, y: M.mode_stats(A.ring2d(), x),
                                lambda x, y: M.mixture_log_likelihood(A.ring2d(), x)],
                         ids=["sliced_wasserstein", "mmd2", "energy_distance", "frechet_distance",
                              "per_sample_error", "mode_stats", "mixture_log_likelihood"])
def test_empty_sample_sets_are_a_clear_error(fn):
  with pytest.raises(ValueError, match=r"x needs at least \d sample"):
    fn(jnp.zeros((0, 2)), jnp.zeros((0, 2)))


def test_integer_samples_give_the_float_answer():
  x = jnp.arange(16).reshape(8, 2) % 5
  y = (jnp.arange(16).reshape(8, 2) * 3) % 7
  xf, yf = x.astype(jnp.float32), y.astype(jnp.float32)
  for fn in (M.sliced_wasserstein, M.mmd2, M.energy_distance, M.frechet_distance):
    got, want = fn(x, y), fn(xf, yf)
    assert np.isfinite(want) and abs(want) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mixture_metrics_name_a_dimension_mismatch():
  for fn in (M.mode_stats, M.mode_counts, M.mixture_log_likelihood):
    with pytest.raises(ValueError, match="x must have shape \\[N, d\\] with the mixture's d = 2"):
      fn(A.ring2d(), jnp.zeros((8, 3)))


def test_mixture_scores_of_exact_samples_sit_at_their_floors():
  mix = A.ring2d()
  exact = np.asarray(A.sample(mix, jax.random.key(11), 2000))
  s = M.mixture_scores(exact, mix)
  assert s["sliced_w2"] < 3 * s["sliced_w2_floor"] and s["mode_weight_tv"] < 3 * s["mode_weight_tv_floor"]
  floor = M.mode_floor(mix, 2000)
  assert (s["mode_weight_tv_floor"], s["mode_cov_error_floor"]) == (floor["weight_tv"], floor["cov_error"])
  # every sample from one of the 8 modes: weight TV 7/8, far above the floor
  one = np.asarray(A.sample(A.GaussianMixture(np.ones(1), np.asarray(mix.means)[:1], np.full(1, 0.01)),
                            jax.random.key(12), 2000))
  bad = M.mixture_scores(one, mix)
  assert bad["mode_weight_tv"] == pytest.approx(7 / 8, abs=0.01)
  assert bad["sliced_w2"] > 10 * s["sliced_w2"]
