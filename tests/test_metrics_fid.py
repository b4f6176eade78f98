"""FID's pieces: the float64 Frechet distance against scipy's sqrtm on ill-conditioned covariances,
streaming moments (batched, sharded over 8 devices) against numpy on all samples at once, and the
reference-statistics formats."""

import pickle

import numpy as np
import pytest
import scipy.linalg

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffdistill import metrics


def _scipy_fid(mu1, s1, mu2, s2):
  """pytorch-fid's formula: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), real part."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _ill_conditioned(rng, d, cond):
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return (q * np.logspace(0, -np.log10(cond), d)) @ q.T


@pytest.mark.parametrize("cond", [1e2, 1e8, 1e12])
def test_frechet_float64_matches_scipy_sqrtm(cond):
  rng = np.random.default_rng(0)
  d = 64
  s1, s2 = _ill_conditioned(rng, d, cond), _ill_conditioned(rng, d, cond)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  ours = metrics.frechet_distance_float64(mu1, s1, mu2, s2)
  assert ours == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)


def test_frechet_rank_deficient_covariance_from_few_samples():
  # N < d, as with FID on a handful of samples: both covariances are singular.
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(20, 48)), rng.normal(size=(30, 48)) + 0.3
  mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
  mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
  assert metrics.frechet_distance_float64(mu1, s1, mu2, s2) == pytest.approx(
      _scipy_fid(mu1, s1, mu2, s2), rel=1e-6)


def test_streaming_moments_sharded_match_numpy():
  rng = np.random.default_rng(2)
  d = 16
  # A large common offset: the raw second moment would cancel, the shifted one does not.
  data = (rng.normal(size=(203, d)) @ rng.normal(size=(d, d)) + 100.0).astype(np.float32)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  assert mesh.size == 8
  moments = metrics.StreamingMoments()
  batch = 32
  for start in range(0, len(data), batch):
    x = data[start:start + batch]
    n = len(x)
    pad = -n % mesh.size
    xp = np.concatenate([x, np.zeros((pad, d), np.float32)])
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    shard = NamedSharding(mesh, P("data"))
    moments.update(jax.device_put(xp, shard), mask=jax.device_put(mask, shard))
  mu, sigma = moments.statistics()
  assert moments.count == len(data)
  ref = data.astype(np.float64)
  np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-4,
                             atol=1e-5 * np.abs(np.cov(ref, rowvar=False)).max())


def test_streaming_moments_errors():
  m = metrics.StreamingMoments()
  with pytest.raises(ValueError, match="at least 2"):
    m.statistics()
  m.update(jnp.ones((3, 4)))
  with pytest.raises(ValueError, match="d = 4"):
    m.update(jnp.ones((3, 5)))
  with pytest.raises(ValueError, match=r"\[B, d\]"):
    m.update(jnp.ones((3,)))


def test_reference_statistics_formats(tmp_path):
  rng = np.random.default_rng(3)
  mu, sigma = rng.normal(size=8), np.cov(rng.normal(size=(20, 8)), rowvar=False)
  metrics.save_statistics(tmp_path / "pytorch_fid.npz", mu, sigma)  # pytorch-fid, EDM's .npz
  np.savez(tmp_path / "VIRTUAL_adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu,
           sigma=sigma, mu_s=mu[:4], sigma_s=sigma[:4, :4])  # ADM's reference batch
  with open(tmp_path / "edm.pkl", "wb") as f:
    pickle.dump({"mu": mu, "sigma": sigma}, f)
  for name in ("pytorch_fid.npz", "VIRTUAL_adm.npz", "edm.pkl"):
    m, s = metrics.load_statistics(str(tmp_path / name))
    np.testing.assert_array_equal(m, mu)
    np.testing.assert_array_equal(s, sigma)
  with open(tmp_path / "code.pkl", "wb") as f:
    pickle.dump({"mu": mu, "sigma": sigma, "f": print}, f)
  with pytest.raises(ValueError, match="only a dict of numpy arrays"):
    metrics.load_statistics(str(tmp_path / "code.pkl"))
  np.savez(tmp_path / "images.npz", arr_0=np.zeros(3))
  with pytest.raises(ValueError, match="no mu and sigma"):
    metrics.load_statistics(str(tmp_path / "images.npz"))
  with pytest.raises(FileNotFoundError, match="reference statistics"):
    metrics.load_statistics(str(tmp_path / "missing.npz"))
