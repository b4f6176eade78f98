"""train.checkpoint: exact round trip, keep-last-N, another model's checkpoint, damaged steps."""

import asyncio
import logging
import os
import shutil
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill.train import checkpoint as ckpt_lib, optim, state as state_lib


def make_state(width=4, seed=0):
  tx = optim.make_optimizer({"name": "adamw", "learning_rate": 1e-3, "weight_decay": 0.1},
                            num_steps=10)
  rs = np.random.RandomState(seed)
  params = {"w": jnp.asarray(rs.randn(3, width), jnp.float32), "b": jnp.zeros(width)}
  model = state_lib.Player.create(params=params, tx=tx, ema={"fast": 0.9, "slow": 0.99})
  return state_lib.TrainState.create(players={"model": model}, rng=jax.random.PRNGKey(seed))


def abstract(state):
  return jax.eval_shape(lambda: state)


def save_steps(directory, steps, **kw):
  ckpt = ckpt_lib.Checkpointer(directory, **kw)
  for s in steps:
    state = make_state(seed=s).replace(step=jnp.asarray(s, jnp.int32))
    ckpt.save(s, state, {"position": s, "epoch": 0})
  ckpt.close()


def listing(directory):
  return sorted((root, tuple(sorted(files))) for root, _, files in os.walk(directory))


def test_round_trip_is_exact_and_keeps_last_n(tmp_path):
  d = str(tmp_path / "ckpt")
  save_steps(d, [10, 20, 30, 40], max_to_keep=2)
  ckpt = ckpt_lib.Checkpointer(d)
  assert ckpt.all_steps() == [30, 40]
  state, data = ckpt.restore_latest(abstract(make_state()))
  expected = make_state(seed=40)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, (state.params, state.ema,
                                                        state.players['model'].opt_state, state.rng)),
                              jax.tree.map(np.asarray, (expected.params, expected.ema,
                                                        expected.players['model'].opt_state, expected.rng)))
  assert int(state.step) == 40 and data == {"position": 40, "epoch": 0}
  model = state.players["model"]
  assert model.tx is not None and model.ema_decays == (("fast", 0.9), ("slow", 0.99))


def test_empty_or_missing_directory_restores_nothing_and_creates_nothing(tmp_path):
  d = str(tmp_path / "none")
  assert ckpt_lib.Checkpointer(d).restore_latest(abstract(make_state())) is None
  assert not os.path.exists(d)


def test_checkpoint_of_another_model_is_a_clear_error_and_writes_nothing(tmp_path):
  d = str(tmp_path / "ckpt")
  save_steps(d, [10])
  before = listing(tmp_path)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"different model(.|\n)*params.w: "
                     r"checkpoint \(\(3, 4\).*vs model \(\(3, 8\)"):
    ckpt_lib.Checkpointer(d).restore_latest(abstract(make_state(width=8)))
  assert listing(tmp_path) == before


def test_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
  d = str(tmp_path / "ckpt")
  save_steps(d, [10, 20, 30])
  for root, _, files in os.walk(os.path.join(d, "30", "state")):  # truncate every file
    for f in files:
      path = os.path.join(root, f)
      with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
  # a chunk folder removed: TensorStore's error then carries tens of lines of its spec
  shutil.rmtree(os.path.join(d, "20", "state", "d"))
  # and a save killed midway: orbax's temporary folder, which is never a step
  os.makedirs(os.path.join(d, "40.orbax-checkpoint-tmp-1234", "state"))
  ckpt = ckpt_lib.Checkpointer(d)
  with caplog.at_level(logging.WARNING):
    state, data = ckpt.restore_latest(abstract(make_state()))
  assert int(state.step) == 10 and data["position"] == 10
  # one line each: which step, that it is damaged (the error's first line), which step comes next
  # (asyncio may also log orbax's unretrieved restore futures, whose text holds this test's
  # path, "...damaged_latest_checkpoint0/...", depending on when they are collected: not ours)
  skipped = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("checkpoint step")]
  assert len(skipped) == 2 and all("\n" not in m and len(m) < 400 for m in skipped), skipped
  assert "step 30" in skipped[0] and "step 20" in skipped[1] and "trying step 10" in skipped[1]
  assert os.path.isdir(os.path.join(d + ".corrupt", "20"))
  ckpt.save(20, state, data)  # the step number is free again
  ckpt.close()
  assert ckpt_lib.Checkpointer(d).all_steps() == [10, 20]


def test_latest_step_without_its_metadata_falls_back_to_the_last_intact_one(tmp_path, caplog):
  # before: orbax read the step as an empty tree, and restore refused with "holds a checkpoint
  # of a different model"
  d = str(tmp_path / "ckpt")
  save_steps(d, [10, 20, 30])
  for root, _, files in os.walk(os.path.join(d, "30")):
    for f in files:
      if f in ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA"):
        os.remove(os.path.join(root, f))
  with caplog.at_level(logging.WARNING):
    state, data = ckpt_lib.Checkpointer(d).restore_latest(abstract(make_state()))
  assert int(state.step) == 20 and data["position"] == 20
  skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint step")]
  assert len(skipped) == 1 and "step 30" in skipped[0] and "_METADATA" in skipped[0] \
      and "trying step 20" in skipped[0], skipped
  assert not [r for r in caplog.records if r.name == "absl"]  # orbax's own warnings held back
  assert os.path.isdir(os.path.join(d + ".corrupt", "30"))


def _unraisable(exc_type):
  """What Python hands `sys.unraisablehook`: the error with its traceback. A RuntimeError is
  made as TensorStore makes it for a read still in flight when a restore failed: the callback
  scheduled on orbax's event loop, closed by then (`call_soon_threadsafe`)."""
  try:
    if exc_type is RuntimeError:
      loop = asyncio.new_event_loop()
      loop.close()
      loop.call_soon_threadsafe(print)
    raise exc_type("another error")
  except Exception as e:  # noqa: BLE001
    return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                 err_msg=None, object=None)


def test_reads_of_a_failed_restore_print_no_event_loop_is_closed_tracebacks(tmp_path):
  # before: one "RuntimeError: Event loop is closed" traceback per array still being read
  # (174 when the teacher trainer resumed from truncated data, 0-28 here depending on timing)
  d = str(tmp_path / "ckpt")
  save_steps(d, [10, 20])
  for root, _, files in os.walk(os.path.join(d, "20", "state")):  # truncate the array data
    for f in files:
      if os.path.basename(root) == "d":
        path = os.path.join(root, f)
        with open(path, "r+b") as fh:
          fh.truncate(os.path.getsize(path) // 2)
  previous, reported = sys.unraisablehook, []
  sys.unraisablehook = reported.append
  try:
    state, _ = ckpt_lib.Checkpointer(d).restore_latest(abstract(make_state()))
    closed_loop, other = _unraisable(RuntimeError), _unraisable(ZeroDivisionError)
    assert str(closed_loop.exc_value) == "Event loop is closed"
    sys.unraisablehook(closed_loop)
    sys.unraisablehook(other)
  finally:
    sys.unraisablehook = previous
  assert int(state.step) == 10
  # (an earlier test's reads may report here too, late: only these two objects are looked at)
  assert other in reported and closed_loop not in reported


def test_unretrieved_reads_of_a_failed_restore_are_not_logged(tmp_path, caplog):
  # before: asyncio logged "Task exception was never retrieved" with a long TensorStore error
  # for reads of the damaged step that were still pending
  d = str(tmp_path / "ckpt")
  save_steps(d, [10])
  ckpt_lib.Checkpointer(d).restore_latest(abstract(make_state()))
  log = logging.getLogger("asyncio")
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    log.error("Task exception was never retrieved\nfuture: <Task finished name='Task-542' "
              "coro=<async_deserialize() done, defined at .../serialization.py:394>>")
    log.error("Task exception was never retrieved\nfuture: <Task coro=<something_else()>>")
  assert [r.getMessage()[-30:] for r in caplog.records] == [
      "re: <Task coro=<something_else()>>"[-30:]]


def test_sharded_state_saves_and_restores_onto_another_mesh_shape(tmp_path):
  """Saved split over 8 fsdp devices, restored as (2 data x 4 fsdp) and replicated: the same
  values, each leaf placed as the abstract state asks."""
  from diffdistill.train import sharding, step as step_lib
  rules = sharding.Rules(min_size=0)
  state = make_state(width=8)
  mesh8 = step_lib.make_mesh(fsdp=8)
  saved = jax.device_put(state, step_lib.state_sharding(abstract(state), mesh8, rules=rules))
  assert saved.players["model"].opt_state[0].mu["w"].sharding.spec == sharding.P(None, "fsdp")
  d = str(tmp_path / "ckpt")
  ckpt = ckpt_lib.Checkpointer(d, async_save=False)
  ckpt.save(5, saved, {"position": 5})
  ckpt.close()
  for mesh in (step_lib.make_mesh(data=2, fsdp=4), step_lib.make_mesh()):
    shardings = step_lib.state_sharding(abstract(state), mesh, rules=rules)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract(state), shardings)
    restored, data = ckpt_lib.Checkpointer(d).restore_latest(target)
    assert data == {"position": 5}
    for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
      assert x.sharding.is_equivalent_to(s, x.ndim)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, state))
