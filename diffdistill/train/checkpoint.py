"""Checkpoints of the full training state and the data position, on orbax's CheckpointManager.

Layout: `<directory>/<step>/state` (the TrainState pytree: step, params, opt_state, EMA params,
rng, counters) and `<directory>/<step>/data` (JSON: every process's data-iterator state, keyed
"process_<i>"). Saves are asynchronous (orbax copies the arrays to host before `save` returns,
so the caller may donate them right after) and only the last `max_to_keep` are kept.

Resume order (`Checkpointer.restore_latest`), newest step first:
  1. read the step's metadata; unreadable or empty (`_METADATA` deleted) -> try the next older
     step (step 3 then reports it as damaged);
  2. compare its leaf names, shapes and dtypes with the abstract state of the model being
     built; any difference -> `CheckpointMismatchError` (another model's checkpoint is a
     configuration error, never "corruption", so it is not skipped);
  3. restore arrays and data position; failure (truncated or half-written files) -> warn,
     move the step to `<directory>.corrupt/<step>` so a later save can reuse the number, and
     try the next older step.
Steps 1-2 read metadata only: no compilation, nothing written. Orbax's own warnings about a
damaged step (absl, "Metadata file does not exist", ...) are held back while steps are tried:
the one line per damaged step above says it. When a restore fails, TensorStore reads still in
flight finish after orbax's event loop closed, and each one's callback raises "Event loop is
closed" (a traceback per array, 174 for the teacher trainer), and asyncio logs each read's
"Task exception was never retrieved": from the first look at the steps on, exactly these
reports are dropped (`sys.unraisablehook`, a filter on the asyncio logger); they only ever
concern a step whose read already failed. Orbax writes each save into a
temporary folder renamed on completion, so a save killed midway never appears as a step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import traceback
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PyTree = Any


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a different model (other leaves, shapes or dtypes)."""


def _leaf_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def _signature(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_leaf_name(p): (tuple(x.shape), np.dtype(x.dtype).name) for p, x in leaves}


def _diff(saved: dict, expected: dict, limit: int = 6) -> str:
  # the params leaves first (players.<name>.params.*), then EMA copies and optimizer state
  order = lambda keys: sorted(keys, key=lambda k: (".params." not in f".{k}", k))  # noqa: E731
  lines = [f"  {k}: checkpoint {saved[k]} vs model {expected[k]}"
           for k in order(saved.keys() & expected.keys()) if saved[k] != expected[k]]
  lines += [f"  missing in checkpoint: {k} {expected[k]}" for k in order(expected.keys() - saved.keys())]
  lines += [f"  only in checkpoint: {k} {saved[k]}" for k in order(saved.keys() - expected.keys())]
  more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
  return "\n".join(lines[:limit]) + more


def _short(e: BaseException, limit: int = 160) -> str:
  """An exception as one short line: its type and the first line of its message (orbax and
  TensorStore errors carry tens of lines of spec)."""
  first = (str(e).strip().splitlines() or [""])[0]
  first = first if len(first) <= limit else first[:limit - 3] + "..."
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _gather_json(obj) -> dict[str, Any]:
  """{"process_<i>": obj of process i} on every process (a collective when multi-process)."""
  if jax.process_count() == 1:
    return {"process_0": obj}
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  length = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
  padded = np.zeros(length, np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded)  # [P, length]
  return {f"process_{i}": json.loads(bytes(r).rstrip(b"\0").decode()) for i, r in enumerate(rows)}


def _is_closed_loop_callback(unraisable) -> bool:
  """A callback scheduled on a closed asyncio loop (`call_soon_threadsafe` -> "Event loop is
  closed"): what TensorStore reports for each read of a failed restore that was still in flight."""
  if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != "Event loop is closed":
    return False
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return any(f.name == "call_soon_threadsafe" for f in frames)


def _is_unretrieved_restore(record: logging.LogRecord) -> bool:
  """asyncio's "Task exception was never retrieved" for an orbax array read of a failed restore."""
  message = record.getMessage()
  return message.startswith("Task exception was never retrieved") and "deserialize" in message


def _quiet_failed_reads() -> None:
  """Installs (once) a `sys.unraisablehook` that drops `_is_closed_loop_callback` reports and a
  filter on the asyncio logger that drops `_is_unretrieved_restore` records."""
  previous = sys.unraisablehook
  if not getattr(previous, "drops_closed_loop_callbacks", False):
    def hook(unraisable):
      if not _is_closed_loop_callback(unraisable):
        previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook
  asyncio_logger = logging.getLogger("asyncio")
  if _keep_record not in asyncio_logger.filters:
    asyncio_logger.addFilter(_keep_record)


def _keep_record(record: logging.LogRecord) -> bool:
  return not _is_unretrieved_restore(record)


@contextlib.contextmanager
def _orbax_warnings_held_back():
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


class Checkpointer:
  """One workdir's checkpoints: `restore_latest`, `save`, `wait`, `close`.

      ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=3)
      restored = ckpt.restore_latest(abstract_state)  # None, or (state, data_state)
      ...
      ckpt.save(step, state, data_iter.get_state())   # async; returns at once
      ckpt.close()                                    # waits for pending saves

  Args:
    directory: where the step folders live (created at the first save, not before).
    max_to_keep: number of most recent checkpoints kept.
    async_save: write in a background thread (default); False blocks in `save`.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
    self.directory = os.path.abspath(directory)
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    self._manager = None

  def _open(self, *, create: bool) -> ocp.CheckpointManager | None:
    if self._manager is None:
      if not create and not os.path.isdir(self.directory):
        return None
      self._manager = ocp.CheckpointManager(
          self.directory, options=self._options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "data": ocp.JsonCheckpointHandler()})
    return self._manager

  def all_steps(self) -> list[int]:
    manager = self._open(create=False)
    return sorted(manager.all_steps()) if manager is not None else []

  def check_compatible(self, abstract_state: PyTree) -> None:
    """Raises CheckpointMismatchError if the newest readable checkpoint is of another model."""
    manager = self._open(create=False)
    if self.all_steps():  # before any read (metadata reads fail on truncated data too): the
      _quiet_failed_reads()  # reports start as orbax's loop closes, before the error returns
    for step in reversed(self.all_steps()):
      try:
        metadata = manager.item_metadata(step)["state"]
        saved = _signature(metadata)
        if not saved:  # orbax reads a step whose _METADATA is gone as an empty tree
          raise FileNotFoundError("no array metadata (_METADATA missing)")
      except Exception as e:  # noqa: BLE001 (any unreadable metadata means a damaged step)
        # restore_latest reports this step as damaged (one line) when it tries it
        logging.debug("checkpoint %s/%d: unreadable metadata (%s).", self.directory, step,
                      _short(e))
        continue
      expected = _signature(abstract_state)
      if saved != expected:
        raise CheckpointMismatchError(
            f"{self.directory}/{step} holds a checkpoint of a different model:\n"
            f"{_diff(saved, expected)}\nUse another --workdir or remove that one.")
      return

  def restore_latest(self, abstract_state: PyTree) -> tuple[PyTree, dict] | None:
    """The newest complete checkpoint as (state, this process's data state), or None.

    `abstract_state` is `jax.eval_shape` of the state (leaves may carry `.sharding`, which
    the restored arrays then get).
    """
    with _orbax_warnings_held_back():
      return self._restore_latest(abstract_state)

  def _restore_latest(self, abstract_state: PyTree) -> tuple[PyTree, dict] | None:
    self.check_compatible(abstract_state)
    manager = self._open(create=False)
    steps = list(reversed(self.all_steps()))
    for i, step in enumerate(steps):
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        data = restored["data"][f"process_{jax.process_index()}"]
      except Exception as e:  # noqa: BLE001 (a damaged step of any kind is skipped)
        fallback = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "starting afresh"
        logging.warning("checkpoint step %d in %s is damaged (%s); moved to %s.corrupt/, %s.",
                        step, self.directory, _short(e), self.directory, fallback)
        self._set_aside(step)
        continue
      return restored["state"], data
    return None

  def _set_aside(self, step: int) -> None:
    multi = jax.process_count() > 1
    if multi:
      multihost_utils.sync_global_devices(f"checkpoint set aside {step}")
    if jax.process_index() == 0:
      target = os.path.join(self.directory + ".corrupt", str(step))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if multi:
      multihost_utils.sync_global_devices(f"checkpoint set aside done {step}")
    self._manager.reload()

  def save(self, step: int, state: PyTree, data_state: Any) -> None:
    """Starts an async save of `state` and every process's `data_state` (a JSON object)."""
    manager = self._open(create=True)
    manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(_gather_json(data_state))),
        force=True)

  def wait(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None
