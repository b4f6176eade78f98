"""train.loop and train.writers: metrics lines, TensorBoard events, hooks, the non-finite stop."""

import gc
import glob
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill.train import interrupt, loop, optim, state as state_lib, step as step_lib, writers


def loss_fn(params, batch, rng):
  del rng
  return jnp.mean((batch["x"] @ params["w"] - 1.0) ** 2), {"w_norm": jnp.sum(params["w"] ** 2)}


class Data:
  """Batches [16, 2]; from batch `nan_from` on (1-based) every batch holds a NaN."""

  def __init__(self, nan_from=None):
    self.position, self.nan_from = 0, nan_from

  def __next__(self):
    self.position += 1
    x = np.random.RandomState(self.position).randn(16, 2).astype(np.float32)
    if self.nan_from is not None and self.position >= self.nan_from:
      x[0, 0] = np.nan
    return {"x": x}

  def get_state(self):
    return {"step": self.position}


def setup():
  mesh = step_lib.make_mesh()
  tx = optim.make_optimizer({"name": "adam", "learning_rate": 1e-2}, num_steps=100)
  model = state_lib.Player.create(params={"w": jnp.zeros((2, 1))}, tx=tx)
  state = state_lib.TrainState.create(players={"model": model}, rng=jax.random.PRNGKey(0))
  return mesh, jax.device_put(state, step_lib.replicated(mesh)), step_lib.make_train_step(
      loss_fn, mesh=mesh)


def read(workdir):
  with open(os.path.join(workdir, writers.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_metrics_hooks_and_tensorboard(tmp_path):
  mesh, state, train_step = setup()
  calls = []
  hook = loop.Hook(every=4, at_end=True, name="eval",
                   fn=lambda s, step: calls.append((step, int(s.step))) or {"score": step * 1.5})
  state = loop.run(state=state, train_step=train_step, data=Data(), mesh=mesh,
                   workdir=str(tmp_path), num_steps=10, log_every=3, hooks=[hook], progress=False)
  assert int(state.step) == 10
  assert calls == [(4, 4), (8, 8), (10, 10)]
  records = read(tmp_path)
  assert [r["step"] for r in records] == [3, 4, 6, 8, 9, 10]
  assert all("loss" in r and "w_norm" in r and r["steps_per_sec"] > 0 for r in records)
  assert [r.get("eval/score") for r in records] == [None, 6.0, None, 12.0, None, 15.0]
  assert 0 < records[0]["w_norm"] < records[-1]["w_norm"]  # the params move
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_nonfinite_steps_in_a_row_stop_the_run_naming_the_step(tmp_path):
  mesh, state, train_step = setup()
  with pytest.raises(loop.NonFiniteError, match="3 consecutive steps .* the last at step 6"):
    loop.run(state=state, train_step=train_step, data=Data(nan_from=4), mesh=mesh,
             workdir=str(tmp_path), num_steps=20, log_every=1, max_nonfinite_in_row=3,
             progress=False)
  records = read(tmp_path)
  assert [r["skipped"] for r in records[:6]] == [0, 0, 0, 1, 1, 1]
  assert records[5]["nonfinite_in_row"] == 3 and records[5]["num_nonfinite"] == 3


def test_truncate_after_drops_later_and_broken_lines(tmp_path):
  w = writers.MetricsWriter(str(tmp_path), tensorboard=False)
  for s in range(1, 6):
    w.write(s, {"loss": np.float32(s), "bins": np.arange(2), "image": np.ones((3, 3)),
                "bad": np.float32("nan")})
  w.close()
  with open(w.path, "a") as f:
    f.write('{"step": 6, "lo')  # a line cut by a kill
  w.truncate_after(3)
  assert read(tmp_path) == [{"step": s, "loss": float(s), "bins/0": 0, "bins/1": 1, "bad": "nan"}
                            for s in (1, 2, 3)]


class Interrupting(Data):
  """Ctrl-C (KeyboardInterrupt) while the 25th batch is read."""

  def __next__(self):
    if self.position == 24:
      raise KeyboardInterrupt
    return super().__next__()


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tmp_path):
  from diffdistill.train import checkpoint as ckpt_lib  # noqa: PLC0415
  mesh, state, train_step = setup()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  with pytest.raises(loop.Interrupted, match=r"Interrupted after step 24: the last checkpoint is "
                     r"step 20 in .*checkpoints; run the same command to resume from it"):
    loop.run(state=state, train_step=train_step, data=Interrupting(), mesh=mesh,
             workdir=str(tmp_path), num_steps=100, checkpointer=ckpt, checkpoint_every=10,
             progress=False)
  ckpt.close()
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).all_steps()[-1] == 20


class CollectingGarbage(Data):
  """Ctrl-C arrives while Python runs a garbage-collection callback, as it did inside jax's
  `_xla_gc_callback` (there the default handler's KeyboardInterrupt is printed as "Exception
  ignored" and lost, and the run went on to the end)."""

  def __next__(self):
    if self.position == 24:
      def on_gc(phase, info):
        del info
        if phase == "start":
          gc.callbacks.remove(on_gc)
          signal.raise_signal(signal.SIGINT)
      gc.callbacks.append(on_gc)
      gc.collect()
    return super().__next__()


def test_ctrl_c_in_a_gc_callback_is_not_lost_once_deferred(tmp_path):
  mesh, state, train_step = setup()
  interrupt.defer()
  try:
    with pytest.raises(loop.Interrupted, match=r"Interrupted after step 25: this run keeps no checkpoints"):
      loop.run(state=state, train_step=train_step, data=CollectingGarbage(), mesh=mesh,
               workdir=str(tmp_path), num_steps=60, progress=False, checkpointer=None)
  finally:
    interrupt.restore()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_nan_in_the_frozen_inputs_is_an_error_naming_the_leaf_before_any_step(tmp_path):
  # before: NaN losses, every update skipped, until max_nonfinite_in_row stopped the run
  mesh, state, train_step = setup()
  teacher = {"dense": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}
  teacher["dense"]["bias"][1] = np.nan
  with pytest.raises(ValueError, match=r"frozen\['teacher'\]\['dense'\]\['bias'\] holds 1 "
                     r"non-finite value\(s\) \(NaN or inf\) of 3"):
    loop.run(state=state, train_step=train_step, data=Data(), mesh=mesh, workdir=str(tmp_path),
             num_steps=5, progress=False, frozen={"teacher": teacher, "num_steps": np.int32(4)})
  assert not os.path.exists(os.path.join(tmp_path, writers.METRICS_FILE))
