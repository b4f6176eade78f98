"""Pieces shared by the embedded builders: the default data_dir, config names and per-split
seeds for generated sizes, and a NumPy mixture sampler.

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
DEFAULT_SIZES = (100_000, 10_000)  # (train, test) examples of a generated dataset.
_SPLIT_STREAM = {"train": 0, "test": 1}


def sized_config_name(builder: str, arg: str, kind: str, kinds: tuple[str, ...], num_train: int,
                      num_test: int) -> str:
  """The config name of `kind` at a size: `kind` at DEFAULT_SIZES, else `kind-nTRAIN-TEST`, so that
  every size gets files of its own. Raises ValueError (naming `arg`) for an unknown kind, or for an
  empty split."""
  if kind not in kinds:
    raise ValueError(f"{builder}: {arg} must be one of {kinds}, got {kind!r}.")
  if num_train < 1 or num_test < 1:
    raise ValueError(f"{builder}: num_train and num_test must be >= 1, got {num_train}, {num_test}.")
  return kind if (num_train, num_test) == DEFAULT_SIZES else f"{kind}-n{num_train}-{num_test}"


def split_size_and_rng(config, split: str) -> tuple[int, np.random.Generator]:
  """(examples, generator) of one split of a generated config: PCG64 seeded by [seed, split
  stream], so train and test are independent and each is the same on every machine."""
  n = {"train": config.num_train, "test": config.num_test}[split]
  return n, np.random.default_rng([config.seed, _SPLIT_STREAM[split]])


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
