"""MeanFlow on single-Gaussian data, where the average velocity is closed-form.

Rectified flow of N(m, diag v): z_t = (1 - t) m + sqrt(A_t) xi, A_t = (1 - t)^2 v + t^2, so the
flow map is z_r = (1 - r) m + sqrt(A_r / A_t) (z_t - (1 - t) m) and the average velocity
u(z, r, t) = (z_t - z_r) / (t - r) = ((t + r) - v (2 - t - r)) / (A_t + sqrt(A_r A_t)) y - m,
y = z - (1 - t) m; at r = t it is the instantaneous velocity (t - (1 - t) v) / A_t y - m.
The student family u_theta (the same expression with (m_hat, s_hat = sqrt v_hat)) holds it exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, schedules
from diffdistill.losses import meanflow

M = np.array([0.5, -1.0, 2.0])
V = np.array([0.25, 1.5, 0.04])
RF = schedules.RectifiedFlow(t_min=1e-3, t_max=1.0)


def gaussian():
  return analytic.GaussianMixture(np.ones(1), M[None], V[None])


def average_velocity(m, v, z, t, r):
  t, r = t[:, None], r[:, None]
  a_t, a_r = (1 - t) ** 2 * v + t ** 2, (1 - r) ** 2 * v + r ** 2
  return ((t + r) - v * (2 - t - r)) / (a_t + jnp.sqrt(a_r * a_t)) * (z - (1 - t) * m) - m


def family(params, z, t, *, r):
  return average_velocity(params["m"], jnp.square(params["s"]), z, t, r)


def solve(loss_fn, batch, **inputs):
  @jax.jit
  def iterate(params):
    def body(p, _):  # a Newton step at the current (stop-gradient) target
      flat, unravel = jax.flatten_util.ravel_pytree(p)
      f = lambda q: loss_fn(unravel(q), batch, jax.random.key(1), **inputs)[0]  # noqa: E731
      # damped (Levenberg-Marquardt): the family is far from quadratic at the start
      h = jax.hessian(f)(flat)
      h = h + 1e-1 * jnp.mean(jnp.abs(jnp.diag(h))) * jnp.eye(flat.size)
      return unravel(flat - jnp.linalg.solve(h, jax.grad(f)(flat))), None
    return jax.lax.scan(body, params, None, length=100)[0]
  return iterate({"m": jnp.zeros(3), "s": jnp.ones(3)})


def test_closed_form_average_velocity_matches_the_flow_map(x64):
  z = jax.random.normal(jax.random.key(0), (64, 3), jnp.float64)
  t, r = jnp.full((64,), 0.8), jnp.full((64,), 0.3)
  z_r = analytic.gaussian_flow_map(gaussian(), z, schedule=RF, t_start=0.8, t_end=0.3)
  np.testing.assert_allclose(average_velocity(M, V, z, t, r), (z - z_r) / 0.5, rtol=1e-12)


def test_meanflow_minimiser_is_the_closed_form_average_velocity(x64):
  batch = {"x": analytic.sample(gaussian(), jax.random.key(0), 2048, dtype=jnp.float64)}
  loss_fn = meanflow.meanflow_loss(family, analytic.denoiser(RF), schedule=RF, ratio_r_neq_t=0.5)
  params = solve(loss_fn, batch, teacher_params=gaussian())
  z = jax.random.normal(jax.random.key(3), (512, 3), jnp.float64)
  t = jax.random.uniform(jax.random.key(4), (512,), jnp.float64, 0.05, 1.0)
  r = t * jax.random.uniform(jax.random.key(5), (512,), jnp.float64)
  # u(z, t, t) is the teacher's instantaneous velocity (z - D(z, t)) / t
  inst = (z - analytic.denoise(gaussian(), z, t, schedule=RF)) / t[:, None]
  np.testing.assert_allclose(family(params, z, t, r=t), inst, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(family(params, z, t, r=r), average_velocity(M, V, z, t, r),
                             rtol=1e-6, atol=1e-6)
  # one step from pure noise is the exact flow map
  one = meanflow.meanflow_sample(family, params, z, times=[1.0, RF.t_min])
  np.testing.assert_allclose(one, analytic.gaussian_flow_map(gaussian(), z, schedule=RF,
                                                             t_start=1.0, t_end=RF.t_min),
                             rtol=1e-6, atol=1e-6)


def test_meanflow_from_data_is_stationary_at_the_average_velocity(x64):
  # eps - x is an unbiased sample of the velocity: the expected gradient vanishes at the closed
  # form (up to sampling error), and not at a perturbed family member
  batch = {"x": analytic.sample(gaussian(), jax.random.key(0), 2 ** 16, dtype=jnp.float64)}
  loss_fn = meanflow.meanflow_loss(family, schedule=RF, adaptive_p=0.0)
  grad = jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.key(1))[0]))
  norm = lambda g: float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g))))  # noqa: E731
  exact = {"m": jnp.asarray(M), "s": jnp.sqrt(jnp.asarray(V))}
  off = {"m": exact["m"] + 0.05, "s": exact["s"] * 1.05}
  assert norm(grad(exact)) < 0.1 * norm(grad(off)), (norm(grad(exact)), norm(grad(off)))


def test_time_sampling_fraction():
  t, r = meanflow.sample_times(jax.random.key(0), 100_000, p_mean=-0.4, p_std=1.0,
                               ratio_r_neq_t=0.25, t_min=0.0, t_max=1.0)
  assert bool(jnp.all(t >= r))
  np.testing.assert_allclose(float(jnp.mean(r != t)), 0.25, atol=5e-3)
  with pytest.raises(ValueError, match="ratio_r_neq_t"):
    meanflow.meanflow_loss(family, ratio_r_neq_t=1.5)
