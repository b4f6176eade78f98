"""Classifier-based feature distillation (losses/cfd.py) on a two-Gaussian mixture with its exact
teacher and exact classifier: the loss against a direct numpy computation of its formula, and its
minimiser (the teacher's two-step map)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, schedules
from diffdistill.losses import cfd, progressive

SCHEDULE = schedules.VPLinear()
MIX = analytic.GaussianMixture(weights=np.array([0.3, 0.7]), means=np.array([[-1.0, 0.5], [1.2, -0.4]]),
                               covs=np.stack([0.2 * np.eye(2), 0.35 * np.eye(2)]))
B, N = 64, 4


def _lookup(params, x, t):  # a student whose output per example is free: params["y"] [B, 2]
  del x, t
  return params["y"]


def _setup(temperature=0.5, kl_weight=1.0, l2_weight=1.0):
  teacher = analytic.denoiser(SCHEDULE)
  loss = cfd.cfd_loss(_lookup, teacher, lambda mix, x: analytic.component_logits(mix, x),
                      schedule=SCHEDULE, temperature=temperature, kl_weight=kl_weight,
                      l2_weight=l2_weight, weighting="uniform")
  x0 = analytic.sample(MIX, jax.random.key(1), B, dtype=jnp.float32)
  rng = jax.random.key(2)
  i_rng, eps_rng = jax.random.split(rng)
  _, _, target = jax.jit(lambda: progressive.round_pair(
      teacher, MIX, x0, i_rng, eps_rng, num_steps=N, schedule=SCHEDULE))()
  call = jax.jit(lambda p: loss(p, {"x": x0}, rng, teacher_params=MIX, classifier_params=MIX,
                                num_steps=jnp.int32(N)))
  return call, np.asarray(target)


def _np_logits(x):
  w, mu, var = np.array([0.3, 0.7]), np.array([[-1.0, 0.5], [1.2, -0.4]]), np.array([0.2, 0.35])
  d2 = np.sum((x[:, None, :] - mu[None]) ** 2, -1)
  return np.log(w) - 0.5 * d2 / var - np.log(2 * np.pi * var)  # 2-D isotropic Gaussians


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cfd_loss_is_l2_plus_tau_squared_kl_of_the_classifier():
  temperature = 2.0  # tau != 1: the tau^2 factor and the softened softmaxes are both in play
  call, target = _setup(temperature=temperature, l2_weight=0.3)
  y = target + 0.4 * np.asarray(jax.random.normal(jax.random.key(5), target.shape))
  value, aux = call({"y": jnp.asarray(y, jnp.float32)})
  lp = _np_log_softmax(_np_logits(target.astype(np.float64)) / temperature)
  lq = _np_log_softmax(_np_logits(y.astype(np.float64)) / temperature)
  kl = np.sum(np.exp(lp) * (lp - lq), -1)
  want = np.mean(0.3 * np.mean((y - target) ** 2, -1) + temperature ** 2 * kl)
  np.testing.assert_allclose(value, want, rtol=2e-4)
  np.testing.assert_allclose(aux["kl"], np.mean(kl), rtol=2e-4)
  assert np.mean(kl) > 1e-3  # the classifier term is really in play


def test_cfd_minimiser_is_the_teachers_two_step_map():
  call, target = _setup()
  value, _ = call({"y": jnp.asarray(target)})
  grad = jax.grad(lambda p: call(p)[0])({"y": jnp.asarray(target)})["y"]
  assert abs(float(value)) < 1e-6 and float(jnp.max(jnp.abs(grad))) < 1e-6
  params = {"y": jnp.asarray(target) + 0.5 * jax.random.normal(jax.random.key(7), target.shape)}
  step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 20.0 * g, p, jax.grad(
      lambda q: call(q)[0])(p)))
  for _ in range(300):
    params = step(params)
  np.testing.assert_allclose(params["y"], target, atol=2e-3)


def test_cfd_bad_options_are_named():
  with pytest.raises(ValueError, match="temperature must be > 0"):
    cfd.cfd_loss(_lookup, None, None, schedule=SCHEDULE, temperature=0.0)
  with pytest.raises(ValueError, match="not both 0"):
    cfd.cfd_loss(_lookup, None, None, schedule=SCHEDULE, kl_weight=0.0, l2_weight=0.0)
