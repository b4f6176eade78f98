"""What a method module builds: a `Plan` of training `Stage`s and the `Student`s to sample.

A stage trains players with one `diffdistill.method.Method` for a number of steps. Its players
start from the results of earlier stages (a student from the teacher copy, a progressive
distillation round from the previous round), and its frozen inputs (teacher params, round
constants) are computed from them too. A runner (e.g. `experiments/distill`) trains the stages in
order, each with its own checkpoints, and hands every later stage the earlier ones' `Results`.

A student is a distilled sampler with the one few-step contract of the library,

    sample(params, x_T, *, nfe, rng=None, **cond) -> x_0

exactly `nfe` network calls, jit-able (nfe static), deterministic when `rng` is None; the family's
choice of times (multistep consistency sampling, MeanFlow's (r, t), shortcut's d, CTM's gamma)
lives inside. A combination it cannot meet exactly is a ValueError naming `nfe`.

Dependencies: the layers are `method` (no library imports) <- `losses` <- `methods` -> `train`.
A method module imports `train` (optim, state) because it creates its players (`make_player`: the
optimizer and EMAs of each network); `train` never imports `methods` or `losses`, so the losses
stay usable in one's own loop without the engine, and the engine runs any `Method`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any, Callable, Mapping

from diffdistill.method import Method
from diffdistill.train import optim, state as state_lib

Results = dict[str, Any]  # stage name -> {player name: params (the eval EMA where there is one)}


@dataclasses.dataclass
class Stage:
  """One training stage.

  players: results of the earlier stages -> {name: Player} (fresh players, optimizer included).
  frozen: results -> the frozen inputs of the method (None: none).
  data: (results, stage_dir) -> a resumable iterator of numpy batches (get_state / set_state).
  """
  name: str
  method: Method
  num_steps: int
  players: Callable[[Results], dict[str, state_lib.Player]]
  data: Callable[[Results, str], Any]
  frozen: Callable[[Results], Any] = lambda results: None
  eval_ema: str | None = "eval"  # the EMA copy reported as the stage's result (None: params)
  directory: str | None = None  # where it runs (default WORKDIR/<name>); shared copies set it
  # what makes a shared directory's result this stage's (teacher, schedule, network): the runner
  # records it there on first use and refuses a directory fitted for another
  identity: dict | None = None


@dataclasses.dataclass(frozen=True)
class Student:
  """A distilled sampler at one NFE: `params(results)` and `sample` (module docstring)."""
  name: str
  nfe: int
  params: Callable[[Results], Any]
  sample: Callable[..., Any] | None

  def run(self, params, x_start, rng=None, **cond):
    """The student's samples of x_start with its NFE (deterministic when rng is None); `cond`
    (e.g. label [N]) goes to its sampler."""
    return self.sample(params, x_start, nfe=self.nfe, rng=rng, **cond)


@dataclasses.dataclass
class Plan:
  stages: list[Stage]
  students: list[Student]
  notes: dict = dataclasses.field(default_factory=dict)  # extra numbers for results.json
  # a method that scores differently (e.g. conditional students): evaluate(plan, setup, results,
  # workdir, progress=) -> rows, and its own markdown table(rows); None: the runner's own
  evaluate: Callable | None = None
  table: Callable | None = None


@functools.lru_cache(maxsize=None)
def _optimizer(config_json: str, num_steps: int):
  return optim.make_optimizer(json.loads(config_json), num_steps=num_steps)


def make_player(config_optim, params, *, num_steps: int, ema: Mapping[str, Any] | None = None):
  """A fresh player. Equal optimizer settings give the same optax object: the optimizer is part
  of the state's static structure, so a new object would retrace the step at every round."""
  tx = _optimizer(json.dumps(dict(config_optim), sort_keys=True), int(num_steps))
  return state_lib.Player.create(params=params, tx=tx, ema=ema)


def check_nfe(name: str, nfe, accepted) -> int:
  """nfe as an int if it is one of `accepted` (a container), else ValueError naming both."""
  if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe not in accepted:
    raise ValueError(f"{name}'s sampler takes nfe in {accepted}, got {nfe!r}.")
  return nfe


def check_unconditional(name: str, cond: Mapping[str, Any]) -> None:
  """ValueError if conditioning is given to an unconditional student's sampler."""
  if cond:
    raise ValueError(f"{name}'s student is unconditional; got conditioning {sorted(cond)}.")


def file_name(name: str) -> str:
  """A student's name as a file name: runs of other characters than letters, digits, '-' and
  '_' become one '_' ("network copy + ipndm" -> "network_copy_ipndm")."""
  return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")


__all__ = ["check_unconditional", "file_name", "Results", "Stage", "Student", "Plan", "make_player", "check_nfe"]
