"""`digits8`: scikit-learn's 8x8 handwritten digits as a TFDS builder (shipped with scikit-learn).

1797 grey images with values v in {0, ..., 16}, stored as x = v / 8 - 1 in [-1, 1], float32
[8, 8, 1] (NHWC), with int labels 0-9. The split is fixed: a permutation from seed 0, the first
1500 images for 'train', the other 297 for 'test'.

References:
  Alpaydin & Kaynak, Optical Recognition of Handwritten Digits, UCI ML Repository, 1998;
  Pedregosa et al., Scikit-learn, JMLR 2011 (`sklearn.datasets.load_digits`).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TRAIN = 1500


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The images x [n, 8, 8, 1] float32 in [-1, 1] and labels [n] int64 of one split."""
  from sklearn import datasets  # Heavy import, needed only while generating.
  digits = datasets.load_digits()
  x = (digits.images.astype(np.float64) / 8.0 - 1.0).astype(np.float32)[..., None]  # [1797, 8, 8, 1]
  order = np.random.default_rng(0).permutation(NUM_EXAMPLES)
  idx = {"train": order[:NUM_TRAIN], "test": order[NUM_TRAIN:]}[split]
  return x[idx], digits.target[idx].astype(np.int64)


class Digits8(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits as [-1, 1] float images with labels."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("x", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: the images ship with scikit-learn.
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    x, label = load_split(split)
    for i in range(x.shape[0]):
      yield i, {"x": x[i], "label": int(label[i])}
