"""A TF-free input pipeline: seeded per-epoch shuffling, per-process shards, batches, exact resume.

The data is one infinite stream: epoch e is the permutation P_e = Permutation(PCG64([seed, e])) of
the n record numbers, and the stream is P_0 ++ P_1 ++ ... (batches run across epoch ends, so every
example appears exactly once in each epoch's n consecutive stream positions). Global batch s holds
stream positions s*B ... s*B + B - 1, so position p is example P_{p // n}[p mod n]: any step is
computed from (seed, step) alone, in O(1) plus one permutation of n, never by replaying.

Process i of P reads only rows i*B/P ... (i+1)*B/P - 1 of each global batch (a contiguous block,
the layout `jax.make_array_from_process_local_data` expects), so the processes' shards are disjoint
and concatenate, in process order, to the single-process global batch. The state {"step": s} is the
number of global batches consumed; it does not depend on the number of processes, so a run may
resume on a different process count.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Iterator

import numpy as np

from diffdistill import _validate
from diffdistill.data import _checks
from diffdistill.data import sources as sources_lib


class Pipeline(Iterator[dict[str, np.ndarray]]):
  """Infinite iterator of this process's batches {"x": float32 [b, ...], "label": int32 [b], "index": int64 [b]}.

  b = batch_size // process_count; "index" is the record number of each example in its split,
  "label" is present where the dataset has labels.

  Args:
    source: a random-access `sources.Source` (len and read(indices)).
    batch_size: the GLOBAL batch size B (all processes together).
    seed: non-negative int; the shuffle of epoch e is drawn from PCG64([seed, e]).
    process_index, process_count: this process and the number of processes.
    prefetch: batches prepared ahead in one background thread (0: read on demand); None: 2 when
      reading from files, 0 for a split in memory (a gather there takes ~0.1 ms; see
      bench/data_pipeline.md).
  """

  def __init__(self, source: sources_lib.Source, *, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, prefetch: int | None = None):
    seed, batch_size, process_index, process_count = _checks.checked_layout(
        source, seed=seed, batch_size=batch_size, process_index=process_index,
        process_count=process_count)
    if prefetch is None:
      prefetch = 0 if source.arrays is not None else 2
    prefetch = _validate.check_int("prefetch", prefetch, min=0)
    self.source = source
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.local_batch_size = self.batch_size // self.process_count
    self._prefetch = int(prefetch)
    self._step = 0
    self._permutations: dict[int, np.ndarray] = {}  # The last two epochs used.
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1) if prefetch else None
    self._pending: collections.deque[tuple[int, concurrent.futures.Future]] = collections.deque()

  @property
  def num_examples(self) -> int:
    """n, the number of examples in the split (one epoch)."""
    return len(self.source)

  @property
  def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each entry of this process's batches, known before reading any."""
    b = self.local_batch_size
    spec = {"x": ((b, *self.source.example_shape), np.dtype(np.float32))}
    if self.source.label_key is not None:
      spec["label"] = ((b,), np.dtype(np.int32))
    for key in self.source.extra_keys:
      spec[key] = ((b, *self.source.example_shape), np.dtype(np.float32))
    spec["index"] = ((b,), np.dtype(np.int64))
    return spec

  def permutation(self, epoch: int) -> np.ndarray:
    """P_epoch, [n] int64: the order of the record numbers in `epoch`."""
    perm = self._permutations.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples).astype(np.int64)
      self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1} | {epoch: perm}
    return perm

  def indices(self, step: int) -> np.ndarray:
    """Record numbers of this process's rows of global batch `step`, [b] int64."""
    start = step * self.batch_size + self.process_index * self.local_batch_size
    pos = start + np.arange(self.local_batch_size, dtype=np.int64)  # [b] stream positions
    epoch, offset = np.divmod(pos, self.num_examples)
    out = np.empty_like(pos)
    for e in np.unique(epoch):  # One or a few epochs per batch.
      sel = epoch == e
      out[sel] = self.permutation(int(e))[offset[sel]]
    return out

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step` (a pure function of step)."""
    index = self.indices(step)
    out = self.source.read(index)
    out["index"] = index
    return out

  def __iter__(self) -> "Pipeline":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._executor is None:
      out = self.batch(self._step)
    else:
      next_step = self._pending[-1][0] + 1 if self._pending else self._step
      while len(self._pending) < self._prefetch + 1:
        self._pending.append((next_step, self._executor.submit(self.batch, next_step)))
        next_step += 1
      out = self._pending.popleft()[1].result()
    self._step += 1
    return out

  def get_state(self) -> dict[str, Any]:
    """The position, JSON-serialisable: {"step": global batches consumed, plus what must match}."""
    return {"step": self._step, "seed": self.seed, "batch_size": self.batch_size,
            "dataset": self.source.name, "split": self.source.split, "num_examples": self.num_examples}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (from `get_state`): the next batch is the one after state["step"]."""
    step = _checks.checked_step(state, self.get_state(), pipeline="native")
    self._cancel_pending()
    self._step = step

  def _cancel_pending(self) -> None:
    for _, future in self._pending:
      future.cancel()
    self._pending.clear()

  def close(self) -> None:
    """Stops the prefetch thread."""
    self._cancel_pending()
    if self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=True)
      self._executor = None

  def __enter__(self) -> "Pipeline":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


PIPELINES = ("native", "grain")


def get_dataset(name: str, *, split: str, batch_size: int, seed: int, data_dir: str | None = None,
                process_index: int = 0, process_count: int = 1, prefetch: int | None = None, download: bool = True,
                num_examples: int | None = None, in_memory: bool | None = None,
                pipeline: str = "native", workers: int = 0) -> Pipeline:
  """The batches of `split` of dataset `name` for this process, shuffled, repeated forever, resumable.

  Args:
    name: an embedded dataset (`sources.EMBEDDED_NAMES`: 'toy2d/ring', 'toy2d/grid', 'toy2d/moons',
      'toy2d/spirals', 'gmm/ring2d', 'gmm/grid2d', 'gmm/mixture64', 'digits8'), a real TFDS dataset
      (`sources.REAL_NAMES`: 'cifar10', 'mnist', 'imagenet_resized/64x64'), or 'tfds:NAME'.
    split: 'train', 'test', or any split (or TFDS slice) the dataset has.
    batch_size: the GLOBAL batch size; each process gets batch_size // process_count rows.
    seed: the shuffling seed (non-negative int).
    data_dir: the TFDS data directory; default $DIFFDISTILL_DATA_DIR, $TFDS_DATA_DIR or
      ~/tensorflow_datasets. Embedded datasets are generated there on first use.
    process_index, process_count: this process among all (`jax.process_index()`, `jax.process_count()`).
    prefetch: batches read ahead in a background thread (0: none; None: 2 when reading from files,
      0 in memory).
    download: real datasets only: download and prepare if missing (else FileNotFoundError).
    num_examples: toy2d/gmm only: the number of training examples to generate (default 100k).
    in_memory: decode the split into arrays once (True), read every batch from the files (False), or
      decide by size (None: in memory up to `sources.IN_MEMORY_MAX_BYTES`, e.g. cifar10 but not
      imagenet_resized). The batches are the same either way.
    pipeline: 'native' (`Pipeline`, this module) or 'grain' (`grain_pipeline.GrainPipeline`: the
      same contract on grain's datasets, with `workers` processes; another order).
    workers: grain only: worker processes for reading / decoding (0: none).

  Returns:
    A `Pipeline`: an infinite iterator of {"x": float32 [b, ...], "label": int32 [b] (where the dataset
    has labels), "index": int64 [b] (record number in the split)}, with get_state()/set_state().
  """
  if pipeline not in PIPELINES:
    raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}.")
  if workers and pipeline != "grain":
    raise ValueError(f"workers={workers} needs pipeline='grain' (the native pipeline reads in one "
                     "background thread: prefetch).")
  source = sources_lib.load(name, split=split, data_dir=data_dir, download=download, num_examples=num_examples,
                            in_memory=in_memory)
  if pipeline == "grain":
    from diffdistill.data import grain_pipeline  # noqa: PLC0415 (grain only when asked for)
    return grain_pipeline.GrainPipeline(source, batch_size=batch_size, seed=seed,
                                        process_index=process_index, process_count=process_count,
                                        prefetch=prefetch, workers=workers)
  return Pipeline(source, batch_size=batch_size, seed=seed, process_index=process_index,
                  process_count=process_count, prefetch=prefetch)
