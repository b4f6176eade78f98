"""train.checkpoint: exact round trip, keep-last-N, another model's checkpoint, damaged steps."""

import logging
import os
import shutil

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
