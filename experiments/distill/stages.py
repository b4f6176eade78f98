"""Runs a method's plan: its stages in order, each in `WORKDIR/<stage name>/` with its own
checkpoints. A killed run restarted with the same command skips the finished stages (restored from
their last checkpoint) and resumes the interrupted one where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import jax

from diffdistill.methods.plan import Plan, Results
from diffdistill.train import checkpoint as ckpt_lib
from diffdistill.train import loop, state as state_lib, step as step_lib


def _result(state: state_lib.TrainState, eval_ema: str | None) -> dict[str, Any]:
  out = {}
  for name, p in state.players.items():
    params = p.ema[eval_ema] if eval_ema and eval_ema in p.ema else p.params
    out[name] = jax.device_get(params)
  return out


def run_stages(plan: Plan, setup, workdir: str, *, progress: bool = True,
               hooks: Callable[[Any], Sequence[loop.Hook]] | None = None
               ) -> tuple[Results, dict]:
  """Trains every stage in order (resuming finished and interrupted ones); returns the results
  and per-stage stats {name: {steps, seconds, final metrics}}. `hooks(stage)` gives a stage's
  `loop.Hook`s (e.g. a measurement every k steps while it trains)."""
  config = setup.config
  results: Results = {}
  stats = {}
  steps = {}  # one jitted step per method: the rounds of a method share its compilation
  for index, stage in enumerate(plan.stages):
    stage_dir = stage.directory or os.path.join(workdir, stage.name)
    if stage.directory and stage.identity is not None:
      check_identity(stage_dir, stage.identity, stage.name)
    players = stage.players(results)
    frozen = stage.frozen(results)
    state = state_lib.TrainState.create(players=players,
                                        rng=jax.random.fold_in(jax.random.key(config.seed), index))
    stage.method.check(state.players, frozen)
    rep = step_lib.replicated(setup.mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            jax.eval_shape(lambda: state))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), max_to_keep=1)
    data = stage.data(results, stage_dir)
    try:
      restored = checkpointer.restore_latest(abstract)
      if restored is not None:
        state, data_state = restored
        if int(state.step) < stage.num_steps:  # a finished stage reads no more data: a shared
          data.set_state(data_state)  # copy fitted under another seed is reused as it is
      t0 = time.perf_counter()
      start = int(state.step)
      if start < stage.num_steps:
        if id(stage.method) not in steps:
          steps[id(stage.method)] = step_lib.make_step(stage.method, mesh=setup.mesh)
        train_step = steps[id(stage.method)]
        state = loop.run(state=state, train_step=train_step, data=data, mesh=setup.mesh,
                         workdir=stage_dir, num_steps=stage.num_steps, checkpointer=checkpointer,
                         log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                         progress=progress, tensorboard=False, frozen=frozen,
                         hooks=tuple(hooks(stage)) if hooks else ())
      seconds = time.perf_counter() - t0
    finally:
      checkpointer.close()
      getattr(data, "close", lambda: None)()
    results[stage.name] = _result(state, stage.eval_ema)
    last = _last_metrics(stage_dir)
    stats[stage.name] = {"steps": stage.num_steps, "trained_now": stage.num_steps - start,
                         "seconds": seconds, "final": last}
  return results, stats


def _plain(tree):
  """`tree` as JSON gives it back (tuples as lists, ConfigDicts as dicts), for comparison."""
  return json.loads(json.dumps(tree, sort_keys=True,
                               default=lambda v: v.to_dict() if hasattr(v, "to_dict") else str(v)))


def check_identity(stage_dir: str, identity: dict, name: str, *, record: bool = True) -> None:
  """A shared stage directory (e.g. `--config.copy.dir`) holds the result of one stage: records
  `identity` in STAGE_DIR/identity.json on first use, and refuses the directory when a later run
  needs another (a copy fitted to another teacher or schedule, or another network, would
  otherwise be read as this run's start). A directory from before identity.json was written is
  stamped with the first run that reads it. `record=False` only checks (writes nothing)."""
  path = os.path.join(stage_dir, "identity.json")
  want = _plain(identity)
  if os.path.exists(path):
    with open(path) as f:
      have = json.load(f)
    if have != want:
      h, w = _dotted(have), _dotted(want)
      differ = sorted(k for k in h.keys() | w.keys() if h.get(k) != w.get(k))
      raise ValueError(
          f"The shared {name} stage directory {stage_dir!r} was fitted for another run: "
          f"{', '.join(f'{k} there {h.get(k)!r}, here {w.get(k)!r}' for k in differ)}. "
          f"Give this run its own directory (e.g. --config.copy.dir=... for the copy).")
    return
  if not record:
    return
  os.makedirs(stage_dir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(want, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _dotted(identity: dict) -> dict:
  """{"section.key": value} of an identity's two levels."""
  return {f"{section}.{key}": v for section, sub in identity.items() for key, v in sub.items()}


def _last_metrics(stage_dir: str) -> dict:
  path = os.path.join(stage_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = f.read().strip().splitlines()
  return json.loads(lines[-1]) if lines else {}


__all__ = ["run_stages", "check_identity"]
