"""The training state: one pytree of named players, each with params, optimizer state and EMAs.

    student = Player.create(params=params, tx=optim.make_optimizer(config.optim, num_steps=n),
                            ema={"eval": 0.9999, "target": ema.ct_mu(mu0=0.95, ...)})
    state = TrainState.create(players={"student": student}, rng=jax.random.key(0))
    state.players["student"].ema["target"]      # an EMA copy, by name
    state.params, state.ema                     # shorthand when there is a single player

A player is what one loss differentiates: a student, a generator, a fake score network, a
discriminator. Single-network training (DSM teachers) is the case of one player. Each player's
EMA copies are named; a decay is a float or a function `decay(step) -> scalar` of the global step
(traced: consistency training's mu(k), TRACT's self-teacher), applied after each of the player's
optimizer updates:

    ema_n <- d_n(step) * ema_n + (1 - d_n(step)) * params            for every named EMA n.

`rng` is stored as a raw `uint32[2]` key so checkpoints hold a plain array; `create` accepts raw
and typed (`jax.random.key`) keys. The step folds it with the step number (`fold_in(rng, step)`)
and never splits it, so step s always sees the same randomness.

`num_nonfinite` counts the steps in which some update was skipped because its loss or a gradient
was not finite; `nonfinite_in_row` counts the current run of such steps (see `train.step`).

References:
  Polyak & Juditsky, Acceleration of stochastic approximation by averaging, 1992 (EMA of iterates);
  Kingma et al., Variational Diffusion Models, 2021 (`vdm/train_state.py`: EMA inside the update).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
PyTree = Any
Decay = Union[float, Callable[[Array], Array]]


def as_raw_key(rng, *, name: str = "rng") -> Array:
  """A raw uint32[2] key from a raw or typed (`jax.random.key`) PRNG key; ValueError otherwise."""
  if isinstance(rng, (bool, int, np.integer)):
    raise ValueError(f"{name} must be a PRNG key, got the integer {rng!r}; use "
                     f"jax.random.key({rng}) (or jax.random.PRNGKey({rng})).")
  arr = rng if isinstance(rng, jax.Array) else jnp.asarray(rng)
  if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
    arr = jax.random.key_data(arr)
  if arr.dtype != jnp.uint32 or arr.shape != (2,):
    raise ValueError(f"{name} must be a PRNG key: jax.random.key(seed) or a raw "
                     f"jax.random.PRNGKey(seed) (uint32[2]); got {arr.dtype}{list(arr.shape)}.")
  return arr


def decay_value(decay: Decay, step: Array) -> Array:
  """The decay at `step` (a float, or a function of the traced global step)."""
  return jnp.asarray(decay(step) if callable(decay) else decay, jnp.float32)


def _check_decay(name: str, decay: Decay) -> Decay:
  if callable(decay):
    return decay
  if isinstance(decay, bool) or not isinstance(decay, (float, int, np.floating, np.integer)):
    raise ValueError(f"EMA {name!r}: the decay must be a float in [0, 1) or a function of the "
                     f"step, got {decay!r}.")
  if not 0.0 <= float(decay) < 1.0:
    raise ValueError(f"EMA {name!r}: the decay must lie in [0, 1), got {decay}.")
  return float(decay)


def _copy(tree: PyTree) -> PyTree:
  # every leaf gets its own buffer: the train step donates the state, and XLA must not be handed
  # one buffer twice (an EMA copy aliasing params, or two counters sharing a zero)
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


class Player(flax.struct.PyTreeNode):
  """One differentiated network: params, optimizer state, and EMA copies by name."""

  params: PyTree
  opt_state: PyTree
  ema: dict[str, PyTree]  # name -> params-shaped tree
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decays: tuple[tuple[str, Decay], ...] = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, params: PyTree, tx: optax.GradientTransformation,
             ema: Mapping[str, Decay] | None = None) -> "Player":
    """A fresh player; every EMA copy starts at `params`.

    Args:
      params: the network's parameters.
      tx: its optax optimizer.
      ema: {name: decay}, a decay being a float in [0, 1) or `decay(step) -> scalar`.
    """
    ema = dict(ema or {})
    for name in ema:
      if not isinstance(name, str) or not name:
        raise ValueError(f"EMA names must be non-empty strings, got {name!r}.")
    decays = tuple((name, _check_decay(name, d)) for name, d in sorted(ema.items()))
    return cls(params=_copy(params), opt_state=_copy(tx.init(params)),
               ema={name: _copy(params) for name, _ in decays}, tx=tx, ema_decays=decays)

  def apply_gradients(self, grads: PyTree, step: Array) -> "Player":
    """One optimizer update, then the update of every EMA at the global `step`."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = {}
    for name, decay in self.ema_decays:
      d = decay_value(decay, step)
      ema[name] = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype),
                               self.ema[name], params)
    return self.replace(params=params, opt_state=opt_state, ema=ema)


class TrainState(flax.struct.PyTreeNode):
  """step, named players, rng and the non-finite counters: everything a resumed run needs."""

  step: Array  # [] int32, number of steps taken (skipped ones included)
  players: dict[str, Player]
  rng: Array  # [2] uint32, fixed for the whole run
  num_nonfinite: Array  # [] int32, total steps with a skipped update
  nonfinite_in_row: Array  # [] int32, such steps since the last fully finite one

  @classmethod
  def create(cls, *, players: Mapping[str, Player], rng) -> "TrainState":
    """A fresh state at step 0 (rng: a raw or typed PRNG key)."""
    if not players:
      raise ValueError("TrainState needs at least one player, e.g. {'model': Player.create(...)}.")
    for name, p in players.items():
      if not isinstance(p, Player):
        raise ValueError(f"players[{name!r}] must be a train.state.Player, got {type(p).__name__}.")
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    return cls(step=zero(), players=dict(players), rng=_copy(as_raw_key(rng)),
               num_nonfinite=zero(), nonfinite_in_row=zero())

  def _single(self) -> Player:
    if len(self.players) != 1:
      raise ValueError(f"state.params / state.ema need a single player; this state has "
                       f"{sorted(self.players)}: use state.players[name].")
    return next(iter(self.players.values()))

  @property
  def params(self) -> PyTree:
    """The params of the only player."""
    return self._single().params

  @property
  def ema(self) -> dict[str, PyTree]:
    """The EMA copies of the only player, by name."""
    return self._single().ema


__all__ = ["Decay", "Player", "TrainState", "as_raw_key", "decay_value"]
