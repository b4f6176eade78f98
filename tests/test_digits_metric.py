"""FD-digits and the digits IS (diffdistill/metrics/digits.py): the classifier learns digits8, the
Frechet distance is FID's formula on its features, and the metric orders sample sets as it must
(held-out digits < corrupted digits < one digit class)."""

import numpy as np
import pytest
import scipy.linalg

from diffdistill.data import digits8
from diffdistill.metrics import digits


@pytest.fixture(scope="module")
def trained():
  # fewer steps than the default 2000 (the test's budget); the classifier is already accurate
  return digits.train_classifier(seed=0, num_steps=400)


@pytest.fixture(scope="module")
def scorer(trained):
  return digits.DigitsScorer(trained[0])


def test_classifier_learns_digits(trained):
  _, info = trained
  assert info["test_accuracy"] >= 0.95, info


def test_frechet_is_fids_formula(trained, scorer):
  """FD-digits against a direct numpy / scipy transcription on the classifier's features."""
  params, _ = trained
  x_test = digits8.load_split("test")[0][:200]
  f_ref, _ = digits.classifier_outputs(params, digits8.load_split("train")[0])
  f, _ = digits.classifier_outputs(params, x_test)
  f, f_ref = f.astype(np.float64), f_ref.astype(np.float64)
  mu1, mu2 = f.mean(0), f_ref.mean(0)
  s1, s2 = np.cov(f, rowvar=False), np.cov(f_ref, rowvar=False)
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
  np.testing.assert_allclose(scorer.frechet(x_test), expected, rtol=1e-6)
  # [N, 64] vectors are the same images
  np.testing.assert_allclose(scorer.frechet(x_test.reshape(200, 64)), expected, rtol=1e-6)


def test_metric_orders_sample_sets(scorer):
  """Held-out digits score lowest; noise-corrupted digits worse as the noise grows; a single
  class (mode collapse) far worse, with an IS near 1 where real digits score near 10."""
  floor = scorer.floor(256, num_draws=5)
  x_test = digits8.load_split("test")[0][:256]
  rng = np.random.default_rng(0)
  noisy = [scorer.frechet(x_test + s * rng.standard_normal(x_test.shape).astype(np.float32))
           for s in (0.6, 1.0, 1.5)]
  x_train, y_train = digits8.load_split("train")
  one_class = scorer.score(x_train[y_train == 3])
  assert floor["fd_mean"] + 3 * floor["fd_std"] < noisy[0] < noisy[1] < noisy[2], (floor, noisy)
  assert one_class["fd_digits"] > 10 * floor["fd_mean"], (floor, one_class)
  assert floor["is_mean"] > 8.0 and one_class["is_digits"] < 1.5


def test_save_load_round_trip(trained, tmp_path):
  params, info = trained
  path = str(tmp_path / "clf.npz")
  digits.save_classifier(path, params, info)
  loaded, info2 = digits.load_classifier(path)
  assert info2 == info
  for layer in params:
    for name in params[layer]:
      np.testing.assert_array_equal(loaded[layer][name], params[layer][name])
  assert digits.classifier(path) is not None  # an existing file is loaded, not retrained
  with pytest.raises(FileNotFoundError, match="trains"):
    digits.load_classifier(str(tmp_path / "missing.npz"))
  np.savez(str(tmp_path / "other.npz"), info="{}", **{"dense/w": np.zeros((3, 3))})
  with pytest.raises(ValueError, match="not a digits classifier"):
    digits.load_classifier(str(tmp_path / "other.npz"))


def test_bad_input_is_named(scorer):
  with pytest.raises(ValueError, match="samples must be float digits8 images"):
    scorer.frechet(np.zeros((10, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="samples has non-finite"):
    scorer.frechet(np.full((10, 8, 8, 1), np.nan, np.float32))
  with pytest.raises(ValueError, match="n must be an integer <= 297"):
    scorer.floor(1000)
