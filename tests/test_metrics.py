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
