"""Trains a diffusion teacher by denoising score matching (see config.py for the variants).

    python -m experiments.train_teacher.main \
      --config=experiments/train_teacher/config.py:toy2d_cpu --workdir=runs/teacher_toy2d

Start-up order, so that a bad config or workdir fails before any compilation and before
anything is written to the workdir:
  1. check that the workdir is, or can be created as, a writable folder, and validate the
     config's names and sizes (optimizer, network, dataset, parametrization, schedule, time
     sampler, batch size vs devices x accumulation and processes);
  2. build the dataset, network, loss and optimizer (pure Python);
  3. the abstract state (`jax.eval_shape`, no compilation) is checked against the newest
     checkpoint in the workdir (another model's checkpoint is an error) and restored from it,
     damaged checkpoints being skipped with a warning;
  4. only then: initialize (if fresh), write config.json, compile and train.
A killed run restarted with the same command resumes from its last checkpoint and produces the
losses an uninterrupted run would have. Ctrl-C at any moment, the imports included, ends the run
with status 130 at the next safe point (`diffdistill.train.interrupt`): between start-up phases
or steps, after the pending checkpoint saves; config.json is written whole or not at all.
"""

from __future__ import annotations

from diffdistill.train import interrupt

if __name__ == "__main__":  # before the imports below, which take seconds
  interrupt.defer()

import os  # noqa: E402
from typing import Callable  # noqa: E402

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import ml_collections  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from diffdistill import _validate  # noqa: E402
from diffdistill.train import checkpoint as ckpt_lib  # noqa: E402
from diffdistill.train import distributed, loop, state as state_lib, step as step_lib  # noqa: E402
from experiments.train_teacher import sampling  # noqa: E402
from experiments.train_teacher.teacher import (LossBatches, Setup, abstract_state,  # noqa: E402
                                               build, state_sharding)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (config.py:VARIANT).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, figures.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Default $JAX_NUM_PROCESSES.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Default $JAX_PROCESS_ID.")


def sample_hook(setup: Setup, workdir: str) -> Callable:
  config = setup.config
  mix = sampling.exact_mixture(config.dataset.name)

  def fn(state, step):
    params = distributed.to_host(state.ema[config.eval_ema])
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
  _validate.check_writable_dir("workdir", workdir)
  if not config.progress:  # TFDS draws its own bars while it generates a dataset
    tfds.disable_progress_bar()
  setup = build(config)
  interrupt.check()
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints)
  try:
    rng = jax.random.PRNGKey(config.seed)
    shardings = state_sharding(setup, rng)
    restored = checkpointer.restore_latest(abstract_state(setup, rng))
    if restored is None:
      state = jax.jit(setup.init_state, out_shardings=shardings)(rng)
    else:
      state, data_state = restored
      setup.data.set_state(data_state)
      logging.warning("Resuming from the checkpoint of step %d.", int(state.step))
    interrupt.check()
    if distributed.is_writer():
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "config.json")
      with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2))
      os.replace(path + ".tmp", path)
    train_step = step_lib.make_train_step(setup.loss_fn, mesh=setup.mesh,
                                          accumulation_steps=config.optim.accumulation_steps,
                                          state_sharding=shardings)
    hooks = [loop.Hook(every=config.sample_every, at_end=config.sample_at_end,
                       fn=sample_hook(setup, workdir), name="eval")]
    return loop.run(state=state, train_step=train_step, data=LossBatches(setup), mesh=setup.mesh,
                    workdir=workdir, num_steps=config.num_steps, checkpointer=checkpointer,
                    log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                    hooks=hooks, max_nonfinite_in_row=config.max_nonfinite_in_row,
                    progress=config.progress, tensorboard=config.tensorboard)
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
  try:
    train(_CONFIG.value, _WORKDIR.value)
    interrupt.check()
  except loop.Interrupted as e:
    print(e)
    raise SystemExit(130) from None
  except KeyboardInterrupt:
    print("Interrupted (Ctrl-C) before the first step or after the last: no step was lost; "
          "run the same command to start or resume.")
    raise SystemExit(130) from None


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
