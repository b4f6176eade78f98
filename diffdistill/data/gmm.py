"""`gmm`: exact samples of the analytic Gaussian mixtures as a TFDS builder (no download).

Configs are the ready-made mixtures of `analytic.MIXTURES` ('ring2d', 'grid2d', 'mixture64');
features {"x": float32 [d], "label": int (the mixture component)}. The samples follow
x = mu_k + U_k (sqrt(s_k) * z), k ~ Categorical(pi), z ~ N(0, I) (`_common.sample_mixture`), so a
model trained here has a known exact denoiser, `analytic.denoiser(schedule)` with params
`analytic.get_mixture(config)`.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds

from diffdistill import analytic
from diffdistill.data import _common

MIXTURES = tuple(analytic.MIXTURES)


@dataclasses.dataclass
class GmmConfig(tfds.core.BuilderConfig):
  """One mixture at one size. `name` is the config name; `mixture` the `analytic.MIXTURES` key."""
  mixture: str = "mixture64"
  num_train: int = 100_000
  num_test: int = 10_000
  seed: int = 0


def make_config(mixture: str, *, num_train: int = _common.DEFAULT_SIZES[0],
                num_test: int = _common.DEFAULT_SIZES[1]) -> GmmConfig:
  """A config; sizes other than the default get their own name (`mixture64-n512-64`), hence their own files."""
  name = _common.sized_config_name("gmm", "mixture", mixture, MIXTURES, num_train, num_test)
  return GmmConfig(name=name, mixture=mixture, num_train=num_train, num_test=num_test,
                   description=f"analytic.{mixture}(): {num_train} train / {num_test} test samples.")


@functools.lru_cache(maxsize=None)
def _mixture(name: str) -> analytic.GaussianMixture:
  return analytic.get_mixture(name)  # mixture64 factors 16 64x64 covariances: build it once.


def sample(config: GmmConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The examples of one split: x [n, d] float32, component [n] int64 (a fresh seed per split)."""
  n, rng = _common.split_size_and_rng(config, split)
  return _common.sample_mixture(_mixture(config.mixture), rng, n)


class Gmm(tfds.core.GeneratorBasedBuilder):
  """Samples of the analytic Gaussian mixtures."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [make_config(m) for m in MIXTURES]

  def _info(self) -> tfds.core.DatasetInfo:
    mix = _mixture(self.builder_config.mixture)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(mix.dim,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=mix.num_components),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    x, label = sample(self.builder_config, split)
    for i in range(x.shape[0]):
      yield i, {"x": x[i], "label": int(label[i])}
