"""train.state / train.optim / train.step on the 8 simulated CPU devices, with a tiny pure-JAX loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffdistill.method import Method, Update
from diffdistill.train import optim, state as state_lib, step as step_lib

D, H, B = 3, 16, 32


def init_params(rng):
  k1, k2 = jax.random.split(rng)
  return {"w1": jax.random.normal(k1, (D, H)) / np.sqrt(D), "b1": jnp.zeros(H),
          "w2": jax.random.normal(k2, (H, D)) / np.sqrt(H)}


def denoising_loss(params, batch, rng):
  """A DSM-like loss whose noise comes from `rng`: per-example terms first, then the mean."""
  x0 = batch["x"]  # [B, D]
  noise = jax.random.normal(rng, x0.shape)
  xt = x0 + noise
  pred = jnp.tanh(xt @ params["w1"] + params["b1"]) @ params["w2"]
  per_example = jnp.sum((pred - x0) ** 2, axis=-1)  # [B]
  return jnp.mean(per_example), {"max_term": jnp.max(per_example)}


def deterministic_loss(params, batch, rng):
  del rng
  pred = jnp.tanh(batch["x"] @ params["w1"] + params["b1"]) @ params["w2"]
  return jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1)), {}


def make_state(ema=None, lr=1e-2):
  tx = optim.make_optimizer({"name": "adam", "learning_rate": lr}, num_steps=10)
  model = state_lib.Player.create(params=init_params(jax.random.PRNGKey(0)), tx=tx,
                                  ema={"eval": 0.9} if ema is None else ema)
  return state_lib.TrainState.create(players={"model": model}, rng=jax.random.PRNGKey(1))


def batches(n, seed=0):
  rs = np.random.RandomState(seed)
  return [{"x": rs.randn(B, D).astype(np.float32), "y": rs.randn(B, D).astype(np.float32)}
          for _ in range(n)]


def run(loss_fn, devices, data, *, accumulation_steps=1):
  mesh = step_lib.make_mesh(devices)
  train_step = step_lib.make_train_step(loss_fn, mesh=mesh, accumulation_steps=accumulation_steps)
  state = jax.device_put(make_state(), step_lib.replicated(mesh))
  losses = []
  for batch in data:
    state, metrics = train_step(state, step_lib.global_batch(batch, mesh=mesh))
    losses.append(float(metrics["loss"]))
  return state, np.array(losses)


def test_eight_devices_match_one_device_loss_grads_and_noise():
  assert jax.device_count() == 8
  data = batches(3)
  s8, l8 = run(denoising_loss, jax.devices(), data)
  s1, l1 = run(denoising_loss, jax.devices()[:1], data)
  np.testing.assert_allclose(l8, l1, rtol=1e-6)
  chex.assert_trees_all_close(s8.params, s1.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s8.ema, s1.ema, rtol=1e-5, atol=1e-6)
  # and the noise itself, drawn inside jit with the output sharded over 8 devices vs on one
  mesh8, mesh1 = step_lib.make_mesh(), step_lib.make_mesh(jax.devices()[:1])
  draw = lambda x: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), 7), x.shape)
  x = np.zeros((B, D), np.float32)
  n8 = jax.jit(draw, out_shardings=step_lib.batch_sharding(mesh8))(
      step_lib.global_batch({"x": x}, mesh=mesh8)["x"])
  n1 = jax.jit(draw)(step_lib.global_batch({"x": x}, mesh=mesh1)["x"])
  assert len(n8.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(n8), np.asarray(n1))


def test_step_matches_plain_adam_and_ema_closed_form():
  data = batches(2)
  state, _ = run(deterministic_loss, jax.devices(), data)
  params = init_params(jax.random.PRNGKey(0))
  tx = optax.adam(1e-2)
  opt_state, ema = tx.init(params), params
  for batch in data:
    grads = jax.grad(lambda p: deterministic_loss(p, batch, None)[0])(params)
    updates, opt_state = tx.update(grads, opt_state)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, params)
  chex.assert_trees_all_close(state.params, params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state.ema["eval"], ema, rtol=1e-5, atol=1e-6)
  assert int(state.step) == 2


def test_step_compiles_once():
  traced = chex.assert_max_traces(deterministic_loss, n=1)
  mesh = step_lib.make_mesh()
  train_step = step_lib.make_train_step(traced, mesh=mesh)
  state = jax.device_put(make_state(), step_lib.replicated(mesh))
  for batch in batches(3):
    state, _ = train_step(state, step_lib.global_batch(batch, mesh=mesh))
  assert int(state.step) == 3


def test_gradient_accumulation_equals_full_batch():
  data = batches(2)
  full, lf = run(deterministic_loss, jax.devices(), data)
  accum, la = run(deterministic_loss, jax.devices(), data, accumulation_steps=2)
  np.testing.assert_allclose(la, lf, rtol=1e-5)
  chex.assert_trees_all_close(accum.params, full.params, rtol=1e-5, atol=1e-6)


def grouped_loss(params, batch, rng):
  """A loss of groups of G consecutive examples: the squared error of each group's mean output."""
  del rng
  pred = jnp.tanh(batch["x"] @ params["w1"] + params["b1"]) @ params["w2"]
  err = (pred - batch["y"]).reshape(-1, G, D).mean(axis=1)
  return jnp.mean(jnp.sum(err ** 2, axis=-1)), {}


G = 4


def test_accumulation_keeps_groups_whole():
  data = batches(2)
  mesh = step_lib.make_mesh()

  def run_grouped(k, group_size):
    method = Method(name="grouped", updates=(
        Update(player="model", loss_fn=grouped_loss, group_size=group_size),))
    step = step_lib.make_step(method, mesh=mesh, accumulation_steps=k)
    state = jax.device_put(make_state(), step_lib.replicated(mesh))
    for batch in data:
      state, m = step(state, step_lib.global_batch(batch, mesh=mesh))
    return state, float(m["loss"])

  full, lf = run_grouped(1, G)
  accum, la = run_grouped(2, G)  # B = 32: micro-batches of 4 whole groups each
  np.testing.assert_allclose(la, lf, rtol=1e-5)
  chex.assert_trees_all_close(accum.params, full.params, rtol=1e-5, atol=1e-6)
  # the example-strided split (group_size 1) mixes the groups: another loss
  _, l_strided = run_grouped(2, 1)
  assert abs(l_strided - lf) > 1e-3 * abs(lf)
  with pytest.raises(ValueError, match="group_size=4"):
    run_grouped(3, G)
  with pytest.raises(ValueError, match="group_size"):
    Update(player="model", loss_fn=grouped_loss, group_size=0)
  with pytest.raises(ValueError, match=r"group_size \(3\).*of 48"):
    step_lib.check_batch_size(24, mesh=mesh, accumulation_steps=2, group_size=3)
  step_lib.check_batch_size(48, mesh=mesh, accumulation_steps=2, group_size=3)


def test_nonfinite_step_is_skipped_and_counted():
  mesh = step_lib.make_mesh()
  train_step = step_lib.make_train_step(deterministic_loss, mesh=mesh)
  state = make_state()
  good, bad = batches(2)
  bad["x"][5, 1] = np.nan
  state, m = train_step(state, step_lib.global_batch(good, mesh=mesh))
  before = jax.tree.map(np.asarray, (state.params, state.players['model'].opt_state, state.ema))
  for expected_in_row in (1, 2):
    state, m = train_step(state, step_lib.global_batch(bad, mesh=mesh))
    assert int(m["skipped"]) == 1 and int(m["nonfinite_in_row"]) == expected_in_row
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, (state.params, state.players['model'].opt_state,
                                                        state.ema)), before)
  assert int(state.step) == 3 and int(state.num_nonfinite) == 2
  state, m = train_step(state, step_lib.global_batch(good, mesh=mesh))
  assert int(m["skipped"]) == 0 and int(m["nonfinite_in_row"]) == 0
  assert int(m["num_nonfinite"]) == 2
  assert not np.allclose(np.asarray(state.params["w1"]), before[0]["w1"])


def test_batch_not_divisible_by_devices_is_an_error():
  with pytest.raises(ValueError, match="multiple of the device count"):
    step_lib.check_batch_size(12, mesh=step_lib.make_mesh(), accumulation_steps=1)
  with pytest.raises(ValueError, match="accumulation_steps"):
    step_lib.check_batch_size(24, mesh=step_lib.make_mesh(), accumulation_steps=2)


def test_optimizer_config_errors_and_schedule():
  with pytest.raises(ValueError, match=r"optim.name must be one of \('adam', 'adamw', 'radam'\)"):
    optim.make_optimizer({"name": "sgdd", "learning_rate": 1e-3}, num_steps=10)
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.make_optimizer({"name": "adam", "learning_rate": 1e-3, "schedule": "linear"}, num_steps=10)
  lr = optim.learning_rate_schedule({"name": "adamw", "learning_rate": 1.0, "warmup_steps": 10,
                                     "schedule": "cosine", "end_factor": 0.1}, num_steps=110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                             [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], atol=1e-6)
  # clipping comes first: RAdam of a clipped [300, 400] equals RAdam of [0.6, 0.8]
  tx = optim.make_optimizer({"name": "radam", "learning_rate": 1.0, "grad_clip": 1.0}, num_steps=1)
  clipped, _ = tx.update({"g": jnp.array([300.0, 400.0])}, tx.init({"g": jnp.zeros(2)}))
  plain = optax.radam(1.0)
  expected, _ = plain.update({"g": jnp.array([0.6, 0.8])}, plain.init({"g": jnp.zeros(2)}))
  chex.assert_trees_all_close(clipped, expected, rtol=1e-6)


def test_step_randomness_is_fold_in_of_the_state_rng_and_step():
  def noise_loss(params, batch, rng):
    return jnp.mean(jax.random.normal(rng, batch["x"].shape)) + 0.0 * jnp.sum(params["b1"]), {}

  mesh = step_lib.make_mesh()
  train_step = step_lib.make_train_step(noise_loss, mesh=mesh)
  state = jax.device_put(make_state(), step_lib.replicated(mesh))
  batch = batches(1)[0]
  for s in range(2):
    state, m = train_step(state, step_lib.global_batch(batch, mesh=mesh))
    # the rng of update 0, repeat 0 of step s (train.step's rule)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(1), s), 0), 0)
    np.testing.assert_allclose(float(m["loss"]),
                               float(jnp.mean(jax.random.normal(key, (B, D)))), rtol=1e-5)


def test_short_run_of_a_long_config_caps_the_warm_up():
  # train_teacher's documented override (--config.num_steps=80) with the config's warm-up of 200
  # steps and cosine decay: the warm-up is capped at a quarter of the run, not an error.
  config = {"name": "adam", "learning_rate": 1.0, "warmup_steps": 200, "schedule": "cosine",
            "end_factor": 0.0}
  lr = optim.learning_rate_schedule(config, num_steps=80)
  np.testing.assert_allclose([lr(0), lr(10), lr(20), lr(80)], [0.0, 0.5, 1.0, 0.0], atol=1e-6)
  assert optim.warmup_steps(config, num_steps=10_000) == 200
  with pytest.raises(ValueError, match="must exceed"):
    optim.learning_rate_schedule({**config, "decay_steps": 10}, num_steps=80)
