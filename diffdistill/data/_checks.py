"""The checks both input pipelines (`pipeline.Pipeline`, `grain_pipeline.GrainPipeline`) make of
their layout and of a saved state; a module of its own so that neither pipeline imports the other."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffdistill import _validate


def checked_layout(source, *, seed, batch_size, process_index, process_count,
                   max_seed: int | None = None) -> tuple[int, int, int, int]:
  """(seed, batch_size, process_index, process_count) as ints, checked: a non-empty split, a
  global batch that the process count divides; ValueError naming the argument otherwise."""
  if len(source) < 1:
    raise ValueError(f"The {source.name!r} split {source.split!r} is empty.")
  seed = _validate.check_int("seed", seed, min=0, max=max_seed)
  process_count = _validate.check_int("process_count", process_count, min=1)
  process_index = _validate.check_int("process_index", process_index, min=0, max=process_count - 1)
  batch_size = _validate.check_int("batch_size", batch_size, min=1)
  if batch_size % process_count:
    raise ValueError(f"batch_size (the global batch) = {batch_size} is not divisible by "
                     f"process_count = {process_count}.")
  return seed, batch_size, process_index, process_count


def checked_step(state: Any, mine: dict[str, Any], *, pipeline: str) -> int:
  """state["step"] of a `get_state()` dict, after checking that it was saved by a pipeline of
  kind `pipeline` ("native" where the key is absent) over the same data as `mine` says."""
  if not isinstance(state, dict) or "step" not in state:
    raise ValueError(f"state must be a dict from get_state() with a 'step', got {state!r}.")
  saved_by = state.get("pipeline", "native")
  if saved_by != pipeline:
    raise ValueError(f"state was saved by the {saved_by} pipeline, whose order differs: resume "
                     "with the pipeline that saved it.")
  mismatched = {k: (state[k], mine[k]) for k in mine
                if k not in ("step", "pipeline") and k in state and state[k] != mine[k]}
  if mismatched:
    raise ValueError(f"state was saved by another pipeline; (saved, this one): {mismatched}.")
  step = state["step"]
  if not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"state['step'] must be a non-negative int, got {step!r}.")
  return int(step)
