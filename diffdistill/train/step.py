"""A data-parallel train step built from any loss factory's `loss_fn(params, batch, rng)`.

Data parallelism is `jax.jit` over a one-axis device mesh: the batch is sharded on the `data`
axis, the state is replicated, and XLA inserts the gradient all-reduce. The state's buffers are
donated, so a step updates them in place. One step:

    rng_s        = fold_in(state.rng, state.step)                       (no split, no carry)
    g, loss, aux = mean over micro-batches i of grad loss_fn(params, micro_i, fold_in(rng_s, i))
    state        = state.apply_gradients(g)   if loss and |g| are finite (so every entry of g)
                   state.skip()               otherwise (step and the counters move, nothing else)

Why the numbers do not depend on the device count: under `jit` every array is global, so a
`jax.random` draw of shape [B, ...] inside `loss_fn` yields the same values for example b however
the batch is laid over devices (the draw is a function of the key, the shape and b alone), and
the reductions are over the global batch. `tests/test_train_step.py` checks 8 devices against 1.
The randomness does depend on `accumulation_steps` (micro-batch i gets its own fold), as does
the float summation order; results are reproducible for a fixed configuration.

Micro-batch i takes examples i, i + k, i + 2k, ... of the global batch (k = accumulation_steps),
so every device holds an equal part of every micro-batch; the global batch must therefore be
divisible by k * (number of devices).

References:
  Xu et al., GSPMD, 2021 (sharding annotations in jit); big_vision `train.py` (the step layout).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffdistill.train.state import TrainState

Array = jax.Array
LossFn = Callable[[Any, Mapping[str, Array], Array], tuple[Array, Mapping[str, Array]]]
DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A one-axis mesh named `data` over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, *, mesh: Mesh, accumulation_steps: int = 1) -> None:
  """Raises ValueError unless the global batch splits into equal per-device micro-batches."""
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % (n * accumulation_steps):
    raise ValueError(
        f"batch_size={batch_size} must be a positive multiple of the device count ({n}) times "
        f"accumulation_steps ({accumulation_steps}), i.e. of {n * accumulation_steps}.")


def global_batch(local_batch: Mapping[str, np.ndarray], *, mesh: Mesh) -> dict[str, Array]:
  """Assembles this process's rows into global arrays sharded on `data`.

  Each process passes its own [B / process_count, ...] shard (process p holds rows
  p * B/P ... (p+1) * B/P - 1 of the global batch); with one process this is a device_put.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def make_train_step(loss_fn: LossFn, *, mesh: Mesh, accumulation_steps: int = 1
                    ) -> Callable[[TrainState, Mapping[str, Array]], tuple[TrainState, dict]]:
  """The jitted step `(state, batch) -> (state, metrics)`; `state` is donated.

  Args:
    loss_fn: `loss_fn(params, batch, rng) -> (scalar loss, aux dict of arrays)`, a pure
      function from a loss factory (e.g. `losses.dsm.dsm_loss`).
    mesh: the device mesh; its only axis must be named `data`.
    accumulation_steps: k micro-batches per step, scanned in sequence (activation memory of
      B / k examples), their gradients, losses and aux averaged; one optimizer update.

  Returns:
    step(state, batch) with batch a dict of global arrays [B, ...] (see `global_batch`), and
    metrics: loss, grad_norm, every aux entry (averaged over micro-batches), skipped (1 if
    this step was skipped), num_nonfinite and nonfinite_in_row (after the step).
  """
  if mesh.axis_names != (DATA_AXIS,):
    raise ValueError(f"mesh must have the single axis {DATA_AXIS!r}, got {mesh.axis_names}.")
  k = int(accumulation_steps)
  if k < 1:
    raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}.")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  micro_sharding = NamedSharding(mesh, P(None, DATA_AXIS))

  def loss_and_grads(params, batch, rng):
    if k == 1:
      return grad_fn(params, batch, rng)

    def split(x):  # [B, ...] -> [k, B/k, ...], micro-batch i = examples i, i+k, ...
      x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, micro_sharding)

    def body(carry, inputs):
      i, micro = inputs
      (loss, aux), grads = grad_fn(params, micro, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    micro = jax.tree.map(split, dict(batch))
    zeros = jax.tree.map(jnp.zeros_like,
                         jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng))
    zeros = (zeros[0][0], zeros[0][1], zeros[1])
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    loss, aux, grads = jax.tree.map(lambda s: s / k, total)
    return (loss, aux), grads

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = loss_and_grads(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)
    # one reduction for both: a NaN or inf anywhere in grads makes the norm NaN or inf (so does
    # a norm beyond float range, ~1e19 per entry in float32: such a step is skipped too)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # a branch, not a select over two full states: the skipped branch costs nothing
    new_state = jax.lax.cond(finite, lambda s: s.apply_gradients(grads), lambda s: s.skip(), state)
    metrics = dict(aux)
    metrics.update(loss=loss, grad_norm=grad_norm,
                   skipped=(~finite).astype(jnp.int32), num_nonfinite=new_state.num_nonfinite,
                   nonfinite_in_row=new_state.nonfinite_in_row)
    return new_state, metrics

  rep = replicated(mesh)
  return jax.jit(step, in_shardings=(rep, batch_sharding(mesh)), out_shardings=(rep, rep),
                 donate_argnums=0)
