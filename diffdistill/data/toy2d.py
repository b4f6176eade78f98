"""`toy2d`: 2-D toy distributions as a TFDS builder, generated locally (no download).

Configs (each a fixed number of examples from a fixed seed; features {"x": float32 [2],
"label": int}):

  ring     analytic.ring2d(): 8 Gaussians on the unit circle; label = component.
  grid     analytic.grid2d(): 8 Gaussians on the dark cells of a 4x4 checkerboard; label = component.
  moons    two interleaved half circles,
             outer: (cos u, sin u),  inner: (1 - cos u, 1/2 - sin u),  u ~ U[0, pi],
           shifted by (-1/2, -1/4) to be centred, plus N(0, noise^2 I); label = moon.
  spirals  two arms, x = (r cos(theta + pi a), r sin(theta + pi a)) * 1.5 / (3 pi),
           theta = 3 pi sqrt(v), r = theta, v ~ U[0, 1], plus N(0, noise^2 I); label = arm a.

ring and grid are samples of the analytic mixtures, so a model trained on them can be compared
with the exact teacher and its exact samples.

References:
  Pedregosa et al., Scikit-learn, JMLR 2011 (the moons construction, `make_moons`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from diffdistill import analytic
from diffdistill.data import _common

DISTRIBUTIONS = ("ring", "grid", "moons", "spirals")


@dataclasses.dataclass
class Toy2dConfig(tfds.core.BuilderConfig):
  """One distribution at one size. `name` is the config name; `distribution` what is sampled."""
  distribution: str = "ring"
  num_train: int = 100_000
  num_test: int = 10_000
  noise: float = 0.1
  seed: int = 0


def make_config(distribution: str, *, num_train: int = _common.DEFAULT_SIZES[0],
                num_test: int = _common.DEFAULT_SIZES[1]) -> Toy2dConfig:
  """A config; sizes other than the default get their own name (`ring-n512-64`), hence their own files."""
  name = _common.sized_config_name("toy2d", "distribution", distribution, DISTRIBUTIONS, num_train, num_test)
  noise = {"moons": 0.1, "spirals": 0.05}.get(distribution, 0.0)
  return Toy2dConfig(name=name, distribution=distribution, num_train=num_train, num_test=num_test,
                     noise=noise, description=f"{distribution}: {num_train} train / {num_test} test.")


def _moons(rng: np.random.Generator, n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
  label = rng.integers(0, 2, size=n)
  u = rng.uniform(0.0, np.pi, size=n)
  outer = np.stack([np.cos(u), np.sin(u)], axis=1)
  inner = np.stack([1.0 - np.cos(u), 0.5 - np.sin(u)], axis=1)
  x = np.where(label[:, None] == 0, outer, inner) + np.array([-0.5, -0.25])  # [n, 2]
  return x + noise * rng.standard_normal((n, 2)), label


def _spirals(rng: np.random.Generator, n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
  label = rng.integers(0, 2, size=n)
  theta = 3 * np.pi * np.sqrt(rng.uniform(size=n))
  phase = theta + np.pi * label
  x = theta[:, None] * np.stack([np.cos(phase), np.sin(phase)], axis=1) * (1.5 / (3 * np.pi))  # [n, 2]
  return x + noise * rng.standard_normal((n, 2)), label


def sample(config: Toy2dConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The examples of one split: x [n, 2] float32, label [n] int64 (a fresh seed per split)."""
  n, rng = _common.split_size_and_rng(config, split)
  if config.distribution in ("ring", "grid"):
    mix = analytic.ring2d() if config.distribution == "ring" else analytic.grid2d()
    return _common.sample_mixture(mix, rng, n)
  fn = _moons if config.distribution == "moons" else _spirals
  x, label = fn(rng, n, config.noise)
  return x.astype(np.float32), label.astype(np.int64)


NUM_CLASSES = {"ring": 8, "grid": 8, "moons": 2, "spirals": 2}


class Toy2d(tfds.core.GeneratorBasedBuilder):
  """2-D toy distributions (ring, grid, moons, spirals)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [make_config(d) for d in DISTRIBUTIONS]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES[self.builder_config.distribution]),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    x, label = sample(self.builder_config, split)
    for i in range(x.shape[0]):
      yield i, {"x": x[i], "label": int(label[i])}
