"""experiments/evaluate on random images with random Inception weights in .npz form (no torch):
the JSON's FID equals the Frechet distance recomputed from the same network's features."""

import json

import numpy as np
import pytest

import jax

from diffdistill import metrics
from diffdistill.metrics import inception as inception_eval
from diffdistill.nets import inception as inception_net
from experiments.evaluate import main as evaluate_main


def _random_weights(rng):
  """He-scaled random weights with pytorch-fid's keys, built without compiling the network."""
  shapes = jax.eval_shape(inception_net.init_variables, jax.random.key(0))
  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    return {"scale": 1.0, "var": 1.0}.get(name, 0.0) + 0.1 * rng.uniform(size=leaf.shape)
  return jax.tree_util.tree_map_with_path(draw, shapes)


# Compiling Inception-v3 for 8 simulated devices takes minutes on 2 loaded cores.
@pytest.mark.slow
def test_evaluate_command_on_random_images(tmp_path):
  rng = np.random.default_rng(0)
  variables = _random_weights(rng)
  np.savez(tmp_path / "inception.npz", **inception_net.state_dict_from_variables(variables))
  real = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
  np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=real, mu=np.zeros(2048), sigma=np.eye(2048))
  samples = tmp_path / "samples"
  samples.mkdir()
  fake = rng.uniform(-1, 1, (10, 16, 16, 3)).astype(np.float32)
  np.savez(samples / "nfe1.npz", samples=fake)
  out = evaluate_main.evaluate(samples=str(samples), reference=str(tmp_path / "VIRTUAL_ref.npz"),
                               inception=str(tmp_path / "inception.npz"), batch_size=8,
                               num_feature_samples=12, is_splits=2, kid_subsets=3,
                               kid_subset_size=5)
  written = json.loads((samples / "evaluate.json").read_text())
  assert written["results"] == out["results"]
  row = out["results"]["nfe1.npz"]
  assert row["num_samples"] == 10 and row["num_feature_samples"] == [12, 10]
  loaded = inception_net.load_inception(str(tmp_path / "inception.npz"))
  outs = list(inception_eval.inception_outputs(loaded, fake, batch_size=8))  # the same compilation
  keep = np.concatenate([np.asarray(m) for _, _, m in outs]) > 0
  pool3 = np.concatenate([np.asarray(p, np.float64) for p, _, _ in outs])[keep]
  logits = np.concatenate([np.asarray(lg) for _, lg, _ in outs])[keep]
  assert len(pool3) == 10
  expected = metrics.frechet_distance_float64(pool3.mean(0), np.cov(pool3, rowvar=False),
                                              np.zeros(2048), np.eye(2048))
  # 10 samples of 2048-D features: 2039 null eigenvalues, each float32 rounding of the streamed sums
  # enters tr(S^1/2) as sqrt(rounding); np.cov of float64 features has none. Measured 1.3e-5.
  assert row["fid"] == pytest.approx(expected, rel=1e-4)
  assert row["is_mean"] == pytest.approx(float(metrics.inception_score(logits, num_splits=2)[0]),
                                         rel=1e-5)
  # --statistics_out: the reference statistics of real images, with the same network
  written = evaluate_main.write_statistics(samples=str(tmp_path / "VIRTUAL_ref.npz"),
                                           inception=str(tmp_path / "inception.npz"),
                                           output=str(tmp_path / "stats.npz"), batch_size=8)
  assert written["num_samples"] == 12
  outs = list(inception_eval.inception_outputs(loaded, real, batch_size=8))
  keep = np.concatenate([np.asarray(m) for _, _, m in outs]) > 0
  feats = np.concatenate([np.asarray(p, np.float64) for p, _, _ in outs])[keep]
  mu, sigma = metrics.load_statistics(str(tmp_path / "stats.npz"))
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="statistics_out must end in .npz"):
    evaluate_main.write_statistics(samples=str(tmp_path / "VIRTUAL_ref.npz"),
                                   inception=str(tmp_path / "inception.npz"),
                                   output=str(tmp_path / "stats.pkl"))
  for key in ("precision", "recall", "kid_mean", "kid_std"):
    assert np.isfinite(row[key])
