"""sCM / sCD on TrigFlow: the jvp tangent against float64 finite differences, and sCD's fixed point.

On single-Gaussian data N(m, diag s^2) under TrigFlow the consistency function is
f(x, t) = m + s / sqrt(s^2 + r^2) (x / cos t - m), r = sd tan t (boundary at t = 0). The student
family f_theta = e + k(t) (x / cos t - e), k = s_hat / sqrt(s_hat^2 + r^2), theta = (e, ln s_hat),
holds it exactly (u = (cos t x - f) / sin t is the flow network), and sCD must drive theta there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, schedules
from diffdistill.losses import scm

M = np.array([0.5, -1.0, 2.0])
V = np.array([0.25, 1.5, 0.04])
TRIG = schedules.TrigFlow(sigma_data=0.5)


def gaussian():
  return analytic.GaussianMixture(np.ones(1), M[None], V[None])


def family(params, x, t):
  """The flow network u = (cos t x - f_theta) / sin t of the exact family (module docstring)."""
  t = t[:, None]
  s_hat = jnp.exp(params["ls"])
  r = TRIG.sigma_data * jnp.tan(t)
  f = params["e"] + s_hat / jnp.sqrt(s_hat ** 2 + r ** 2) * (x / jnp.cos(t) - params["e"])
  return (jnp.cos(t) * x - f) / jnp.sin(t)


EXACT = {"e": jnp.asarray(M), "ls": jnp.asarray(0.5 * np.log(V))}


def teacher_flow(x, t):
  return scm.teacher_velocity(analytic.denoiser(TRIG), gaussian(), x, t, schedule=TRIG)


def test_jvp_tangent_equals_a_float64_finite_difference(x64):
  b = 64
  x0 = analytic.sample(gaussian(), jax.random.key(0), b, dtype=jnp.float64)
  t = jax.random.uniform(jax.random.key(1), (b,), jnp.float64, 0.05, 1.5)
  x = jnp.cos(t)[:, None] * x0 + TRIG.sigma(t)[:, None] * jax.random.normal(jax.random.key(2),
                                                                            x0.shape, jnp.float64)
  flow = lambda p, xx, tt: teacher_flow(xx, tt)  # noqa: E731 (the analytic teacher as the network)
  dxdt = teacher_flow(x, t)
  _, tangent = scm.total_derivative(flow, None, x, t, dxdt)
  h = 1e-5
  fd = (teacher_flow(x + h * dxdt, t + h) - teacher_flow(x - h * dxdt, t - h)) / (2 * h)
  want = (jnp.cos(t) * jnp.sin(t))[:, None] * fd
  np.testing.assert_allclose(tangent, want, rtol=1e-7, atol=1e-8)


def test_the_exact_consistency_function_has_zero_tangent_and_is_stationary(x64):
  batch = {"x": analytic.sample(gaussian(), jax.random.key(0), 1024, dtype=jnp.float64)}
  loss_fn = scm.scm_loss(family, analytic.denoiser(TRIG), schedule=TRIG, tangent_normalization=None,
                         warmup_steps=0, adaptive_weighting=False)
  _, aux = loss_fn(EXACT, batch, jax.random.key(1), step=0, teacher_params=gaussian())
  assert float(aux["l2"]) < 1e-12, aux  # g = cos t df/dt = 0 on every trajectory (to rounding)
  off = jax.tree.map(lambda a: a + 0.1, EXACT)
  _, aux_off = loss_fn(off, batch, jax.random.key(1), step=0, teacher_params=gaussian())
  assert float(aux_off["l2"]) > 1e-4, aux_off
  # with normalization, warm-up over and adaptive weighting the gradient still vanishes there
  full = scm.scm_loss(family, analytic.denoiser(TRIG), schedule=TRIG, warmup_steps=10)
  params = {"net": EXACT, "logvar": jax.tree.map(lambda a: a + 0.3, scm.logvar_init(4))}
  grad = jax.grad(lambda p: full(p, batch, jax.random.key(1), step=10,
                                 teacher_params=gaussian())[0])
  biggest = lambda g: max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g["net"]))  # noqa: E731
  # (not 0: float64 rounding of g near t_max, where cos t ~ 0.006, is ~1e-8, and the
  # normalization divides it by c = 0.1)
  assert biggest(grad(params)) < 1e-5
  assert biggest(grad({**params, "net": off})) > 1e-2


def test_scd_reaches_the_closed_form_consistency_function(x64):
  batch = {"x": analytic.sample(gaussian(), jax.random.key(0), 2048, dtype=jnp.float64)}
  loss_fn = scm.scm_loss(family, analytic.denoiser(TRIG), schedule=TRIG, tangent_normalization=None,
                         warmup_steps=0, adaptive_weighting=False)

  @jax.jit
  def iterate(params):
    def body(p, _):  # a Newton step of the loss at the current (stop-gradient) target
      flat, unravel = jax.flatten_util.ravel_pytree(p)
      f = lambda q: loss_fn(unravel(q), batch, jax.random.key(1), step=0,  # noqa: E731
                            teacher_params=gaussian())[0]
      return unravel(flat - jnp.linalg.solve(jax.hessian(f)(flat), jax.grad(f)(flat))), None
    return jax.lax.scan(body, params, None, length=60)[0]

  start = {"e": jnp.zeros(3), "ls": jnp.zeros(3)}
  params = iterate(start)
  x = jax.random.normal(jax.random.key(3), (512, 3), jnp.float64)
  t = jnp.full((512,), 1.2)
  f = scm.consistency_function(family)
  want = M + np.sqrt(V) / np.sqrt(V + (0.5 * np.tan(1.2)) ** 2) * (x / np.cos(1.2) - M)
  got = f(params, x, t)
  assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 1e-3
  np.testing.assert_allclose(params["e"], M, rtol=1e-6)


def test_scm_loss_options_are_checked():
  with pytest.raises(ValueError, match="TrigFlow"):
    scm.scm_loss(family, schedule=schedules.VPLinear())
  with pytest.raises(ValueError, match="tangent_normalization"):
    scm.scm_loss(family, schedule=TRIG, tangent_normalization=0.0)
