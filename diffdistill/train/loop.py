"""The training loop: steps, metrics, hooks (evaluation, sample figures), checkpoints.

    state = jax.device_put(state_or_restored_state, step_lib.replicated(mesh))
    state = loop.run(state=state, train_step=train_step, data=data_iter, mesh=mesh,
                     workdir=workdir, num_steps=config.num_steps, checkpointer=ckpt,
                     log_every=..., checkpoint_every=..., hooks=[loop.Hook(every, fn)],
                     frozen=frozen)          # teacher params etc. (train.step.make_step)

After step s (state.step == s), in this order: every hook due at s runs; the
metrics of step s, the hooks' scalars ("<hook name>/<key>") and the wall-clock steps_per_sec
since the previous line are logged as one line if
s % log_every == 0 or a hook ran; a checkpoint of (state, data position) is started if s % checkpoint_every == 0 or s ==
num_steps. The data iterator has then yielded exactly s batches, so a run restored from step s
(state and `data.set_state`) continues with the batches and randomness of an uninterrupted run.

Non-finite steps are skipped inside the step (`train.step`); when `max_nonfinite_in_row`
consecutive steps were skipped the loop raises `NonFiniteError` naming the step. The count is
read one step late, so the device keeps a step queued.

Ctrl-C (KeyboardInterrupt, or a stop requested through `train.interrupt.defer()`, checked before
every step and after the hooks) stops the loop after the pending checkpoint saves finish, and
raises `Interrupted`, whose message says which step was saved last and that the same command
resumes.

Only process 0 writes (metrics, TensorBoard, figures); every process runs the steps, the hooks
(which may run sharded computations) and the checkpoint saves (an orbax collective).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from diffdistill.train import distributed, interrupt, step as step_lib, writers
from diffdistill.train.checkpoint import Checkpointer
from diffdistill.train.state import TrainState


class NonFiniteError(FloatingPointError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class Interrupted(KeyboardInterrupt):
  """The run was interrupted (Ctrl-C); the message says what was saved and how to resume."""


def _loss_summary(metrics) -> str:
  """The loss (or each update's loss, for several players) as text."""
  if "loss" in metrics:
    return f"{float(metrics['loss']):.4g}"
  return " ".join(f"{k[:-5]}={float(v):.4g}" for k, v in metrics.items() if k.endswith("/loss"))


@dataclasses.dataclass(frozen=True)
class Hook:
  """Calls `fn(state, step)` after every `every`-th step (0: never) and, if `at_end`, after the
  last step; returned scalars are logged.

  `fn` runs on every process; one that writes files should do so when `distributed.is_writer()`.
  """
  every: int
  fn: Callable[[TrainState, int], Mapping[str, Any] | None]
  name: str = "hook"
  at_end: bool = False


def _check_nonfinite(metrics, step: int, limit: int) -> None:
  in_row = int(metrics["nonfinite_in_row"])
  if limit and in_row >= limit:
    raise NonFiniteError(
        f"{in_row} consecutive steps with a non-finite loss or gradient, the last at step {step} "
        f"(limit max_nonfinite_in_row={limit}); last loss {_loss_summary(metrics)}.")


def _check_frozen_finite(frozen) -> None:
  """Raises ValueError naming the first floating leaf of `frozen` with a NaN or inf: in the step
  it would give a non-finite loss at every step, each update skipped until
  `max_nonfinite_in_row` stops the run. Checked once, here, not in the jitted step."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(frozen)[0]:
    if not jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), np.inexact):
      continue
    bad = int(jax.device_get(jnp.size(leaf) - jnp.sum(jnp.isfinite(leaf))))
    if bad:
      raise ValueError(f"frozen{jax.tree_util.keystr(path)} holds {bad} non-finite value(s) (NaN "
                       f"or inf) of {np.size(leaf)}: the frozen inputs (teacher params, round "
                       "constants) must be finite; check the teacher's checkpoint.")


def run(*, state: TrainState, train_step: Callable, data: Iterator[Mapping[str, np.ndarray]],
        mesh: jax.sharding.Mesh, workdir: str, num_steps: int,
        checkpointer: Checkpointer | None = None, log_every: int = 100,
        checkpoint_every: int = 1000, hooks: Sequence[Hook] = (), max_nonfinite_in_row: int = 10,
        progress: bool = True, tensorboard: bool = True, frozen: Any = None) -> TrainState:
  """Trains from `state.step` to `num_steps`; returns the final state.

  Args:
    state: a fresh or restored state, placed on `mesh` (replicated).
    train_step: `train.step.make_train_step(...)`.
    data: this process's iterator of numpy batches (its rows of the global batch), with
      `get_state()` when checkpointing; already set to the restored position.
    mesh: the step's mesh.
    workdir: where metrics.jsonl, tensorboard/ and hook outputs go.
    num_steps: the step to stop at.
    checkpointer: None to never checkpoint.
    log_every, checkpoint_every: periods in steps (checkpoint_every 0: only at the end).
    hooks: evaluation / figure hooks.
    max_nonfinite_in_row: raise after this many consecutive skipped steps (0: never).
    progress: show a tqdm bar on process 0.
    tensorboard: also write TensorBoard scalars (metrics.jsonl is always written).
    frozen: the step's frozen inputs (teacher params, round constants), passed to every step;
      checked once, here, to be finite (ValueError naming the leaf).
  """
  if log_every < 1:
    raise ValueError(f"log_every must be >= 1, got {log_every}.")
  if frozen is not None:
    _check_frozen_finite(frozen)
  start = int(state.step)
  writer = writers.MetricsWriter(workdir, enabled=distributed.is_writer(), tensorboard=tensorboard)
  writer.truncate_after(start)
  bar = tqdm.tqdm(total=num_steps, initial=start, disable=not (progress and distributed.is_writer()),
                  dynamic_ncols=True)
  pending = None  # (step, metrics) of the previous step, for the lagged non-finite check
  done = start  # the last step whose update returned
  if frozen is not None:  # placed once, not transferred again at every step
    frozen = jax.device_put(frozen, getattr(train_step, "frozen_sharding", None)
                            or step_lib.replicated(mesh))
  last_log = (start, time.perf_counter())
  try:
    for s in range(start + 1, num_steps + 1):
      interrupt.check()
      batch = step_lib.global_batch(next(data), mesh=mesh)
      state, metrics = train_step(state, batch, frozen)
      done = s
      if pending is not None:
        _check_nonfinite(*pending, max_nonfinite_in_row)
      pending = (metrics, s)
      record = {}
      for hook in hooks:
        if (hook.every and s % hook.every == 0) or (hook.at_end and s == num_steps):
          record.update({f"{hook.name}/{k}": v for k, v in (hook.fn(state, s) or {}).items()})
          interrupt.check()
      if record or s % log_every == 0:  # one line per step: the step's metrics + hook outputs
        host = jax.device_get(metrics)
        now = time.perf_counter()
        record["steps_per_sec"] = (s - last_log[0]) / (now - last_log[1])  # hooks' time included
        last_log = (s, now)
        writer.write(s, {**host, **record})
        bar.set_postfix_str(f"loss {_loss_summary(host)}")
      if checkpointer is not None and (s == num_steps or (checkpoint_every and s % checkpoint_every == 0)):
        checkpointer.save(s, state, data.get_state())
      bar.update(1)
    if pending is not None:
      _check_nonfinite(*pending, max_nonfinite_in_row)
  except KeyboardInterrupt:
    bar.close()
    if checkpointer is not None:
      checkpointer.wait()
      steps = checkpointer.all_steps()
      saved = (f"the last checkpoint is step {steps[-1]} in {checkpointer.directory}; run the same "
               "command to resume from it" if steps else "no checkpoint was saved yet")
    else:
      saved = "this run keeps no checkpoints"
    raise Interrupted(f"Interrupted after step {done}: {saved}.") from None
  finally:
    bar.close()
    writer.close()
    if checkpointer is not None:
      checkpointer.wait()
  return state
