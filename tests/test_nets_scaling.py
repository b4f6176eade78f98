"""nets.remat and nets.precision: remat changes nothing but memory (outputs, jvps, gradients of
a jvp loss), and a bfloat16 step of the digits U-Net stays within 2% of float32's loss with
float32 params, optimizer state and EMAs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffdistill import nets, schedules
from diffdistill.losses import dsm
from diffdistill.train import state as state_lib, step as step_lib

SMALL_UNET = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                  dropout=0.0)


def network(name, remat):
  if name == "unet":
    return nets.get_network("unet", remat=remat, **SMALL_UNET), (2, 8, 8, 1)
  return nets.get_network("mlp", features=16, num_blocks=2, emb_dim=16, remat=remat), (2, 3)


def jvp_and_grad(apply):
  """sCD / MeanFlow-shaped: u, its tangent du = d/ds u(x + s v, t + s), and the gradient of a
  loss in which both enter, in one jitted function."""
  def loss(params, x, t, v):
    u, du = jax.jvp(lambda xx, tt: apply(params, xx, tt), (x, t), (v, jnp.ones_like(t)))
    return jnp.mean(u * jax.lax.stop_gradient(du)) + jnp.mean(jnp.square(du)), (u, du)

  def fn(params, x, t, v):
    (_, (u, du)), grads = jax.value_and_grad(loss, has_aux=True)(params, x, t, v)
    return u, du, grads

  return fn


def check_remat(name):
  module, shape = network(name, "none")
  params = nets.init_params(module, jax.random.key(0), jnp.zeros(shape))
  # the zero-initialized output layers would make every gradient but the head's vanish
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape),
                        params)
  k1, k2 = jax.random.split(jax.random.key(1))
  x, v = jax.random.normal(k1, shape), jax.random.normal(k2, shape)
  t = jnp.array([0.3, 0.7])
  results = {}
  for remat in nets.REMAT_POLICIES:
    m, _ = network(name, remat)
    fn = jvp_and_grad(nets.make_apply(m))
    init = lambda r, m=m: nets.init_params(m, r, jnp.zeros(shape))  # noqa: E731
    assert jax.tree.structure(jax.eval_shape(init, jax.random.key(0))) == \
        jax.tree.structure(params)  # the same param names under every policy
    jaxpr = str(jax.make_jaxpr(fn)(params, x, t, v))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (remat != "none"), remat
    results[remat] = jax.jit(fn)(params, x, t, v)
  scale = lambda tree: max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(tree))  # noqa: E731
  for remat in ("block", "full"):
    for got, want in zip(results[remat], results["none"]):  # u, du, grads
      chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6 * scale(want))
  assert scale(results["none"][1]) > 1e-2  # a non-trivial tangent


def test_remat_keeps_outputs_jvps_and_gradients_of_a_jvp_loss():
  check_remat("mlp")


@pytest.mark.slow  # the U-Net's jvp-of-grad compiles three times (minutes on 2 shared cores)
def test_remat_of_the_unet_keeps_jvps_and_gradients():
  check_remat("unet")


def test_bad_remat_is_a_clear_error():
  with pytest.raises(ValueError, match=r"remat must be one of \('none', 'block', 'full'\)"):
    nets.init_params(nets.get_network("mlp", remat="blocks"), jax.random.key(0), jnp.zeros((1, 2)))
  with pytest.raises(ValueError, match="precision policy must be one of"):
    nets.with_precision(nets.get_network("mlp"), "fp16")


def _dsm_step(module, x):
  schedule = schedules.EDM()
  loss_fn = dsm.dsm_loss(nets.make_apply(module), schedule=schedule, kind="edm", weighting="edm",
                         time_sampler="lognormal")
  params = nets.init_params(module, jax.random.key(0), x[:1])
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(p.size), p.shape),
                        params)
  player = state_lib.Player.create(params=params, tx=optax.adam(1e-3), ema={"eval": 0.999})
  state = state_lib.TrainState.create(players={"model": player}, rng=jax.random.key(3))
  mesh = step_lib.make_mesh(jax.devices()[:1])
  step = step_lib.make_train_step(loss_fn, mesh=mesh)
  batch = step_lib.global_batch({"x": np.asarray(x)}, mesh=mesh)
  state, metrics = step(state, batch)
  return state, float(metrics["loss"])


@pytest.mark.slow  # two compiles of the digits U-Net's step (~1-5 min on 2 shared cores)
def test_bfloat16_step_of_the_digits_unet_is_within_two_percent_of_float32():
  x = jax.random.uniform(jax.random.key(5), (32, 8, 8, 1), minval=-1.0, maxval=1.0)
  module = nets.get_network("unet_digits8", dropout=0.0)
  s32, l32 = _dsm_step(module, x)
  s16, l16 = _dsm_step(nets.with_precision(module, "bfloat16"), x)
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation)
  assert abs(l16 - l32) <= 0.02 * abs(l32), (l16, l32)
  assert l16 != l32  # the bfloat16 network really ran in bfloat16
  player = s16.players["model"]
  for tree in (player.params, player.opt_state, player.ema):
    assert {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)} == \
        {jnp.dtype(jnp.float32)}
