"""Pieces shared by the embedded builders: the default data_dir and a NumPy mixture sampler.

Builders sample with NumPy (PCG64 from a fixed seed), not with jax.random: the generated files are
then the same bytes on every machine and backend (a GPU's normal sampler need not round like a
CPU's), and no accelerator is touched while a dataset is prepared.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re

import numpy as np

from diffdistill import analytic

DATA_DIR_ENV = "DIFFDISTILL_DATA_DIR"


def resolve_data_dir(data_dir: str | None) -> str:
  """data_dir if given, else $DIFFDISTILL_DATA_DIR, else $TFDS_DATA_DIR, else ~/tensorflow_datasets
  (TFDS's own default); `~` expanded."""
  if data_dir:
    return os.path.expanduser(data_dir)
  for var in (DATA_DIR_ENV, "TFDS_DATA_DIR"):
    if os.environ.get(var):
      return os.path.expanduser(os.environ[var])
  return os.path.expanduser("~/tensorflow_datasets")


@contextlib.contextmanager
def preparation_lock(data_dir: str, name: str):
  """Holds an exclusive lock on data_dir/.locks/NAME.lock while one process prepares `name`.

  TFDS writes a split into a temporary folder and renames it; two processes preparing the same
  dataset at once (several training processes on one machine) would collide at the rename
  (FileExistsError). With the lock, the first prepares and the others then find it prepared.
  """
  lock_dir = os.path.join(data_dir, ".locks")
  os.makedirs(lock_dir, exist_ok=True)
  with open(os.path.join(lock_dir, re.sub(r"[^\w.-]", "_", name) + ".lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def sample_mixture(mix: analytic.GaussianMixture, rng: np.random.Generator,
                   n: int) -> tuple[np.ndarray, np.ndarray]:
  """n samples of p0 = sum_k pi_k N(mu_k, U_k diag(s_k) U_k^T), and their components.

  x = mu_k + U_k (sqrt(s_k) * z),  k ~ Categorical(pi),  z ~ N(0, I): the law `analytic.sample`
  draws, here with NumPy so that it also returns k.

  Returns:
    x: [n, d] float32; k: [n] int64.
  """
  weights = np.asarray(mix.weights, np.float64)
  k = rng.choice(weights.size, size=n, p=weights / weights.sum())
  z = rng.standard_normal((n, mix.dim)) * np.sqrt(np.asarray(mix.eigvals, np.float64))[k]  # [n, d]
  if mix.eigvecs is not None:
    z = np.einsum("nij,nj->ni", np.asarray(mix.eigvecs, np.float64)[k], z)
  return (np.asarray(mix.means, np.float64)[k] + z).astype(np.float32), k.astype(np.int64)
