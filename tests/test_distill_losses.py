"""Distillation losses on single-Gaussian data, where every optimum is a closed form.

For p0 = N(m, diag(v)) the exact denoiser is affine in x at every t, and so are the teacher's
probability-flow map (`analytic.gaussian_flow_map`), its DDIM steps and the reflow velocity at a
fixed s. A student that is affine in x can therefore represent each loss's optimum exactly, and
since each loss is quadratic in the affine student's parameters, one Newton step from anywhere
lands on the loss's minimiser: the tests compare that minimiser with the closed form.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, schedules
from diffdistill import solvers
from diffdistill.losses import distances, kd, progressive, rectified_flow
from diffdistill.solvers import ddim, grids
from diffdistill.solvers.grid_points import grid_time

M = np.array([0.5, -1.0, 2.0])
V = np.array([0.25, 1.5, 0.04])


def gaussian():
  return analytic.GaussianMixture(np.ones(1), M[None], V[None])


def affine(params, x, t, **cond):
  """A time-independent affine denoiser D(x) = c * x + e (the student family)."""
  del t, cond
  return params["c"] * x + params["e"]


@functools.lru_cache(maxsize=None)
def _newton_step(loss_fn):
  """One jitted Newton step per loss (repeated calls with new arguments compile nothing)."""

  @jax.jit
  def step(params, args, kwargs):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    f = lambda p: loss_fn(unravel(p), *args, **kwargs)[0]  # noqa: E731
    # pinv: parameters a loss never touches (a grid time it never draws) keep their value
    return unravel(flat - jnp.linalg.pinv(jax.hessian(f)(flat), hermitian=True) @ jax.grad(f)(flat))

  return step


def newton(loss_fn, params, *args, **kwargs):
  """The minimiser of a loss that is quadratic in params: one Newton step."""
  return _newton_step(loss_fn)(params, args, kwargs)


def zeros():
  return {"c": jnp.zeros(3), "e": jnp.zeros(3)}


@pytest.mark.parametrize("schedule", [schedules.VPLinear(), schedules.EDM(),
                                      schedules.RectifiedFlow(t_max=1.0), schedules.VPCosine()])
@pytest.mark.parametrize("spacing", grids.SPACINGS)
def test_traced_grid_equals_host_grid(x64, schedule, spacing):
  fn = jax.jit(lambda i, n: grid_time(schedule, i, n, spacing=spacing))
  for n in (1, 3, 8):
    host = grids.time_grid(schedule, n, spacing=spacing)
    traced = fn(jnp.arange(n + 1), jnp.int32(n))
    np.testing.assert_allclose(np.asarray(traced), host, rtol=1e-12, atol=1e-14)


def test_traced_grid_does_not_retrace_when_n_changes():
  fn = jax.jit(chex.assert_max_traces(
      lambda i, n: grid_time(schedules.VPLinear(), i, n, spacing="logsnr"), n=1))
  for n in (16, 8, 4, 2, 1):
    fn(jnp.arange(3), jnp.int32(n))


def test_pd_target_makes_one_student_step_land_on_two_teacher_steps(x64):
  mix, schedule = analytic.mixture64(dim=4, num_components=3), schedules.VPLinear(t_min=0.0)
  teach = lambda x, t: analytic.denoise(mix, x, t, schedule=schedule)  # noqa: E731
  x_t = jax.random.normal(jax.random.key(0), (16, 4), jnp.float64)
  for t, t_mid, t2 in ((0.9, 0.6, 0.4), (0.3, 0.1, 0.0)):  # the second ends at sigma = 0
    t, t_mid, t2 = (jnp.full((16,), v, jnp.float64) for v in (t, t_mid, t2))
    z2 = ddim.ddim_step(teach, ddim.ddim_step(teach, x_t, t, t_mid, schedule=schedule), t_mid, t2,
                        schedule=schedule)
    target = progressive.pd_target(x_t, z2, t, t2, schedule=schedule)
    one = ddim.ddim_step(lambda x, tt: target, x_t, t, t2, schedule=schedule)
    np.testing.assert_allclose(one, z2, rtol=1e-10, atol=1e-12)


def test_pd_minimiser_is_the_teachers_two_step_map(x64):
  # N = 1: the student's single DDIM step must reproduce the teacher's 2-step DDIM sampler.
  mix, schedule = gaussian(), schedules.VPLinear()
  teacher = analytic.denoiser(schedule)
  loss_fn = progressive.pd_loss(affine, teacher, schedule=schedule, spacing="logsnr")
  batch = {"x": analytic.sample(mix, jax.random.key(1), 512, dtype=jnp.float64)}
  params = newton(loss_fn, zeros(), batch, jax.random.key(2), teacher_params=mix,
                  num_steps=jnp.int32(1))
  x_T = jax.random.normal(jax.random.key(3), (256, 3), jnp.float64)
  student = solvers.sample(lambda x, t: affine(params, x, t), x_T, schedule=schedule,
                           solver="ddim", nfe=1)
  two = solvers.sample(lambda x, t: teacher(mix, x, t), x_T, schedule=schedule, solver="ddim",
                       nfe=2)
  np.testing.assert_allclose(student, two, rtol=1e-8, atol=1e-8)


def test_kd_minimiser_is_the_closed_form_flow_map(x64):
  mix, schedule = gaussian(), schedules.VPLinear()
  x_T = jax.random.normal(jax.random.key(0), (512, 3), jnp.float64)
  exact = lambda x: analytic.gaussian_flow_map(mix, x, schedule=schedule,  # noqa: E731
                                               t_start=schedule.t_max, t_end=schedule.t_min)
  loss_fn = kd.kd_loss(affine, schedule=schedule, num_steps=1, distance="l2")
  params = newton(loss_fn, zeros(), {"x_T": x_T, "x": exact(x_T)}, jax.random.key(1))
  held_out = jax.random.normal(jax.random.key(5), (512, 3), jnp.float64)
  sampler = kd.student_sampler(affine, schedule=schedule, num_steps=1)
  got, want = sampler(params, held_out), exact(held_out)
  assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 1e-3


def test_kd_gradient_reaches_every_student_step():
  # a k-step student is trained through all k steps: each step's denoiser call gets gradient
  schedule = schedules.VPLinear()
  def student(params, x, t):  # a per-call scale, indexed by which grid time t is
    host = jnp.asarray(grids.time_grid(schedule, 3), jnp.float32)[:-1]
    k = jnp.argmin(jnp.abs(host[None] - t[:, None]), axis=1)
    return params["s"][k][:, None] * x
  loss_fn = kd.kd_loss(student, schedule=schedule, num_steps=3)
  batch = {"x_T": jnp.ones((8, 2)), "x": jnp.zeros((8, 2))}
  g = jax.grad(lambda p: loss_fn(p, batch, None)[0])({"s": jnp.ones(3)})["s"]
  assert np.all(np.abs(np.asarray(g)) > 1e-6), g


def test_copy_minimiser_is_the_exact_denoiser(x64):
  mix, schedule = gaussian(), schedules.VPLinear()
  t0 = 0.4

  class Fixed(schedules.UniformTime):
    def sample(self, rng, shape, *, schedule, dtype=jnp.float32):
      return jnp.full(shape, t0, dtype)

  loss_fn = kd.copy_loss(affine, analytic.denoiser(schedule), schedule=schedule,
                         time_sampler=Fixed())
  batch = {"x": analytic.sample(mix, jax.random.key(1), 512, dtype=jnp.float64)}
  params = newton(loss_fn, zeros(), batch, jax.random.key(2), teacher_params=mix)
  a, s = float(schedule.alpha(t0)), float(schedule.sigma(t0))
  np.testing.assert_allclose(params["c"], a * V / (a * a * V + s * s), rtol=1e-8)
  np.testing.assert_allclose(params["e"], M - a * a * V / (a * a * V + s * s) * M, rtol=1e-8)


class FixedS(schedules.UniformTime):
  def __init__(self, s):
    object.__setattr__(self, "s", s)

  def sample(self, rng, shape, *, schedule, dtype=jnp.float32):
    return jnp.full(shape, self.s, dtype)


def test_reflow_minimiser_is_the_straight_line_velocity(x64):
  # Pairs from the exact coupling x0 = A x_T + b; at a fixed s the optimal velocity
  # E[x_T - x0 | x_s] = (1 - A) M_s^{-1} (x_s - (1 - s) b) - b, M_s = (1 - s) A + s.
  mix, teacher_schedule = gaussian(), schedules.RectifiedFlow(t_max=1.0)
  rf = schedules.RectifiedFlow(t_min=1e-5, t_max=1.0)
  x_T = jax.random.normal(jax.random.key(0), (512, 3), jnp.float64)
  x0 = analytic.gaussian_flow_map(mix, x_T, schedule=teacher_schedule, t_start=1.0,
                                  t_end=teacher_schedule.t_min)
  a_vec = np.sqrt((1 - teacher_schedule.t_min) ** 2 * V + teacher_schedule.t_min ** 2)
  b_vec = (1 - teacher_schedule.t_min) * M
  for s in (1.0, 0.5):
    loss_fn = rectified_flow.reflow_loss(affine, kind="flow", schedule=rf, time_sampler=FixedS(s))
    params = newton(loss_fn, zeros(), {"x_T": x_T, "x": x0}, jax.random.key(1))
    m_s = (1 - s) * a_vec + s
    np.testing.assert_allclose(params["c"], (1 - a_vec) / m_s, rtol=1e-8)
    np.testing.assert_allclose(params["e"], -(1 - a_vec) / m_s * (1 - s) * b_vec - b_vec,
                               rtol=1e-8, atol=1e-10)
    if s == 1.0:  # one Euler step of the reflowed velocity is the teacher's coupling
      np.testing.assert_allclose(x_T - (affine(params, x_T, None)), x0, rtol=1e-8, atol=1e-8)


def test_straightness_of_the_exact_one_rectified_flow_matches_quadrature(x64):
  # 1-D data N(0, v) under rectified flow: x(s) = sqrt((1-s)^2 v + s^2) z, so
  # S = int_0^1 [(s - (1-s) v) / sqrt((1-s)^2 v + s^2) - (1 - sqrt v)]^2 ds * E z^2.
  v = 0.09
  mix = analytic.GaussianMixture(np.ones(1), np.zeros((1, 1)), np.full((1, 1), v))
  rf = schedules.RectifiedFlow(t_min=1e-6, t_max=1.0)
  z = jax.random.normal(jax.random.key(0), (20000, 1), jnp.float64)
  got = rectified_flow.straightness(lambda x, s: analytic.denoise(mix, x, s, schedule=rf), z,
                                    schedule=rf, num_steps=2000)
  s = np.linspace(0, 1, 200001)
  integrand = ((s - (1 - s) * v) / np.sqrt((1 - s) ** 2 * v + s ** 2) - (1 - np.sqrt(v))) ** 2
  want = np.trapezoid(integrand, s) * float(jnp.mean(z ** 2))
  assert want > 0.05
  np.testing.assert_allclose(float(got), want, rtol=2e-2)
  # a flow along straight lines at constant speed (data = a point) has S = 0
  point = analytic.GaussianMixture(np.ones(1), np.ones((1, 1)), np.full((1, 1), 1e-12))
  flat = rectified_flow.straightness(lambda x, s: analytic.denoise(point, x, s, schedule=rf), z,
                                     schedule=rf, num_steps=64)
  assert float(flat) < 1e-8


def test_distances():
  x, y = jnp.array([[3.0, 4.0]]), jnp.zeros((1, 2))
  np.testing.assert_allclose(distances.l2(x, y), [12.5])
  np.testing.assert_allclose(distances.l1(x, y), [3.5])
  c = 0.1 * np.sqrt(2)
  np.testing.assert_allclose(distances.get("pseudo_huber", c_scale=0.1)(x, y),
                             [np.sqrt(25 + c * c) - c], rtol=1e-6)
  with pytest.raises(ValueError, match="Unknown distance 'l3'"):
    distances.get("l3")


def per_time_affine(schedule, n):
  """D(x, t) = c_k * x + e_k with k the index of t on the host n-step grid (a student that can
  hold a different affine map at every grid time)."""
  host = np.asarray(grids.time_grid(schedule, n))

  def apply(params, x, t, **cond):
    del cond
    k = jnp.argmin(jnp.abs(jnp.asarray(host, x.dtype)[None] - t[:, None]), axis=1)
    return params["c"][k] * x + params["e"][k]

  return apply, {"c": jnp.zeros((n + 1, 3)), "e": jnp.zeros((n + 1, 3))}


def test_tract_fixed_point_is_the_teachers_ddim_within_a_segment(x64):
  # One segment over a 4-step teacher grid: from t_0 the student's single DDIM step to t_4 must
  # equal 4 teacher DDIM steps (the transitive closure through the self-teacher).
  from diffdistill.losses import tract  # noqa: PLC0415
  mix, schedule = gaussian(), schedules.VPLinear()
  teacher = analytic.denoiser(schedule)
  student, params = per_time_affine(schedule, 4)
  loss_fn = tract.tract_loss(student, teacher, schedule=schedule)
  batch = {"x": analytic.sample(mix, jax.random.key(1), 1024, dtype=jnp.float64)}
  for _ in range(5):  # the self-teacher (stop-gradient student) moves to the fixed point
    params = newton(loss_fn, params, batch, jax.random.key(2), teacher_params=mix,
                    self_teacher_params=params, teacher_steps=jnp.int32(4),
                    num_segments=jnp.int32(1))
  x_T = jax.random.normal(jax.random.key(3), (256, 3), jnp.float64)
  one = solvers.sample(lambda x, t: student(params, x, t), x_T, schedule=schedule, solver="ddim",
                       nfe=1)
  four = solvers.sample(lambda x, t: teacher(mix, x, t), x_T, schedule=schedule, solver="ddim",
                        nfe=4)
  np.testing.assert_allclose(one, four, rtol=1e-7, atol=1e-8)


def test_boot_fixed_point_is_the_closed_form_flow_map(x64):
  # With an exact teacher step, the bootstrapped student's one-step output at every grid time is
  # the exact flow map from x_T (closed form for Gaussian data).
  from diffdistill.losses import boot  # noqa: PLC0415
  mix, schedule, n = gaussian(), schedules.VPLinear(), 4

  def exact_step(denoise, x, t_s, t_t, *, schedule):
    del denoise
    a0, s0 = schedule.alpha(t_s)[:, None], schedule.sigma(t_s)[:, None]
    a1, s1 = schedule.alpha(t_t)[:, None], schedule.sigma(t_t)[:, None]
    return a1 * M + jnp.sqrt((a1 ** 2 * V + s1 ** 2) / (a0 ** 2 * V + s0 ** 2)) * (x - a0 * M)

  student, params = per_time_affine(schedule, n)
  loss_fn = boot.boot_loss(student, analytic.denoiser(schedule), schedule=schedule,
                           step=exact_step)
  x_T = float(schedule.sigma(schedule.t_max)) * jax.random.normal(jax.random.key(0), (1024, 3),
                                                                  jnp.float64)
  for _ in range(n + 1):  # each sweep fixes one more grid time
    params = newton(loss_fn, params, {"x_T": x_T}, jax.random.key(1), teacher_params=mix,
                    num_steps=jnp.int32(n))
  held_out = jax.random.normal(jax.random.key(5), (256, 3), jnp.float64)
  for k in (1, n):
    t = float(grids.time_grid(schedule, n)[k])
    got = boot.boot_state(student, params, held_out, t, schedule=schedule,
                          t_start=schedule.t_max)
    want = analytic.gaussian_flow_map(mix, held_out, schedule=schedule, t_start=schedule.t_max,
                                      t_end=t)
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 1e-3


def test_guided_stage1_minimiser_is_the_guided_teacher(x64):
  # Two classes, each one component of a 2-component mixture (the null class is the mixture).
  # A student that scales the exact guided denoiser D_null + w (D_c - D_null) by `a` must have
  # its minimiser at a = 1: the target uses each example's own label and w, null label = 2.
  schedule = schedules.VPLinear()
  means, var = np.array([[1.0, 0.0], [-1.0, 0.5]]), np.full((2, 2), 0.1)
  classes = [analytic.GaussianMixture(np.ones(1), means[k:k + 1], var[k:k + 1]) for k in (0, 1)]
  null = analytic.GaussianMixture(np.ones(2), means, var)

  def teacher(params, x, t, *, label):
    d = [analytic.denoise(m, x, t, schedule=schedule) for m in (*classes, null)]
    lab = label[:, None]
    return jnp.where(lab == 0, d[0], jnp.where(lab == 1, d[1], d[2]))

  def student(params, x, t, *, label, w):
    d_c = teacher(None, x, t, label=label)
    d_n = teacher(None, x, t, label=jnp.full_like(label, 2))
    return params["a"] * (d_n + w[:, None] * (d_c - d_n))

  loss_fn = progressive.guided_copy_loss(student, teacher, schedule=schedule, null_label=2,
                                         guidance=(1.0, 4.0))
  rng = np.random.default_rng(0)
  label = rng.integers(0, 2, 512)
  batch = {"x": jnp.asarray(means[label] + 0.3 * rng.standard_normal((512, 2))),
           "label": jnp.asarray(label)}
  params = newton(loss_fn, {"a": jnp.zeros(())}, batch, jax.random.key(1), teacher_params=None)
  np.testing.assert_allclose(float(params["a"]), 1.0, rtol=1e-10)


def test_guided_pd_minimiser_is_the_guided_teachers_two_step_map(x64):
  # Guided PD stage 2 (pd_loss with guidance): labels and w reach teacher and student alike.
  # Two classes and a null law, each one Gaussian: the guided denoiser D_0 + w (D_c - D_0) is
  # affine in x with coefficients linear in w, so two teacher DDIM steps give a target quadratic
  # in w, which the student sum_p w^p (c[label, p] x + e[label, p]) represents exactly. Its one
  # DDIM step from t_max must land on the guided teacher's two steps for every (label, w).
  schedule = schedules.VPLinear()
  laws = (analytic.GaussianMixture(np.ones(1), M[None], V[None]),
          analytic.GaussianMixture(np.ones(1), -M[None], V[::-1][None]),
          analytic.GaussianMixture(np.ones(1), np.zeros((1, 3)), np.ones((1, 3))))
  teacher = analytic.GuidedDenoiser(schedule)

  def student(params, x, t, *, label, w):
    del t
    powers = jnp.stack([jnp.ones_like(w), w, w * w], axis=1)  # [B, 3]
    c = jnp.einsum("bp,bpd->bd", powers, params["c"][label])
    e = jnp.einsum("bp,bpd->bd", powers, params["e"][label])
    return c * x + e

  loss_fn = progressive.pd_loss(student, teacher, schedule=schedule, guidance=(1.0, 4.0))
  rng = np.random.default_rng(0)
  label = rng.integers(0, 2, 2048)
  batch = {"x": jnp.asarray(np.where(label[:, None] == 0, M, -M) + rng.standard_normal((2048, 3))),
           "label": jnp.asarray(label)}
  params = newton(loss_fn, {"c": jnp.zeros((2, 3, 3)), "e": jnp.zeros((2, 3, 3))}, batch,
                  jax.random.key(2), teacher_params=laws, num_steps=jnp.int32(1))
  x_T = jax.random.normal(jax.random.key(3), (256, 3), jnp.float64)
  cond = {"label": jnp.asarray(rng.integers(0, 2, 256)),
          "w": jnp.asarray(rng.uniform(1.0, 4.0, 256))}
  one = solvers.sample(lambda x, t: student(params, x, t, **cond), x_T, schedule=schedule,
                       solver="ddim", nfe=1)
  two = solvers.sample(lambda x, t: teacher(laws, x, t, **cond), x_T, schedule=schedule,
                       solver="ddim", nfe=2)
  np.testing.assert_allclose(one, two, rtol=1e-8, atol=1e-8)
