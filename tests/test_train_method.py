"""The multi-player step: update order and ratio, inputs from frozen / players / EMAs, scheduled
EMA decays, no recompile for a new teacher, clear errors for missing inputs and bad keys."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffdistill.train import state as state_lib, step as step_lib
from diffdistill.method import Method, Update, check_source

B = 8


def sgd_player(value, ema=None):
  return state_lib.Player.create(params={"w": jnp.asarray(value, jnp.float32)},
                                 tx=optax.sgd(0.1), ema=ema)


def batch():
  mesh = step_lib.make_mesh()
  return mesh, step_lib.global_batch({"x": np.arange(B, dtype=np.float32)[:, None]}, mesh=mesh)


def test_updates_run_in_order_and_ratio_with_current_inputs():
  # a chases b (3 updates per step), then b chases a's new value (1 update):
  #   L_a = (w_a - w_b)^2 / 2  -> w_a <- w_a - 0.1 (w_a - w_b), three times
  #   L_b = (w_b - w_a)^2 / 2  with w_a already updated
  def loss_a(params, batch, rng, *, other):
    return 0.5 * jnp.sum((params["w"] - other["w"]) ** 2), {}

  def loss_b(params, batch, rng, *, other):
    return 0.5 * jnp.sum((params["w"] - other["w"]) ** 2), {}

  method = Method(name="chase", updates=(
      Update(player="a", loss_fn=loss_a, inputs={"other": "players/b/params"}, repeats=3),
      Update(player="b", loss_fn=loss_b, inputs={"other": "players/a/params"})))
  mesh, data = batch()
  step = step_lib.make_step(method, mesh=mesh)
  state = state_lib.TrainState.create(players={"a": sgd_player(1.0), "b": sgd_player(0.0)},
                                      rng=jax.random.key(0))
  wa, wb = 1.0, 0.0
  for _ in range(2):
    state, metrics = step(state, data)
    for _ in range(3):
      wa -= 0.1 * (wa - wb)
    wb -= 0.1 * (wb - wa)
  np.testing.assert_allclose(float(state.players["a"].params["w"]), wa, rtol=1e-6)
  np.testing.assert_allclose(float(state.players["b"].params["w"]), wb, rtol=1e-6)
  assert {"a/loss", "a/grad_norm", "b/loss", "skipped", "num_nonfinite"} <= set(metrics)
  assert int(state.step) == 2


def test_frozen_teacher_and_scheduled_ema_target():
  # the student regresses the frozen teacher's value; its "target" EMA decays with
  # d(step) = 0.5 + 0.1 step, checked against the recursion in numpy.
  def loss(params, batch, rng, *, teacher, target):
    del target
    return 0.5 * jnp.sum((params["w"] - teacher["w"]) ** 2), {}

  traced = chex.assert_max_traces(loss, n=1)
  method = Method(name="regress", updates=(Update(
      player="student", loss_fn=traced,
      inputs={"teacher": "frozen/teacher", "target": "players/student/ema/target"}),))
  mesh, data = batch()
  step = step_lib.make_step(method, mesh=mesh)
  decay = lambda s: 0.5 + 0.1 * s.astype(jnp.float32)  # noqa: E731
  state = state_lib.TrainState.create(
      players={"student": sgd_player(0.0, ema={"target": decay, "eval": 0.9})},
      rng=jax.random.PRNGKey(0))
  w, ema, ema9 = 0.0, 0.0, 0.0
  for s, teacher in enumerate((1.0, 1.0, -2.0, 3.0)):  # a new teacher each step: no retrace
    state, _ = step(state, data, {"teacher": {"w": jnp.float32(teacher)}})
    w -= 0.1 * (w - teacher)
    d = 0.5 + 0.1 * s
    ema = d * ema + (1 - d) * w
    ema9 = 0.9 * ema9 + 0.1 * w
  player = state.players["student"]
  np.testing.assert_allclose(float(player.params["w"]), w, rtol=1e-6)
  np.testing.assert_allclose(float(player.ema["target"]["w"]), ema, rtol=1e-6)
  np.testing.assert_allclose(float(player.ema["eval"]["w"]), ema9, rtol=1e-6)


def test_missing_inputs_are_clear_errors():
  def loss(params, batch, rng, *, teacher):
    return jnp.sum(params["w"] * teacher), {}

  mesh, data = batch()
  state = state_lib.TrainState.create(players={"student": sgd_player(0.0)}, rng=jax.random.key(0))
  step = step_lib.make_step(Method(name="m", updates=(Update(
      player="student", loss_fn=loss, inputs={"teacher": "frozen/teacher"}),)), mesh=mesh)
  with pytest.raises(ValueError, match=r"reads 'frozen/teacher', but frozen has \[\]"):
    step(state, data)
  bad_ema = step_lib.make_step(Method(name="m", updates=(Update(
      player="student", loss_fn=loss, inputs={"teacher": "players/student/ema/target"}),)),
      mesh=mesh)
  with pytest.raises(ValueError, match="player 'student' has EMAs"):
    bad_ema(state, data)
  with pytest.raises(ValueError, match="Bad input source 'teacher'"):
    check_source("teacher")
  with pytest.raises(ValueError, match="updates player 'generator'"):
    step_lib.make_step(Method(name="m", updates=(Update(player="generator", loss_fn=loss),)),
                       mesh=mesh)(state, data)


def test_keys_and_decays_are_checked():
  player = sgd_player(0.0)
  with pytest.raises(ValueError, match=r"use jax.random.key\(3\)"):
    state_lib.TrainState.create(players={"p": player}, rng=3)
  typed = state_lib.TrainState.create(players={"p": player}, rng=jax.random.key(3))
  raw = state_lib.TrainState.create(players={"p": player}, rng=jax.random.PRNGKey(3))
  np.testing.assert_array_equal(typed.rng, raw.rng)
  with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\)"):
    sgd_player(0.0, ema={"eval": 1.0})
  with pytest.raises(ValueError, match="state.players\\[name\\]"):
    _ = state_lib.TrainState.create(players={"a": player, "b": player}, rng=jax.random.key(0)).params


def test_global_batch_not_divisible_by_devices_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of its 8 devices"):
    step_lib.global_batch({"x": np.zeros((100, 2), np.float32)}, mesh=step_lib.make_mesh())
