"""The sharded train step of any method: `step(state, batch, frozen) -> (state, metrics)`.

A method (`diffdistill.method.Method`) is a sequence of updates, each differentiating one player's
loss `loss_fn(params, batch, rng, **inputs)`; single-network training (DSM) is one update of one
player (`make_train_step`). The step is `jax.jit` over a (data, fsdp[, tensor]) device mesh
(`train.sharding`): the batch is split over data x fsdp; by default the state and `frozen` are
replicated and XLA inserts the gradient all-reduce (data parallelism); with `state_sharding` /
`frozen_sharding` from the path rules, large leaves are split over fsdp (ZeRO-3: gathered where
a loss reads them, gradients reduce-scattered onto the shards). The state's buffers are
donated, so a step updates them in place; `frozen` (teacher params, a previous round's student,
round constants) is an argument, never donated, never differentiated, never a constant of the
graph, so a new teacher or a new round compiles nothing. One step:

    rng_s = fold_in(state.rng, state.step)                                 (no split, no carry)
    for update u (in the declared order), for repeat r < u.repeats:
      inputs       = the update's sources, read from frozen and the players as they are now
      g, loss, aux = mean over micro-batches i of
                     grad loss_fn(params_u, micro_i, fold_in(rng_ur, i), **inputs),
                     rng_ur = fold_in(fold_in(rng_s, u), r)
      player_u     = player_u.apply_gradients(g, step)   if loss and |g| are finite
                     player_u                            otherwise (the update is skipped)
    state.step += 1; the non-finite counters move if any update was skipped

Why the numbers do not depend on the device count: under `jit` every array is global, so a
`jax.random` draw of shape [B, ...] inside `loss_fn` yields the same values for example b however
the batch is laid over devices (the draw is a function of the key, the shape and b alone), and
the reductions are over the global batch. `tests/test_train_step.py` checks 8 devices against 1,
`tests/test_train_sharding.py` the FSDP step against the data-parallel one.
The randomness does depend on `accumulation_steps` (micro-batch i gets its own fold), as does
the float summation order; results are reproducible for a fixed configuration.

Micro-batch i takes examples i, i + k, i + 2k, ... of the global batch (k = accumulation_steps),
so every device holds an equal part of every micro-batch; the global batch must therefore be
divisible by k * (data x fsdp devices). An update whose loss reads the batch in groups of g
consecutive examples (`Update.group_size`: IMM's particles) is split by whole groups instead:
micro-batch i takes groups i, i + k, ... (the batch must be divisible by g * k).

References:
  Xu et al., GSPMD, 2021 (sharding annotations in jit); big_vision `train.py` (the step layout).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffdistill.method import Method, Update, resolve
from diffdistill.train import sharding as sharding_lib
from diffdistill.train.state import TrainState

Array = jax.Array
LossFn = Callable[..., tuple[Array, Mapping[str, Array]]]
DATA_AXIS = sharding_lib.DATA_AXIS


def make_mesh(devices=None, *, data: int | None = None, fsdp: int = 1, tensor: int = 1) -> Mesh:
  """The (data, fsdp[, tensor]) mesh over `devices` (default: every device of every process);
  data defaults to the devices left. See `train.sharding`."""
  return sharding_lib.make_mesh(devices, data=data, fsdp=fsdp, tensor=tensor)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over (data, fsdp) together, other axes whole."""
  return NamedSharding(mesh, P(sharding_lib.batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_sharding(abstract_state: Any, mesh: Mesh, *,
                   rules: sharding_lib.Rules = sharding_lib.Rules()) -> Any:
  """The shardings of a train state (or any pytree: `frozen`) on `mesh` by the rules of
  `train.sharding`: every leaf replicated on a data-only mesh, large leaves split over fsdp."""
  return sharding_lib.tree_shardings(abstract_state, mesh, rules=rules)


def check_batch_size(batch_size: int, *, mesh: Mesh, accumulation_steps: int = 1,
                     group_size: int = 1) -> None:
  """Raises ValueError unless the global batch splits into equal per-device micro-batches (the
  batch is split over data x fsdp; the tensor axis holds whole copies of it) of whole groups of
  `group_size` examples (`Update.group_size`)."""
  n = batch_shards(mesh)
  unit = accumulation_steps * math.lcm(n, group_size)
  if batch_size <= 0 or batch_size % unit:
    what = (f"the least common multiple of the device count ({n}) and group_size ({group_size})"
            if group_size > 1 else f"the device count ({n})")
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of {what} times "
                     f"accumulation_steps ({accumulation_steps}), i.e. of {unit}.")


def batch_shards(mesh: Mesh) -> int:
  """The number of parts the batch is split into: the data axis' size times the fsdp axis'."""
  return int(np.prod([mesh.shape[a] for a in sharding_lib.batch_axes(mesh)]))


def global_batch(local_batch: Mapping[str, np.ndarray], *, mesh: Mesh) -> dict[str, Array]:
  """Assembles this process's rows into global arrays sharded on `data`.

  Each process passes its own [B / process_count, ...] shard (process p holds rows
  p * B/P ... (p+1) * B/P - 1 of the global batch); with one process this is a device_put.
  """
  sharding = batch_sharding(mesh)
  local_devices = batch_shards(mesh.local_mesh)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if v.ndim < 1 or v.shape[0] % local_devices:
      raise ValueError(f"batch[{k!r}] has {v.shape[0] if v.ndim else 'no'} rows on this process, "
                       f"which must be a multiple of its {local_devices} devices (the batch is "
                       "split evenly over the mesh's data x fsdp axes); change the batch size.")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def _check_divisible(batch, k: int, g: int) -> None:
  for key, x in dict(batch).items():
    if x.shape[0] % (k * g):
      what = (f"accumulation_steps={k} x group_size={g} (the loss reads groups of {g} examples "
              "and each micro-batch takes whole groups)" if g > 1 else
              f"accumulation_steps={k} (the batch is split into {k} equal micro-batches)")
      raise ValueError(
          f"batch_size={x.shape[0]} (batch[{key!r}]) is not divisible by {what}: make batch_size "
          "a multiple of that times the number of batch shards (check_batch_size).")


def _grad_fn(loss_fn: LossFn, k: int, micro_sharding, group_size: int = 1) -> Callable:
  """(params, batch, rng, inputs) -> ((loss, aux), grads), averaged over k micro-batches of
  whole groups of `group_size` consecutive examples."""
  grad_fn = jax.value_and_grad(lambda p, b, r, inputs: loss_fn(p, b, r, **inputs), has_aux=True)
  g = int(group_size)
  if k == 1:
    if g == 1:
      return grad_fn

    def checked(params, batch, rng, inputs):
      _check_divisible(batch, 1, g)
      return grad_fn(params, batch, rng, inputs)
    return checked

  def split(x):  # [B, ...] -> [k, B/k, ...], micro-batch i = groups i, i+k, ... (of g examples)
    n = x.shape[0] // (k * g)
    x = x.reshape(n, k, g, *x.shape[1:]).swapaxes(0, 1).reshape(k, n * g, *x.shape[1:])
    return jax.lax.with_sharding_constraint(x, micro_sharding)

  def accumulated(params, batch, rng, inputs):
    def body(carry, xs):
      i, micro = xs
      (loss, aux), grads = grad_fn(params, micro, jax.random.fold_in(rng, i), inputs)
      return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    _check_divisible(batch, k, g)
    micro = jax.tree.map(split, dict(batch))
    first = jax.tree.map(lambda x: x[0], micro)
    (loss0, aux0), grads0 = jax.eval_shape(grad_fn, params, first, rng, inputs)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, aux0, grads0))
    # unrolled on CPU for the reason the repeats are (make_step): XLA:CPU runs a backward pass
    # inside a while loop several times slower (bench/ACCUMULATION.md)
    unroll = k if jax.default_backend() == "cpu" else 1
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro), unroll=unroll)
    loss, aux, grads = jax.tree.map(lambda s: s / k, total)
    return (loss, aux), grads

  return accumulated


def _tree_constraint(tree, shardings):
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def make_step(method: Method, *, mesh: Mesh, accumulation_steps: int = 1,
              state_sharding: Any = None, frozen_sharding: Any = None) -> Callable:
  """The jitted `step(state, batch, frozen=None) -> (state, metrics)` of a method.

  Args:
    method: the updates, their order, repeats and input sources (`diffdistill.method`).
    mesh: the device mesh, axes among (data, fsdp, tensor) (`make_mesh`); the batch is split
      over data x fsdp.
    accumulation_steps: k micro-batches per update, scanned in sequence (activation memory of
      B / k examples), their gradients, losses and aux averaged; one optimizer update.
    state_sharding: the state's shardings, a pytree of them matching the state (`state_sharding`
      of its `jax.eval_shape`) or one sharding; default replicated (data parallelism).
    frozen_sharding: the sharding of `frozen` (a sharding or a pytree of them); default replicated.

  With a sharded state (FSDP), each loss reads every network's params gathered over fsdp
  (`sharding.gathered`: XLA's all-gather) and each gradient is constrained back to its player's
  params sharding (a reduce-scatter) before the optimizer and EMA updates, which run on the shards.

  Returns:
    step(state, batch, frozen): `state` is donated; `batch` a dict of global arrays [B, ...] (see
    `global_batch`); `frozen` a pytree the losses read (None when the method reads none). The
    method's inputs are checked against the state and `frozen` when the step is first traced.
    metrics: for each update, its aux entries, loss, grad_norm and skipped (averaged over
    repeats and micro-batches; skipped summed), under "<update name>/" when the method has
    several updates; and skipped (1 if any update was skipped), num_nonfinite and
    nonfinite_in_row (after the step).
  """
  sharding_lib.check_mesh(mesh)
  k = int(accumulation_steps)
  if k < 1:
    raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}.")
  micro_sharding = NamedSharding(mesh, P(None, sharding_lib.batch_axes(mesh)))
  grad_fns = [_grad_fn(u.loss_fn, k, micro_sharding, u.group_size) for u in method.updates]
  single = len(method.updates) == 1
  rep = replicated(mesh)
  if state_sharding is None and sharding_lib.is_sharded(mesh):
    raise ValueError(f"mesh {dict(mesh.shape)} splits the state (fsdp or tensor > 1): pass "
                     "state_sharding=step.state_sharding(jax.eval_shape(init_state, ...), mesh).")
  state_sharding = state_sharding or rep
  frozen_sharding = frozen_sharding or rep

  def leaf_shardings(tree, shardings):
    """`shardings` as a full pytree over `tree` (one sharding stands for every leaf)."""
    if isinstance(shardings, jax.sharding.Sharding):
      return jax.tree.map(lambda _: shardings, tree)
    return shardings

  def gather(tree, shardings):
    return _tree_constraint(tree, jax.tree.map(sharding_lib.gathered, shardings))

  def run_update(ui: int, u: Update, players, batch, frozen, rng_s, step_no, shardings):
    params_sharding = shardings["players"][u.player].params

    def one(player, r):
      current = {**players, u.player: player}
      inputs = {key: resolve(path, frozen=frozen, players=current, step=step_no)
                for key, path in u.inputs.items()}
      params = player.params
      if shardings["sharded"]:
        input_shardings = {key: resolve(path, frozen=shardings["frozen"],
                                        players=shardings["players"], step=rep)
                           for key, path in u.inputs.items()}
        inputs = {key: gather(v, leaf_shardings(v, input_shardings[key]))
                  for key, v in inputs.items()}
        params = gather(params, params_sharding)
      rng = jax.random.fold_in(jax.random.fold_in(rng_s, ui), r)
      (loss, aux), grads = grad_fns[ui](params, batch, rng, inputs)
      if shardings["sharded"]:
        grads = _tree_constraint(grads, params_sharding)
      grad_norm = optax.tree.norm(grads)
      # one reduction for both: a NaN or inf anywhere in grads makes the norm NaN or inf (so
      # does a norm beyond float range, ~1e19 per entry in float32: such an update is skipped)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      # a branch, not a select over two full players: the skipped branch costs nothing
      player = jax.lax.cond(finite, lambda p: p.apply_gradients(grads, step_no), lambda p: p,
                            player)
      return player, {**aux, "loss": loss, "grad_norm": grad_norm,
                      "skipped": (~finite).astype(jnp.int32)}

    if u.repeats == 1:
      return one(players[u.player], 0)
    # unrolled on CPU: XLA:CPU runs a network's backward pass inside a while loop ~20x slower
    # (DMD2's k = 5 fake-score updates of the digits U-Net: 46 s per step rolled, 2.6 s
    # unrolled; bench/DM_STEP.md); accelerators keep the loop (k times less to compile)
    unroll = u.repeats if jax.default_backend() == "cpu" else 1
    player, ms = jax.lax.scan(one, players[u.player], jnp.arange(u.repeats), unroll=unroll)
    metrics = {name: (jnp.sum(v, 0) if name == "skipped" else jnp.mean(v, 0))
               for name, v in ms.items()}
    return player, metrics

  def step(state: TrainState, batch, frozen):
    method.check(state.players, frozen)
    states = leaf_shardings(state, state_sharding)
    shardings = {"sharded": sharding_lib.is_sharded(mesh), "players": states.players,
                 "frozen": leaf_shardings(frozen, frozen_sharding)}
    rng_s = jax.random.fold_in(state.rng, state.step)
    players = dict(state.players)
    metrics, skipped = {}, jnp.zeros((), jnp.int32)
    for ui, u in enumerate(method.updates):
      players[u.player], m = run_update(ui, u, players, batch, frozen, rng_s, state.step,
                                        shardings)
      skipped = skipped + m["skipped"]
      metrics.update(m if single else {f"{u.label}/{name}": v for name, v in m.items()})
    bad = skipped > 0
    in_row = jnp.where(bad, state.nonfinite_in_row + 1, 0)
    new_state = state.replace(step=state.step + 1, players=players,
                              num_nonfinite=state.num_nonfinite + bad.astype(jnp.int32),
                              nonfinite_in_row=in_row)
    metrics.update(skipped=bad.astype(jnp.int32), num_nonfinite=new_state.num_nonfinite,
                   nonfinite_in_row=in_row)
    return new_state, metrics

  jitted = jax.jit(step, in_shardings=(state_sharding, batch_sharding(mesh), frozen_sharding),
                   out_shardings=(state_sharding, rep), donate_argnums=0)

  def call(state: TrainState, batch, frozen=None):
    # Inputs are placed where the step expects them (a no-op once they are): a fresh state or
    # a host-side teacher would otherwise be a differently placed argument and trace again.
    state = jax.device_put(state, state_sharding)
    frozen = jax.device_put({} if frozen is None else frozen, frozen_sharding)
    return jitted(state, batch, frozen)

  call.method = method
  call.jitted = jitted
  call.state_sharding = state_sharding
  call.frozen_sharding = frozen_sharding
  return call


def make_train_step(loss_fn: LossFn, *, mesh: Mesh, accumulation_steps: int = 1,
                    player: str = "model", state_sharding: Any = None) -> Callable:
  """The step of single-network training: one update of `player` with `loss_fn(params, batch,
  rng)` (e.g. `losses.dsm.dsm_loss`); metrics unprefixed. See `make_step`."""
  return make_step(Method(name="train", updates=(Update(player=player, loss_fn=loss_fn),)),
                   mesh=mesh, accumulation_steps=accumulation_steps, state_sharding=state_sharding)


__all__ = ["DATA_AXIS", "make_mesh", "batch_sharding", "replicated", "state_sharding",
           "batch_shards", "check_batch_size",
           "global_batch", "make_step", "make_train_step"]
