"""The Frechet distance between Gaussians, streaming feature moments, and FID reference statistics.

    FD(N(mu_x, S_x), N(mu_y, S_y)) = |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2)

FID is this distance between the pool3 features of Inception-v3 (nets.inception) on generated and
reference images, computed here in float64. Moments are accumulated over any number of samples in
batches (`StreamingMoments`): memory is O(d^2), independent of the sample count, and a batch may be
sharded over devices (the per-batch sums are one jitted, sharded reduction).

Reference statistics are read from the files users have (`load_statistics`):
  * pytorch-fid's `.npz` (keys mu, sigma), also what `save_statistics` writes;
  * EDM's reference `.npz` (keys mu, sigma; e.g. fid-refs/cifar10-32x32.npz) and a `.pkl` holding
    a dict with mu and sigma (read with a restricted unpickler that builds numpy arrays only);
  * ADM's reference batches (VIRTUAL_*.npz: mu, sigma, plus arr_0 images and mu_s / sigma_s).

References:
  Heusel et al., GANs Trained by a Two Time-Scale Update Rule (FID), NeurIPS 2017.
  Dowson & Landau, The Frechet distance between multivariate normal distributions, 1982.
"""

from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import _validate

Array = jax.Array


def _sqrtm_psd(c: Array) -> Array:
  s, u = jnp.linalg.eigh(0.5 * (c + c.T))
  return (u * jnp.sqrt(jnp.maximum(s, 0.0))) @ u.T


def _check_moments(mu_x, cov_x, mu_y, cov_y) -> None:
  mu_x, cov_x, mu_y, cov_y = (jnp.asarray(a) for a in (mu_x, cov_x, mu_y, cov_y))
  d = mu_x.shape[-1] if mu_x.ndim == 1 else None
  if d is None or mu_y.shape != (d,) or cov_x.shape != (d, d) or cov_y.shape != (d, d):
    raise ValueError(f"Need mu_x, mu_y of shape [d] and cov_x, cov_y of shape [d, d]; got "
                     f"{mu_x.shape}, {cov_x.shape}, {mu_y.shape}, {cov_y.shape}.")
  for name, c in (("cov_x", cov_x), ("cov_y", cov_y)):
    if not _validate.is_concrete(c):
      continue
    c = np.asarray(c, np.float64)
    scale = max(float(np.max(np.abs(c))), 1e-30) if c.size else 1.0
    if not np.all(np.isfinite(c)):
      raise ValueError(f"{name} must be finite.")
    if not np.allclose(c, c.T, rtol=0.0, atol=1e-4 * scale):
      raise ValueError(f"{name} must be a symmetric covariance matrix; it is not symmetric.")
    # Sample covariances in float32 have eigenvalues a little below 0 where they are singular.
    smallest = float(np.linalg.eigvalsh(0.5 * (c + c.T)).min()) if c.size else 0.0
    if smallest < -1e-4 * scale:
      raise ValueError(f"{name} must be positive semi-definite (a covariance); its smallest "
                       f"eigenvalue is {smallest:.3g}.")


def frechet_distance_from_moments(mu_x: Array, cov_x: Array, mu_y: Array, cov_y: Array) -> Array:
  """Frechet distance between N(mu_x, cov_x) and N(mu_y, cov_y).

  tr((S_x S_y)^1/2) is computed as sum sqrt(eig(S_x^1/2 S_y S_x^1/2)): symmetric PSD
  eigenproblems only, so no complex parts or scipy round-trips (FID's usual failure modes).
  cov_x and cov_y must be symmetric positive semi-definite: checked where concrete (a traced
  indefinite matrix gives a meaningless number).
  """
  _check_moments(mu_x, cov_x, mu_y, cov_y)
  return _frechet_from_moments(mu_x, cov_x, mu_y, cov_y)


@jax.jit
def _frechet_from_moments(mu_x, cov_x, mu_y, cov_y):
  root = _sqrtm_psd(cov_x)
  m = root @ cov_y @ root
  tr_sqrt = jnp.sum(jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(0.5 * (m + m.T)), 0.0)))
  diff = mu_x - mu_y
  return diff @ diff + jnp.trace(cov_x) + jnp.trace(cov_y) - 2.0 * tr_sqrt




def frechet_distance_float64(mu_x, cov_x, mu_y, cov_y) -> float:
  """`frechet_distance_from_moments` in float64 (whatever the global precision), as a Python
  float: FID's convention (pytorch-fid, EDM and ADM all compute it in float64 numpy)."""
  args = [np.asarray(a, np.float64) for a in (mu_x, cov_x, mu_y, cov_y)]
  with jax.enable_x64(True):
    return float(frechet_distance_from_moments(*args))


@jax.jit
def _shifted_sums(x: Array, shift: Array, mask: Array) -> tuple[Array, Array]:
  """sum_i m_i (x_i - c) [d] and sum_i m_i (x_i - c)(x_i - c)^T [d, d] over one batch."""
  xc = (x - shift) * mask[:, None]
  return jnp.sum(xc, axis=0), jnp.matmul(xc.T, xc, precision=jax.lax.Precision.HIGHEST)


class StreamingMoments:
  """Mean and unbiased covariance of features seen in batches, in O(d^2) memory.

      c = mean of the first batch (a fixed shift: the sums below stay small, so that
          S - n m m^T does not cancel catastrophically),
      s1 = sum_i (x_i - c),  s2 = sum_i (x_i - c)(x_i - c)^T        (float64, on the host)
      mean = c + s1 / n,     cov = (s2 - s1 s1^T / n) / (n - 1)

  Each batch's sums are one jitted reduction in the features' dtype (float32 on accelerators); a
  batch sharded over devices (e.g. on a mesh's data axis) is reduced where it lies and only the
  [d] and [d, d] sums come to the host. `mask` [B] (0/1) drops padded rows, so a batch padded to a
  multiple of the device count counts only its real rows.

      moments = StreamingMoments()
      for batch in batches:
        moments.update(features(batch))         # [B, d]
      mu, sigma = moments.statistics()          # float64 [d], [d, d]
  """

  def __init__(self):
    self.count = 0
    self._shift = None
    self._s1 = None
    self._s2 = None

  def update(self, features: Array, *, mask: Array | None = None) -> "StreamingMoments":
    if getattr(features, "ndim", None) != 2:
      raise ValueError(f"features must be [B, d], got shape {getattr(features, 'shape', None)}.")
    if self._shift is not None and features.shape[1] != self._shift.shape[0]:
      raise ValueError(f"features have d = {features.shape[1]}, earlier batches had "
                       f"d = {self._shift.shape[0]}.")
    if mask is None:
      mask = jnp.ones(features.shape[:1], features.dtype)
    elif tuple(mask.shape) != tuple(features.shape[:1]):
      raise ValueError(f"mask must be [B] = [{features.shape[0]}], got {tuple(mask.shape)}.")
    mask_host = np.asarray(mask, np.float64)
    n = float(mask_host.sum())
    if n == 0:
      return self
    if self._shift is None:
      host = np.asarray(features, np.float64)
      self._shift = (mask_host @ host) / n
      d = host.shape[1]
      self._s1, self._s2 = np.zeros(d), np.zeros((d, d))
    s1, s2 = _shifted_sums(features, jnp.asarray(self._shift, features.dtype),
                           jnp.asarray(mask, features.dtype))
    self._s1 += np.asarray(s1, np.float64)
    self._s2 += np.asarray(s2, np.float64)
    self.count += int(round(n))
    return self

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], unbiased covariance [d, d]), float64 numpy; needs at least 2 samples."""
    if self.count < 2:
      raise ValueError(f"StreamingMoments needs at least 2 samples, has {self.count}.")
    mean_c = self._s1 / self.count
    cov = (self._s2 - self.count * np.outer(mean_c, mean_c)) / (self.count - 1)
    return self._shift + mean_c, 0.5 * (cov + cov.T)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes pytorch-fid's statistics format: an .npz with mu [d] and sigma [d, d]."""
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


class _ArraysOnly(pickle.Unpickler):
  """Unpickles dicts, lists and numpy arrays only: a reference-statistics .pkl runs no code."""

  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise ValueError(f"the reference .pkl holds a {module}.{name}; only a dict of numpy arrays "
                     f"(mu, sigma) is read.")


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu [d], sigma [d, d]) float64 from a reference-statistics file (formats: module docstring)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No reference statistics at {path!r}. Use pytorch-fid's, EDM's "
                            f"(fid-refs/*.npz) or ADM's (VIRTUAL_*.npz) files, or write your own "
                            f"with `metrics.save_statistics`.")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files if k in ("mu", "sigma")}
      keys = f.files
  elif path.endswith(".pkl"):
    with open(path, "rb") as fh:
      data = _ArraysOnly(fh).load()
    keys = list(data) if isinstance(data, dict) else []
  else:
    raise ValueError(f"reference statistics {path!r} must be an .npz (pytorch-fid, EDM, ADM) or a "
                     f".pkl holding a dict with mu and sigma.")
  if not isinstance(data, dict) or "mu" not in data or "sigma" not in data:
    raise ValueError(f"{path} has no mu and sigma (keys: {sorted(keys)}); it is not an FID "
                     f"reference-statistics file.")
  mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path}: mu must be [d] and sigma [d, d], got {mu.shape} and {sigma.shape}.")
  return mu, sigma


__all__ = ["frechet_distance_from_moments", "frechet_distance_float64", "StreamingMoments",
           "save_statistics", "load_statistics"]
