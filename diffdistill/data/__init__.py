"""TFDS datasets (array_record files, no TensorFlow) and a deterministic, shardable, resumable pipeline.

    ds = data.get_dataset("toy2d/ring", split="train", batch_size=256, seed=0)
    batch = next(ds)            # {"x": float32 [256, 2], "label": int32 [256], "index": int64 [256]}
    state = ds.get_state()      # {"step": 1, ...}, JSON-serialisable; ds.set_state(state) resumes

In-memory sources with the same protocol (exact samples of an analytic mixture, prior noise):
`data.MixtureBatches(mix, batch_size, seed)` and the rest of `data.batches`.
"""

from diffdistill.data.batches import Keys, Mapped, MixtureBatches, PriorNoise, SeededBatches
from diffdistill.data.pipeline import Pipeline, get_dataset
from diffdistill.data.sources import EMBEDDED_NAMES, REAL_NAMES, Source, load, valid_names

__all__ = ["MixtureBatches", "PriorNoise", "SeededBatches", "Keys", "Mapped", "Pipeline", "get_dataset", "Source", "load", "EMBEDDED_NAMES", "REAL_NAMES", "valid_names"]
