"""IS, KID, precision/recall and density/coverage against direct numpy transcriptions of the papers'
formulas (loops over samples where the paper writes a sum)."""

import numpy as np
import pytest

import jax

from diffdistill import metrics


def _np_is(logits, splits):
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for part in np.split(p, splits):
    py = part.mean(0)
    scores.append(np.exp(np.mean([np.sum(px * (np.log(px) - np.log(py))) for px in part])))
  return np.mean(scores), np.std(scores)


def test_inception_score_matches_formula():
  logits = np.random.default_rng(0).normal(size=(200, 12)) * 3
  mean, std = metrics.inception_score(logits, num_splits=10)
  ref_mean, ref_std = _np_is(logits, 10)
  assert float(mean) == pytest.approx(ref_mean, rel=1e-5)
  assert float(std) == pytest.approx(ref_std, rel=1e-4)
  # Confident, uniformly spread predictions over C classes score C; constant ones score 1.
  onehot = np.eye(8)[np.arange(80) % 8] * 50.0
  assert float(metrics.inception_score(onehot, num_splits=10)[0]) == pytest.approx(8.0, rel=1e-4)
  assert float(metrics.inception_score(np.zeros((20, 8)), num_splits=2)[0]) == pytest.approx(1.0)


def _np_mmd2_cubic(x, y):
  d = x.shape[1]
  k = lambda a, b: (a @ b / d + 1.0) ** 3
  m, n = len(x), len(y)
  kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return kxx + kyy - 2 * kxy


def test_kid_matches_formula():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(30, 5)).astype(np.float32)
  y = (rng.normal(size=(30, 5)) * 1.3 + 0.2).astype(np.float32)
  # One subset of all samples: the subset's order does not matter, so this is the U-statistic.
  mean, std = metrics.kernel_inception_distance(x, y, rng=jax.random.key(0), num_subsets=1,
                                                subset_size=30)
  assert float(mean) == pytest.approx(_np_mmd2_cubic(x.astype(np.float64), y.astype(np.float64)),
                                      rel=1e-4)
  assert float(std) == 0.0
  # Subsets: mean over subsets of the same statistic; equal laws give ~0, different ones > 0.
  same = metrics.kernel_inception_distance(x, rng.normal(size=(30, 5)).astype(np.float32),
                                           rng=jax.random.key(1), num_subsets=20, subset_size=10)
  diff = metrics.kernel_inception_distance(x, y + 2.0, rng=jax.random.key(1), num_subsets=20,
                                           subset_size=10)
  assert abs(float(same[0])) < 3 * float(same[1]) + 1e-3 and float(diff[0]) > 3 * float(diff[1])


def _np_radii(a, k):
  d = np.linalg.norm(a[:, None] - a[None], axis=-1)
  return np.sort(d, axis=1)[:, k]  # index 0 is the point itself


def _np_pr_dc(real, fake, k_pr, k_dc):
  dist = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # [M, N]
  r_real, r_fake = _np_radii(real, k_pr), _np_radii(fake, k_pr)
  precision = np.mean([any(dist[j, i] <= r_real[i] for i in range(len(real))) for j in range(len(fake))])
  recall = np.mean([any(dist[j, i] <= r_fake[j] for j in range(len(fake))) for i in range(len(real))])
  r5 = _np_radii(real, k_dc)
  density = sum(dist[j, i] <= r5[i] for j in range(len(fake)) for i in range(len(real))) / (k_dc * len(fake))
  coverage = np.mean([any(dist[j, i] <= r5[i] for j in range(len(fake))) for i in range(len(real))])
  return precision, recall, density, coverage


def test_precision_recall_density_coverage_match_formulas():
  rng = np.random.default_rng(2)
  real = rng.normal(size=(60, 4))
  fake = np.concatenate([rng.normal(size=(40, 4)) * 0.5, rng.normal(size=(30, 4)) + 3.0])
  pr = metrics.precision_recall(real, fake, k=3, block=16)
  dc = metrics.density_coverage(real, fake, k=5, block=16)
  precision, recall, density, coverage = _np_pr_dc(real, fake, 3, 5)
  assert 0.2 < precision < 0.9 and 0.1 < recall < 0.9  # the check is not vacuous
  assert float(pr["precision"]) == pytest.approx(precision, abs=1e-6)
  assert float(pr["recall"]) == pytest.approx(recall, abs=1e-6)
  assert float(dc["density"]) == pytest.approx(density, abs=1e-6)
  assert float(dc["coverage"]) == pytest.approx(coverage, abs=1e-6)


def test_image_metric_errors():
  with pytest.raises(ValueError, match="num_splits"):
    metrics.inception_score(np.zeros((20, 3)), num_splits=0)
  with pytest.raises(ValueError, match="same d"):
    metrics.precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
  with pytest.raises(ValueError, match="rng"):
    metrics.kernel_inception_distance(np.zeros((10, 3)), np.zeros((10, 3)), rng=0)
