"""Generates the embedded datasets into a TFDS data_dir (no download, no TensorFlow).

    python -m diffdistill.data.prepare --data_dir=~/tensorflow_datasets
    python -m diffdistill.data.prepare --datasets=toy2d/ring,digits8 --data_dir=/tmp/tfds

Files go to DATA_DIR/<builder>/<config>/<version>/ (e.g. toy2d/ring/1.0.0/toy2d-train.array_record-00000-of-00001).
Datasets already there are left as they are. `get_dataset` also generates them on first use.
"""

from __future__ import annotations

from absl import app
from absl import flags

from diffdistill.data import _common
from diffdistill.data import sources

_DATASETS = flags.DEFINE_list("datasets", list(sources.EMBEDDED_NAMES), "Embedded datasets to generate.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir; default $DIFFDISTILL_DATA_DIR, "
                                "$TFDS_DATA_DIR or ~/tensorflow_datasets.")


def main(argv):
  del argv
  data_dir = _common.resolve_data_dir(_DATA_DIR.value)
  for name in _DATASETS.value:
    builder = sources.embedded_builder(name, data_dir=data_dir)
    sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(f"{name}: {sizes} in {builder.data_dir}")


if __name__ == "__main__":
  app.run(main)
