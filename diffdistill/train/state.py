"""The training state: one pytree holding everything a resumed run needs.

    state = TrainState.create(params=params, tx=optim.make_optimizer(config.optim),
                              rng=jax.random.PRNGKey(config.seed), ema_decays=(0.999, 0.9999))
    grads = jax.grad(loss)(state.params, ...)
    state = state.apply_gradients(grads)   # optimizer update, then every EMA, then step + 1
    teacher = state.ema_params["0.9999"]   # EMA params are keyed by the decay, as a string

EMA (Polyak averaging), applied inside `apply_gradients` after the optimizer update:

    ema_d <- d * ema_d + (1 - d) * params        for every decay d in `ema_decays`.

`rng` is a raw `uint32[2]` key (`jax.random.PRNGKey`), not a typed key, so checkpoints hold a
plain array. The step folds it with the step number (`fold_in(rng, step)`) and never splits it,
so the state's rng never changes and step s always sees the same randomness.

`num_nonfinite` counts the steps skipped because the loss or a gradient was not finite;
`nonfinite_in_row` counts the current run of such steps (see `train.step`).

References:
  Polyak & Juditsky, Acceleration of stochastic approximation by averaging, 1992 (EMA of iterates);
  Kingma et al., Variational Diffusion Models, 2021 (`vdm/train_state.py`: EMA inside the update).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any


def ema_key(decay: float) -> str:
  """The key of an EMA decay in `TrainState.ema_params` (e.g. 0.9999 -> "0.9999")."""
  return repr(float(decay))


class TrainState(flax.struct.PyTreeNode):
  """step, params, optimizer state, EMA params (one copy per decay), rng and non-finite counters."""

  step: Array  # [] int32, number of steps taken (skipped non-finite steps included)
  params: PyTree
  opt_state: PyTree
  ema_params: dict[str, PyTree]  # ema_key(decay) -> params-shaped tree
  rng: Array  # [2] uint32, fixed for the whole run
  num_nonfinite: Array  # [] int32, total skipped steps
  nonfinite_in_row: Array  # [] int32, skipped steps since the last finite one
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decays: tuple[float, ...] = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, params: PyTree, tx: optax.GradientTransformation, rng: Array,
             ema_decays: Sequence[float] = ()) -> "TrainState":
    """A fresh state at step 0; each EMA copy starts at `params`."""
    decays = tuple(float(d) for d in ema_decays)
    for d in decays:
      if not 0.0 <= d < 1.0:
        raise ValueError(f"ema_decays must lie in [0, 1), got {d}.")
    if len(set(decays)) != len(decays):
      raise ValueError(f"ema_decays must be distinct, got {decays}.")
    rng = jnp.asarray(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
      raise ValueError("rng must be a raw jax.random.PRNGKey (uint32[2]); got "
                       f"{rng.dtype}{list(rng.shape)}.")
    # every leaf gets its own buffer: the train step donates the state, and XLA must not be
    # handed one buffer twice (an EMA copy aliasing params, or two counters sharing a zero)
    copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
    zero = lambda: jnp.zeros((), jnp.int32)
    return cls(step=zero(), params=copy(params), opt_state=copy(tx.init(params)),
               ema_params={ema_key(d): copy(params) for d in decays},
               rng=copy(rng), num_nonfinite=zero(), nonfinite_in_row=zero(), tx=tx,
               ema_decays=decays)

  def apply_gradients(self, grads: PyTree) -> "TrainState":
    """One optimizer update, then the EMA update of every decay, then step + 1."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema_params = {
        ema_key(d): jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p,
                                 self.ema_params[ema_key(d)], params)
        for d in self.ema_decays}
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                        ema_params=ema_params, nonfinite_in_row=jnp.zeros_like(self.nonfinite_in_row))

  def skip(self) -> "TrainState":
    """The state after a skipped (non-finite) step: only step and the counters move."""
    return self.replace(step=self.step + 1, num_nonfinite=self.num_nonfinite + 1,
                        nonfinite_in_row=self.nonfinite_in_row + 1)
