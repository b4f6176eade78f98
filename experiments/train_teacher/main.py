"""Trains a diffusion teacher by denoising score matching (see config.py for the variants).

    python -m experiments.train_teacher.main \
      --config=experiments/train_teacher/config.py:toy2d_cpu --workdir=runs/teacher_toy2d

Start-up order, so that a bad config or workdir fails before any compilation and before
anything is written to the workdir:
  1. validate the config's names and sizes (optimizer, network, dataset, parametrization,
     schedule, time sampler, batch size vs devices x accumulation and processes);
  2. build the dataset, network, loss and optimizer (pure Python);
  3. the abstract state (`jax.eval_shape`, no compilation) is checked against the newest
     checkpoint in the workdir (another model's checkpoint is an error) and restored from it,
     damaged checkpoints being skipped with a warning;
  4. only then: initialize (if fresh), write config.json, compile and train.
A killed run restarted with the same command resumes from its last checkpoint and produces the
losses an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import ml_collections

from diffdistill import data as data_lib
from diffdistill import nets, parametrization
from diffdistill import schedules as schedules_lib
from diffdistill.losses import dsm
from diffdistill.train import checkpoint as ckpt_lib
from diffdistill.train import distributed, loop, optim, state as state_lib, step as step_lib
from experiments.train_teacher import sampling

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (config.py:VARIANT).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, figures.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Default $JAX_NUM_PROCESSES.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Default $JAX_PROCESS_ID.")

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
    return state_lib.TrainState.create(params=params, tx=self.tx, rng=jax.random.fold_in(rng, 2),
                                       ema_decays=self.config.ema_decays)


def _one_of(value, accepted, what):
  if value not in accepted:
    raise ValueError(f"{what} must be one of {sorted(accepted)}, got {value!r}.")


def validate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError for any name or size the run would reject (no JAX computation)."""
  optim.validate(config.optim)
  _one_of(config.network.name, nets.NETWORKS, "config.network.name")
  _one_of(config.dataset.name, data_lib.valid_names(), "config.dataset.name")
  _one_of(config.loss.kind, parametrization.KINDS, "config.loss.kind")
  if config.eval_ema not in config.ema_decays:
    raise ValueError(f"config.eval_ema ({config.eval_ema}) must be one of config.ema_decays "
                     f"({tuple(config.ema_decays)}).")
  distributed.local_batch_size(config.batch_size)
  step_lib.check_batch_size(config.batch_size, mesh=mesh,
                            accumulation_steps=config.optim.accumulation_steps)
  for key in ("num_steps", "log_every"):
    if config[key] < 1:
      raise ValueError(f"config.{key} must be >= 1, got {config[key]}.")


def build(config: ml_collections.ConfigDict) -> Setup:
  mesh = step_lib.make_mesh()
  validate(config, mesh)
  schedule = schedules_lib.get(config.schedule.name, **config.schedule.kwargs)
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
                              num_examples=config.dataset.num_examples, **distributed.data_shard())
  example_shape = tuple(data.batch(0)["x"].shape[1:])
  return Setup(config=config, mesh=mesh, data=data, example_shape=example_shape,
               conditional=conditional, module=module, schedule=schedule,
               denoise=parametrization.as_denoiser(apply, kind=config.loss.kind, schedule=schedule),
               loss_fn=loss_fn, tx=tx)


class _LossBatches:
  """The pipeline's batches restricted to the keys the loss reads, with the pipeline's get_state."""

  def __init__(self, setup: Setup):
    self._data = setup.data
    self._keys = BATCH_KEYS if setup.conditional else ("x",)

  def __next__(self):
    batch = next(self._data)
    return {k: batch[k] for k in self._keys}

  def get_state(self):
    return self._data.get_state()


def sample_hook(setup: Setup, workdir: str) -> Callable:
  config = setup.config
  mix = sampling.exact_mixture(config.dataset.name)

  def fn(state, step):
    params = jax.device_get(state.ema_params[state_lib.ema_key(config.eval_ema)])
    if not distributed.is_writer():
      return None
    x = sampling.sample(setup.denoise, params, jax.random.PRNGKey(config.seed + step),
                        num=config.num_eval_samples, shape=setup.example_shape,
                        schedule=setup.schedule, rtol=config.sampler_rtol)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    sampling.save_figure(x, os.path.join(workdir, "samples", f"step_{step:07d}.png"),
                         title=f"{config.dataset.name}, step {step}")
    return None if mix is None else sampling.sample_quality(x, mix, seed=config.seed)

  return fn


def train(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
  setup = build(config)
  rng = jax.random.PRNGKey(config.seed)
  replicated = step_lib.replicated(setup.mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(setup.init_state, rng))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints)
  restored = checkpointer.restore_latest(abstract)
  if restored is None:
    state = jax.jit(setup.init_state, out_shardings=replicated)(rng)
  else:
    state, data_state = restored
    setup.data.set_state(data_state)
    logging.warning("Resuming from the checkpoint of step %d.", int(state.step))
  if distributed.is_writer():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  train_step = step_lib.make_train_step(setup.loss_fn, mesh=setup.mesh,
                                        accumulation_steps=config.optim.accumulation_steps)
  hooks = [loop.Hook(every=config.sample_every, at_end=config.sample_at_end,
                     fn=sample_hook(setup, workdir), name="eval")]
  try:
    return loop.run(state=state, train_step=train_step, data=_LossBatches(setup), mesh=setup.mesh,
                    workdir=workdir, num_steps=config.num_steps, checkpointer=checkpointer,
                    log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                    hooks=hooks, max_nonfinite_in_row=config.max_nonfinite_in_row,
                    progress=config.progress)
  finally:
    checkpointer.close()
    setup.data.close()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _DISTRIBUTED.value:
    distributed.initialize(coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
