"""Consistency models on single-Gaussian data, where the consistency function is closed-form.

For p0 = N(m, diag s^2) the probability-flow map is affine (`analytic.gaussian_flow_map`), so the
consistency function with boundary at t_min is f(x, t) = m + sqrt((s^2 + e^2) / (s^2 + r^2))
(x / alpha - m), r = sigma / alpha, e = r(t_min) (the issue's formula is e = 0). The student is a
per-grid-time affine denoiser wrapped in the boundary parametrization, which represents every
fixed point exactly. Consistency losses have a stop-gradient (or EMA) target, so the fixed point is
reached by iterating: a Newton step of the loss at a fixed target (quadratic in the params, with
a Hessian that is block-diagonal per (grid index, coordinate): two Hessian-vector products give it),
then the target is re-evaluated. Each iteration moves the exact boundary value one grid index up.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffdistill import analytic, schedules
from diffdistill.losses import consistency as cm
from diffdistill.solvers import ddim, grids, heun
from diffdistill.train import state as state_lib, step as step_lib
from diffdistill.method import Method, Update

M = np.array([0.5, -1.0, 2.0])
V = np.array([0.25, 1.5, 0.04])
SCHEDULE = schedules.VPLinear()
SPACING = "logsnr"


def gaussian():
  return analytic.GaussianMixture(np.ones(1), M[None], V[None])


def closed_form(x, t, schedule=SCHEDULE):
  """f(x, t) = m + sqrt((s^2 + e^2) / (s^2 + r^2)) (x / alpha - m), e = r(t_min)."""
  a, r = schedule.alpha(t), schedule.sigma(t) / schedule.alpha(t)
  e = schedule.sigma(schedule.t_min) / schedule.alpha(schedule.t_min)
  return M + np.sqrt((V + e * e) / (V + r * r)) * (x / a - M)


def table_student(n, schedule=SCHEDULE):
  """f of a denoiser D(x, t_k) = c_k x + e_k, k the index of t on the n-interval host grid."""
  host = jnp.asarray(grids.time_grid(schedule, n, spacing=SPACING))

  def denoise(params, x, t, **cond):
    k = jnp.argmin(jnp.abs(host[None] - t[:, None]), axis=1)
    return params["c"][k] * x + params["e"][k]

  return cm.consistency_function(denoise, schedule=schedule, sigma_data=0.5), host


def fixed_point(loss_fn, params, batch, iters, *, mu=0.0, **inputs):
  """Iterates (Newton step at a fixed target; target <- mu target + (1 - mu) params)."""

  @jax.jit
  def run(params):
    def body(carry, _):
      p, target = carry
      f = lambda q: loss_fn(q, batch, jax.random.key(7), target_params=target, **inputs)[0]  # noqa: E731
      g = jax.grad(f)(p)
      hvp = lambda v: jax.jvp(jax.grad(f), (p,), (v,))[1]  # noqa: E731
      one, zero = jnp.ones_like(p["c"]), jnp.zeros_like(p["c"])
      hc, he = hvp({"c": one, "e": zero}), hvp({"c": zero, "e": one})
      det = hc["c"] * he["e"] - he["c"] * hc["e"]
      ok = jnp.abs(det) > 1e-30  # entries no example reaches (the boundary index) stay put
      det = jnp.where(ok, det, 1.0)
      dc = jnp.where(ok, (he["e"] * g["c"] - he["c"] * g["e"]) / det, 0.0)
      de = jnp.where(ok, (hc["c"] * g["e"] - hc["e"] * g["c"]) / det, 0.0)
      p = {"c": p["c"] - dc, "e": p["e"] - de}
      target = jax.tree.map(lambda a, b: mu * a + (1 - mu) * b, target, p)
      return (p, target), None

    return jax.lax.scan(body, (params, params), None, length=iters)[0][0]

  return run(params)


def zeros(n):
  return {"c": jnp.zeros((n + 1, 3)), "e": jnp.zeros((n + 1, 3))}


def teacher_composition(step, x, host, k, schedule=SCHEDULE):
  """The teacher's steps t_k -> ... -> t_N, in data scale (the discrete CD fixed point)."""
  teach = lambda y, t: analytic.denoise(gaussian(), y, t, schedule=schedule)  # noqa: E731
  for i in range(k, len(host) - 1):
    x = step(teach, x, host[i], host[i + 1], schedule=schedule)
  return x / schedule.alpha(host[-1])


def marginal(t, n, key, schedule=SCHEDULE):
  x0 = analytic.sample(gaussian(), jax.random.key(key), n, dtype=jnp.float64)
  z = jax.random.normal(jax.random.key(key + 1), x0.shape, jnp.float64)
  return schedule.alpha(t) * x0 + schedule.sigma(t) * z


def rel(got, want):
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def test_closed_form_is_the_flow_map_to_t_min(x64):
  for t in (1.0, 0.5, 0.1):
    x = marginal(jnp.float64(t), 64, 0)
    flow = analytic.gaussian_flow_map(gaussian(), x, schedule=SCHEDULE, t_start=t,
                                      t_end=SCHEDULE.t_min) / SCHEDULE.alpha(SCHEDULE.t_min)
    np.testing.assert_allclose(closed_form(x, t), flow, rtol=1e-12, atol=1e-12)
  # the e = 0 form, m + s / sqrt(s^2 + r^2) (x / alpha - m), is the map to sigma -> 0
  tiny = schedules.VPLinear(t_min=1e-12)
  x = marginal(jnp.float64(1.0), 64, 0, tiny)
  flow = analytic.gaussian_flow_map(gaussian(), x, schedule=tiny, t_start=1.0, t_end=1e-12)
  a, r = tiny.alpha(1.0), tiny.sigma(1.0) / tiny.alpha(1.0)
  s = np.sqrt(V)
  np.testing.assert_allclose(M + s / np.sqrt(s * s + r * r) * (x / a - M), flow, rtol=1e-9)


def test_boundary_condition(x64):
  denoise = lambda p, x, t: p * jnp.sin(x) + 3.0  # noqa: E731 (any denoiser)
  f = cm.consistency_function(denoise, schedule=SCHEDULE, sigma_data=0.5)
  x = jax.random.normal(jax.random.key(0), (8, 3), jnp.float64)
  t_min = jnp.full((8,), SCHEDULE.t_min)
  np.testing.assert_allclose(f(2.0, x, t_min), x / SCHEDULE.alpha(SCHEDULE.t_min), rtol=1e-14)
  c_skip, c_out = cm.boundary_coefficients(jnp.float64(SCHEDULE.t_min), schedule=SCHEDULE,
                                           sigma_data=0.5)
  assert float(c_skip) == 1.0 and float(c_out) == 0.0
  # with the boundary at e -> 0 the wrapper is the denoiser itself (a student starts as its teacher)
  t = jnp.full((8,), 0.5)
  # (a schedule whose range reaches that boundary: concrete times outside it are an error)
  g = cm.consistency_function(denoise, schedule=dataclasses.replace(SCHEDULE, t_min=1e-300),
                              sigma_data=0.5, t_min=1e-300)
  np.testing.assert_allclose(g(2.0, x, t), denoise(2.0, x, t), rtol=1e-12)


# Heun's fixed point is also checked (against the closed form) at N = 128 below: slow here
@pytest.mark.parametrize("step", [ddim.ddim_step, pytest.param(heun.heun_step,
                                                               marks=pytest.mark.slow)],
                         ids=["ddim", "heun"])
def test_cd_fixed_point_is_the_teachers_composed_steps(x64, step):
  n = 8
  f, host = table_student(n)
  loss_fn = cm.cd_loss(f, analytic.denoiser(SCHEDULE), schedule=SCHEDULE, solver_step=step,
                       num_steps=n, spacing=SPACING)
  batch = {"x": analytic.sample(gaussian(), jax.random.key(1), 2048, dtype=jnp.float64)}
  params = fixed_point(loss_fn, zeros(n), batch, n + 2, teacher_params=gaussian())
  for k in (0, 3, n - 1):
    x = marginal(host[k], 256, 10 + k)
    got = f(params, x, jnp.full((256,), host[k]))
    np.testing.assert_allclose(got, teacher_composition(step, x, host, k), rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_cd_with_an_ema_target_reaches_the_same_fixed_point(x64):
  n = 4
  f, host = table_student(n)
  loss_fn = cm.cd_loss(f, analytic.denoiser(SCHEDULE), schedule=SCHEDULE, num_steps=n,
                       spacing=SPACING)
  batch = {"x": analytic.sample(gaussian(), jax.random.key(1), 1024, dtype=jnp.float64)}
  params = fixed_point(loss_fn, zeros(n), batch, 80, mu=0.7, teacher_params=gaussian())
  x = marginal(host[0], 256, 3)
  np.testing.assert_allclose(f(params, x, jnp.full((256,), host[0])),
                             teacher_composition(ddim.ddim_step, x, host, 0), rtol=1e-8)


def test_cd_with_heun_reaches_the_closed_form_consistency_function(x64):
  n = 128
  f, host = table_student(n)
  loss_fn = cm.cd_loss(f, analytic.denoiser(SCHEDULE), schedule=SCHEDULE,
                       solver_step=heun.heun_step, num_steps=n, spacing=SPACING)
  batch = {"x": analytic.sample(gaussian(), jax.random.key(1), 16 * n, dtype=jnp.float64)}
  params = fixed_point(loss_fn, zeros(n), batch, n + 2, teacher_params=gaussian())
  for k in (0, n // 4, n // 2):
    x = marginal(host[k], 512, 20 + k)
    got = f(params, x, jnp.full((512,), host[k]))
    assert rel(got, closed_form(x, host[k])) < 1e-3, (k, rel(got, closed_form(x, host[k])))


def test_ct_fixed_point_is_cd_with_the_ddim_step(x64):
  # CT's target is a DDIM step of the one-sample denoiser x0; for an affine f and L2 its expected
  # target is CD's with DDIM (Song et al. Thm. 2), so the fixed point is the composed DDIM map
  n = 6
  f, host = table_student(n)
  loss_fn = cm.ct_loss(f, schedule=SCHEDULE, num_steps=n, spacing=SPACING)
  batch = {"x": analytic.sample(gaussian(), jax.random.key(1), 2 ** 16, dtype=jnp.float64)}
  params = fixed_point(loss_fn, zeros(n), batch, n + 2, step=jnp.int32(0))
  for k in (0, 2):
    x = marginal(host[k], 512, 30 + k)
    got = f(params, x, jnp.full((512,), host[k]))
    want = teacher_composition(ddim.ddim_step, x, host, k)
    assert rel(got, want) < 1e-2, (k, rel(got, want))


def test_ct_curricula_match_the_papers():
  ks = jnp.asarray([0, 50_000, 100_000, 349_999, 350_000, 400_000])
  np.testing.assert_array_equal(cm.ict_num_steps(ks, total_steps=400_000),
                                [10, 20, 40, 640, 1280, 1280])
  n = cm.ct_num_steps(jnp.asarray([0, 400_000]), total_steps=400_000, s0=2, s1=150)
  np.testing.assert_array_equal(n, [1, 150])  # N(0) = 2 points, N(K) = s1 + 1 points
  mu = cm.ct_mu(total_steps=400_000, mu0=0.9, s0=2, s1=150)
  np.testing.assert_allclose(mu(jnp.int32(0)), 0.9, rtol=1e-6)  # exp(2 log 0.9 / 2)
  # the first stage is already 1/q (ECT's code: 1/q^(stage + 1)); a first d = 1 only denoises
  np.testing.assert_allclose(cm.ect_gap(jnp.asarray([0, 9, 10, 25]), stage_steps=10),
                             [0.5, 0.5, 0.25, 0.125])
  np.testing.assert_allclose(cm.ect_gap(jnp.asarray([0, 10]), stage_steps=10, q=4), [0.25, 1 / 16])


def test_ict_lognormal_interval_draw():
  n, p_mean, p_std = 16, -1.1, 2.0
  edm = schedules.EDM()
  host = grids.time_grid(edm, n, spacing="karras")  # t = sigma, decreasing
  from scipy.special import erf  # noqa: PLC0415
  cdf = erf((np.log(host) - p_mean) / (np.sqrt(2) * p_std))
  want = (cdf[:-1] - cdf[1:]) / (cdf[0] - cdf[-1])
  grid = lambda i, m: jnp.asarray(host)[jnp.minimum(i, n)]  # noqa: E731 (sigma_hat = t for EDM)
  draws = cm._sample_intervals(jax.random.key(0), 200_000, jnp.int32(n), lognormal=(p_mean, p_std),
                               max_intervals=32, grid=grid)
  got = np.bincount(np.asarray(draws), minlength=32) / 200_000
  assert np.all(got[n:] == 0)
  np.testing.assert_allclose(got[:n], want, atol=4e-3)


def test_ct_curriculum_never_recompiles_the_step():
  n_fn = functools.partial(cm.ct_num_steps, total_steps=16, s0=2, s1=12)
  f = cm.consistency_function(lambda p, x, t: p["c"] * x + p["e"], schedule=SCHEDULE,
                              sigma_data=0.5)
  loss_fn = chex.assert_max_traces(cm.ct_loss(f, schedule=SCHEDULE, num_steps=n_fn,
                                              spacing=SPACING), n=1)
  method = Method(name="ct", updates=(Update(player="student", loss_fn=loss_fn, inputs={
      "target_params": "players/student/ema/target", "step": "step"}),))
  params = {"c": jnp.ones(3), "e": jnp.zeros(3)}
  player = state_lib.Player.create(params=params, tx=optax.sgd(1e-2), ema={
      "target": cm.ct_mu(total_steps=16, mu0=0.9, s0=2, s1=12)})
  state = state_lib.TrainState.create(players={"student": player}, rng=jax.random.key(0))
  step = step_lib.make_step(method, mesh=step_lib.make_mesh())
  batch = {"x": jnp.asarray(analytic.sample(gaussian(), jax.random.key(1), 64), jnp.float32)}
  seen = set()
  for _ in range(16):
    state, metrics = step(state, batch)
    seen.add(int(metrics["num_intervals"]))
  assert len(seen) >= 5, seen  # N(k) changed at least four times, with one trace of the loss


def test_multistep_sampling_with_the_exact_consistency_function(x64):
  exact = lambda p, x, t: closed_form(x, t[:, None])  # noqa: E731
  x_T = marginal(jnp.float64(SCHEDULE.t_max), 512, 5)
  one = cm.multistep_sample(exact, None, x_T, schedule=SCHEDULE, times=[SCHEDULE.t_max],
                            rng=jax.random.key(0))
  want = analytic.gaussian_flow_map(gaussian(), x_T, schedule=SCHEDULE, t_start=SCHEDULE.t_max,
                                    t_end=SCHEDULE.t_min)
  np.testing.assert_allclose(one, want, rtol=1e-12)
  # two steps with the exact f: still exact samples of the data, mean and variance
  x_T = marginal(jnp.float64(SCHEDULE.t_max), 100_000, 6)
  two = cm.multistep_sample(exact, None, x_T, schedule=SCHEDULE, times=[SCHEDULE.t_max, 0.3],
                            rng=jax.random.key(0))
  a, s = SCHEDULE.alpha(SCHEDULE.t_min), SCHEDULE.sigma(SCHEDULE.t_min)
  np.testing.assert_allclose(jnp.mean(two, 0), a * M, atol=2e-2)
  np.testing.assert_allclose(jnp.var(two, 0), a * a * V + s * s, rtol=2e-2)
  with pytest.raises(ValueError, match="decreasing"):
    cm.multistep_sample(exact, None, x_T, schedule=SCHEDULE, times=[0.3, 0.5], rng=None)
