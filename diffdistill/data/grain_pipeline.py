"""The input pipeline on grain (Google's JAX data loader): `get_dataset(..., pipeline="grain")`.

The same contract as `pipeline.Pipeline` (an infinite iterator of this process's batches
{"x", "label", "index"}, `batch(step)`, `get_state()` / `set_state()`, `close()`), built from
grain's pieces:

    MapDataset.range(n).shuffle(seed).repeat()   # the example stream: every epoch a new
                                                 # permutation (grain reseeds each repeat)
      .batch(B)                                  # global batch s = stream positions sB ... sB+B-1
      .map(rows of this process -> source.read)  # one vectorised gather per batch
      .to_iter_dataset(ReadOptions(threads, prefetch))[.mp_prefetch(workers)]

grain does the shuffling, repetition, batching, the read-ahead threads and the worker processes
(decoding and augmentation of real images in parallel, beyond the GIL). What it lacks, kept from
the native pipeline: (1) process shards as contiguous row blocks of each global batch, so that the
processes' shards concatenate to the single-process batch (grain's own sharding strides over
examples); (2) a state that is one number, the global batches consumed: the map dataset is random
access, so `set_state` restarts grain's iterator at that batch, on any process count and any
number of workers (grain's iterator state after `mp_prefetch` is tied to the worker count).
The order differs from the native pipeline's (another permutation algorithm); each is
deterministic in its seed.

Workers are processes started by `spawn`: a script that uses them needs the
`if __name__ == "__main__":` guard, and the source must pickle (every `sources.Source` does).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from diffdistill import _validate
from diffdistill.data import _checks
from diffdistill.data import sources as sources_lib


def _rows(source, lo: int, b: int, global_indices) -> dict[str, np.ndarray]:
  index = np.asarray(global_indices, np.int64)[lo:lo + b]
  out = source.read(index)
  out["index"] = index
  return out


class GrainPipeline:
  """This process's batches from grain (module docstring); arguments as `pipeline.Pipeline`'s,
  plus workers (processes of `mp_prefetch`; 0: none) and read_threads (grain's read-ahead
  threads; prefetch is their buffer, in batches)."""

  def __init__(self, source: sources_lib.Source, *, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, prefetch: int | None = None,
               workers: int = 0, read_threads: int = 1):
    import grain  # noqa: PLC0415 (only when asked for)
    seed, batch_size, process_index, process_count = _checks.checked_layout(
        source, seed=seed, batch_size=batch_size, process_index=process_index,
        process_count=process_count, max_seed=2**32 - 1)  # grain's seeds are 32-bit
    self.source = source
    self.batch_size, self.seed = batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = batch_size // process_count
    self._prefetch = _validate.check_int("prefetch", 2 if prefetch is None else prefetch, min=0)
    self._workers = _validate.check_int("workers", workers, min=0)
    self._threads = _validate.check_int("read_threads", read_threads, min=0)
    self._grain = grain
    self._dataset = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
                     .batch(batch_size)
                     .map(functools.partial(_rows, source, process_index * self.local_batch_size,
                                            self.local_batch_size)))
    self._step = 0
    self._iter = None

  @property
  def num_examples(self) -> int:
    return len(self.source)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step` (random access into the map dataset)."""
    return self._dataset[_validate.check_int("step", step, min=0)]

  def _start(self):
    ds = self._dataset[self._step:] if self._step else self._dataset
    it_ds = ds.to_iter_dataset(self._grain.ReadOptions(num_threads=self._threads,
                                                       prefetch_buffer_size=self._prefetch))
    if self._workers:
      # grain's workers read its absl flags (their defaults); outside an absl app (a notebook,
      # pytest) they are unparsed and reading them raises: mark them parsed with the defaults
      from absl import flags  # noqa: PLC0415
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      it_ds = it_ds.mp_prefetch(self._grain.MultiprocessingOptions(num_workers=self._workers))
    return iter(it_ds)

  def __iter__(self) -> "GrainPipeline":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iter is None:
      self._iter = self._start()
    out = next(self._iter)
    self._step += 1
    return out

  def get_state(self) -> dict[str, Any]:
    """{"step": global batches consumed, plus what must match on resume}: JSON-serialisable."""
    return {"step": self._step, "pipeline": "grain", "seed": self.seed,
            "batch_size": self.batch_size, "dataset": self.source.name,
            "split": self.source.split, "num_examples": self.num_examples}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (`get_state`): the next batch is global batch state["step"]."""
    step = _checks.checked_step(state, self.get_state(), pipeline="grain")
    self.close()
    self._step = step

  def close(self) -> None:
    """Stops grain's threads and worker processes (a later next() starts them again)."""
    it, self._iter = self._iter, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __enter__(self) -> "GrainPipeline":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


__all__ = ["GrainPipeline"]
