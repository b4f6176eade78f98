"""What a training method declares: its players' updates, their order and ratio, and their inputs.

This module depends on nothing else in the library (as optax keeps `GradientTransformation` in
its `base.py`): the loss factories in `losses/` build `Method`s, the method modules in `methods/`
compose them into stages, and `train.step.make_step` runs them, without `losses` importing
`train`. A distillation method's losses return a `Method`: one `Update` per player
loss, in the order the step runs them, each repeated `repeats` times per step (DMD2's k fake-score
updates per generator update), and for each loss where its extra inputs come from:

    Method(name="pd", updates=(
        Update(player="student", loss_fn=pd_loss_fn,
               inputs={"teacher_params": "frozen/teacher", "num_steps": "frozen/num_steps"}),))

A source is a path into what the step sees:

    frozen/<key>[/<key>...]           the `frozen` argument of the step: teacher params, the previous
                                      round's student, round constants (never differentiated)
    players/<name>/params             another player's (or this player's own) current params
    players/<name>/ema/<ema name>     an EMA copy (a consistency target, TRACT's self-teacher)
    step                              the global step (int32 scalar; curricula)

The loss is called `loss_fn(params, batch, rng, **inputs) -> (loss, aux)` and only `params` (the
updating player's) is differentiated; every input is a plain argument of the jitted step, so a
new teacher or a new round never recompiles and nothing is baked into the graph as a constant.
`ema` gives the EMA copies (name -> decay) the method needs on each player; the experiment adds
its own (e.g. an "eval" EMA) when it creates the players.

References:
  Yin et al., Improved Distribution Matching Distillation (DMD2), 2024 (two-time-scale updates);
  kvfrans shortcut-models (every method behind one small interface).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

SOURCE_ROOTS = ("frozen", "players", "step")


def check_source(path: str) -> tuple[str, ...]:
  """Splits and validates a source path (module docstring); ValueError naming the accepted forms."""
  parts = tuple(path.split("/")) if isinstance(path, str) else ()
  ok = bool(parts) and all(parts) and parts[0] in SOURCE_ROOTS and (
      (parts[0] == "step" and len(parts) == 1)
      or (parts[0] == "frozen" and len(parts) >= 2)
      or (parts[0] == "players" and (len(parts) == 3 and parts[2] == "params"
                                     or len(parts) == 4 and parts[2] == "ema")))
  if not ok:
    raise ValueError(f"Bad input source {path!r}; expected 'frozen/<key>', "
                     "'players/<name>/params', 'players/<name>/ema/<ema name>' or 'step'.")
  return parts


@dataclasses.dataclass(frozen=True)
class Update:
  """One player's loss in the step.

  player: the player whose params `loss_fn` differentiates.
  loss_fn: `loss_fn(params, batch, rng, **inputs) -> (scalar loss, aux dict)`.
  inputs: {keyword of loss_fn: source path} (module docstring).
  repeats: updates of this player per step, each with its own rng fold (the batch is shared).
  name: the metrics prefix (default: the player's name).
  group_size: the loss reads the batch as groups of `group_size` consecutive examples (IMM's
    particles, which share their times and are compared with each other): gradient
    accumulation then splits the batch between groups, never inside one, and the batch size
    must be a multiple of group_size x accumulation_steps. 1: examples are independent.
  """

  player: str
  loss_fn: Callable[..., Any]
  inputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
  repeats: int = 1
  name: str | None = None
  group_size: int = 1

  def __post_init__(self):
    if not isinstance(self.player, str) or not self.player:
      raise ValueError(f"Update.player must be a non-empty name, got {self.player!r}.")
    if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
      raise ValueError(f"Update.repeats must be an integer >= 1, got {self.repeats!r}.")
    if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
        or self.group_size < 1):
      raise ValueError(f"Update.group_size must be an integer >= 1, got {self.group_size!r}.")
    for key, path in self.inputs.items():
      if key in ("params", "batch", "rng"):
        raise ValueError(f"Update input {key!r} clashes with loss_fn's own arguments.")
      check_source(path)
    object.__setattr__(self, "inputs", dict(self.inputs))

  @property
  def label(self) -> str:
    return self.name or self.player


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method: its updates in order, and the EMA copies it needs on each player."""

  name: str
  updates: tuple[Update, ...]
  ema: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    updates = tuple(self.updates)
    if not updates:
      raise ValueError(f"Method {self.name!r} has no updates.")
    labels = [u.label for u in updates]
    if len(set(labels)) != len(labels):
      raise ValueError(f"Method {self.name!r}: update names must be distinct, got {labels} "
                       "(give Update.name to two updates of one player).")
    object.__setattr__(self, "updates", updates)

  @property
  def players(self) -> tuple[str, ...]:
    """The players that some update differentiates, in order of first update."""
    return tuple(dict.fromkeys(u.player for u in self.updates))

  @property
  def frozen_keys(self) -> tuple[str, ...]:
    """The top-level keys of `frozen` that the losses read."""
    keys = [check_source(p)[1] for u in self.updates for p in u.inputs.values()
            if p.startswith("frozen/")]
    return tuple(dict.fromkeys(keys))

  def check(self, players: Mapping[str, Any], frozen: Mapping[str, Any] | None) -> None:
    """Raises ValueError if a player, an EMA copy or a frozen input the method reads is missing."""
    for u in self.updates:
      if u.player not in players:
        raise ValueError(f"Method {self.name!r} updates player {u.player!r}, but the state has "
                         f"players {sorted(players)}.")
      for key, path in u.inputs.items():
        parts = check_source(path)
        if parts[0] == "players":
          if parts[1] not in players:
            raise ValueError(f"{u.label}: input {key!r} reads {path!r}, but the state has players "
                             f"{sorted(players)}.")
          if parts[2] == "ema" and parts[3] not in players[parts[1]].ema:
            raise ValueError(f"{u.label}: input {key!r} reads {path!r}, but player {parts[1]!r} "
                             f"has EMAs {sorted(players[parts[1]].ema)}.")
        elif parts[0] == "frozen":
          node = frozen or {}
          for i, p in enumerate(parts[1:]):
            if not isinstance(node, Mapping) or p not in node:
              have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
              raise ValueError(f"{u.label}: input {key!r} reads {path!r}, but frozen"
                               f"{''.join(f'[{q!r}]' for q in parts[1:i + 1])} has {have}.")
            node = node[p]


def resolve(path: str, *, frozen: Mapping[str, Any] | None, players: Mapping[str, Any], step):
  """The value at a source path (inside the step's trace)."""
  parts = check_source(path)
  if parts[0] == "step":
    return step
  if parts[0] == "frozen":
    node = frozen
    for p in parts[1:]:
      node = node[p]
    return node
  player = players[parts[1]]
  return player.params if parts[2] == "params" else player.ema[parts[3]]


__all__ = ["Update", "Method", "check_source", "resolve", "SOURCE_ROOTS"]
