"""The teacher of a train_teacher config: validation, dataset, network, loss and optimizer.

Pure wiring with no JAX computation, so that main.py and evaluate.py fail on a bad config
before anything is compiled or written.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from diffdistill import data as data_lib
from diffdistill import nets, parametrization
from diffdistill import schedules as schedules_lib
from diffdistill.losses import dsm
from diffdistill.train import distributed, optim, sharding, state as state_lib, step as step_lib

BATCH_KEYS = ("x", "label")  # what the loss reads; the pipeline's "index" stays on the host


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything built from a config before any compilation."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  data: Any                      # this process's data pipeline
  example_shape: tuple[int, ...]
  conditional: bool
  module: Any
  schedule: schedules_lib.Schedule
  denoise: Callable              # denoise(params, x, t, **cond) -> x0 (built once: hashable)
  loss_fn: Callable
  tx: Any

  def init_state(self, rng: jax.Array) -> state_lib.TrainState:
    x = jnp.zeros((1, *self.example_shape), jnp.float32)
    params = nets.init_params(self.module, jax.random.fold_in(rng, 1), x)
    model = state_lib.Player.create(params=params, tx=self.tx, ema=dict(self.config.ema))
    return state_lib.TrainState.create(players={"model": model}, rng=jax.random.fold_in(rng, 2))


def _one_of(value, accepted, what):
  if value not in accepted:
    raise ValueError(f"{what} must be one of {sorted(accepted)}, got {value!r}.")


def validate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError for any name or size the run would reject (no JAX computation)."""
  optim.validate(config.optim)
  _one_of(config.network.name, nets.NETWORKS, "config.network.name")
  _one_of(config.dataset.name, data_lib.valid_names(), "config.dataset.name")
  _one_of(config.loss.kind, parametrization.KINDS, "config.loss.kind")
  if config.eval_ema not in config.ema:
    raise ValueError(f"config.eval_ema ({config.eval_ema!r}) must name one of the EMA copies in "
                     f"config.ema ({sorted(config.ema)}).")
  distributed.local_batch_size(config.batch_size)
  step_lib.check_batch_size(config.batch_size, mesh=mesh,
                            accumulation_steps=config.optim.accumulation_steps)
  for key in ("num_steps", "log_every"):
    if config[key] < 1:
      raise ValueError(f"config.{key} must be >= 1, got {config[key]}.")


def schedule_from_config(config: ml_collections.ConfigDict) -> schedules_lib.Schedule:
  """schedules.get(config.name, **the keywords of config.kwargs that are set (not None))."""
  kwargs = {k: v for k, v in config.kwargs.items() if v is not None}
  return schedules_lib.get(config.name, **kwargs)


MESH_DEFAULTS = {"data": None, "fsdp": 1, "tensor": 1, "min_size": 2 ** 12}


def mesh_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.mesh with its defaults (configs saved before the mesh existed have none)."""
  return {**MESH_DEFAULTS, **dict(config.get("mesh", None) or {})}


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The mesh of config.mesh (data x fsdp x tensor); errors name the config entries."""
  m = mesh_config(config)
  try:
    return step_lib.make_mesh(data=m["data"], fsdp=m["fsdp"], tensor=m["tensor"])
  except ValueError as e:
    raise ValueError(f"config.mesh (data={m['data']}, fsdp={m['fsdp']}, tensor={m['tensor']}): "
                     f"{e}") from None


def build(config: ml_collections.ConfigDict) -> Setup:
  mesh = make_mesh(config)
  validate(config, mesh)
  schedule = schedule_from_config(config.schedule)
  module = nets.get_network(config.network.name, **config.network.kwargs)
  apply = nets.make_apply(module)
  conditional = bool(getattr(module, "num_classes", 0))
  dropout = bool(getattr(module, "dropout", 0.0))
  loss_fn = dsm.dsm_loss(
      apply, schedule=schedule, kind=config.loss.kind, weighting=config.loss.weighting,
      time_sampler=config.loss.time_sampler, cond_drop_prob=config.loss.cond_drop_prob,
      null_label=module.num_classes if conditional else None, dropout=dropout)
  tx = optim.make_optimizer(config.optim, num_steps=config.num_steps)
  data = data_lib.get_dataset(config.dataset.name, split="train", batch_size=config.batch_size,
                              seed=config.seed, data_dir=config.dataset.data_dir,
                              prefetch=config.dataset.prefetch,
                              num_examples=config.dataset.num_examples,
                              # (workdirs written before these fields existed: the native pipeline)
                              pipeline=config.dataset.get("pipeline", "native"),
                              workers=config.dataset.get("workers", 0),
                              **distributed.data_shard())
  example_shape = tuple(data.batch(0)["x"].shape[1:])
  return Setup(config=config, mesh=mesh, data=data, example_shape=example_shape,
               conditional=conditional, module=module, schedule=schedule,
               denoise=parametrization.as_denoiser(apply, kind=config.loss.kind, schedule=schedule),
               loss_fn=loss_fn, tx=tx)


class LossBatches:
  """The pipeline's batches restricted to the keys the loss reads, with the pipeline's get_state."""

  def __init__(self, setup: Setup):
    self._data = setup.data
    self._keys = BATCH_KEYS if setup.conditional else ("x",)

  def __next__(self):
    batch = next(self._data)
    return {k: batch[k] for k in self._keys}

  def get_state(self):
    return self._data.get_state()


def state_sharding(setup: Setup, rng: jax.Array):
  """The state's shardings on the mesh (all replicated unless config.mesh.fsdp > 1)."""
  rules = sharding.Rules(min_size=mesh_config(setup.config)["min_size"])
  return step_lib.state_sharding(jax.eval_shape(setup.init_state, rng), setup.mesh, rules=rules)


def abstract_state(setup: Setup, rng: jax.Array):
  """The state's shapes, dtypes and shardings, without computing anything."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      jax.eval_shape(setup.init_state, rng), state_sharding(setup, rng))


def load_teacher(config: ml_collections.ConfigDict, workdir: str):
  """(setup, step, EMA params of config.eval_ema) from the newest checkpoint in `workdir`.

  The checkpoint is restored replicated over this machine's devices, whatever mesh trained it
  (orbax reshards on restore), so a teacher trained with FSDP on a pod loads on one CPU.
  """
  from diffdistill.train import checkpoint as ckpt_lib  # noqa: PLC0415 (orbax only when loading)
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh = ml_collections.ConfigDict(MESH_DEFAULTS)
  setup = build(config)
  abstract = abstract_state(setup, jax.random.PRNGKey(config.seed))
  restored = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).restore_latest(abstract)
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
  state, _ = restored
  return setup, int(state.step), distributed.to_host(state.ema[config.eval_ema])
