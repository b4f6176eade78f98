"""Consistency trajectory models on single-Gaussian data, where each jump G(x, t, s) is closed-form.

For p0 = N(m, diag v) the probability-flow map t -> s is affine (`analytic.gaussian_flow_map`),
so the exact G is known for every pair. The student is an affine-in-x denoiser g whose
coefficients are looked up per grid pair (t_i, s_j): G then represents every exact jump. The CTM
loss has a stop-gradient target, so its fixed point is reached by iterating a Newton step at a
fixed target (the loss is quadratic with a Hessian block-diagonal per (pair, coordinate), as in
tests/test_consistency.py); each iteration makes the pairs one grid interval further apart exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, schedules
from diffdistill.losses import consistency as cm
from diffdistill.losses import ctm, distances
from diffdistill.solvers import ddim, grids

M = np.array([0.5, -1.0, 2.0])
V = np.array([0.25, 1.5, 0.04])
SCHEDULE = schedules.VPLinear()
SPACING = "logsnr"


def gaussian(m=M, v=V):
  return analytic.GaussianMixture(np.ones(1), np.asarray(m)[None], np.asarray(v)[None])


def flow(mix, x, t, s):
  """The exact jump t -> s of mixture `mix`'s flow, t and s per example [B] (or scalars)."""
  t, s = jnp.asarray(t, x.dtype), jnp.asarray(s, x.dtype)
  return analytic.gaussian_flow_map(mix, x, schedule=SCHEDULE, t_start=t[..., None] if t.ndim
                                    else t, t_end=s[..., None] if s.ndim else s)


def exact_step(denoise, x, t_s, t_t, *, schedule, rng=None):
  """The teacher's step replaced by the exact flow map of the data (a solver with zero error)."""
  del denoise, rng
  assert schedule == SCHEDULE
  return flow(gaussian(), x, t_s, t_t)


def exact_G(params, x, t, s):
  """G of a Gaussian 'params' (a mixture): its exact jump t -> s."""
  return flow(params, x, t, s)


def marginal(t, n, key):
  x0 = analytic.sample(gaussian(), jax.random.key(key), n, dtype=jnp.float64)
  z = jax.random.normal(jax.random.key(key + 1), x0.shape, jnp.float64)
  return SCHEDULE.alpha(t) * x0 + SCHEDULE.sigma(t) * z


def rel(got, want):
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def table_denoiser(n):
  """g(x, t_i, s=t_j) = c_ij x + e_ij, (i, j) the indices of (t, s) on the n-interval host grid."""
  host = jnp.asarray(grids.time_grid(SCHEDULE, n, spacing=SPACING))

  def denoise(params, x, t, *, s):
    index = lambda v: jnp.argmin(jnp.abs(host[None] - v[:, None]), axis=1)  # noqa: E731
    i, j = index(t), index(s)
    return params["c"][i, j] * x + params["e"][i, j]

  return denoise, host


def fixed_point(loss_fn, params, batch, iters, **inputs):
  """Iterates (Newton step at a fixed target; target <- params)."""

  @jax.jit
  def run(params, batch, key, inputs):  # all arguments: nothing for XLA to constant-fold
    def body(p, _):
      f = lambda q: loss_fn(q, batch, key, target_params=p, **inputs)[0]  # noqa: E731
      g = jax.grad(f)(p)
      hvp = lambda v: jax.jvp(jax.grad(f), (p,), (v,))[1]  # noqa: E731
      one, zero = jnp.ones_like(p["c"]), jnp.zeros_like(p["c"])
      hc, he = hvp({"c": one, "e": zero}), hvp({"c": zero, "e": one})
      det = hc["c"] * he["e"] - he["c"] * hc["e"]
      ok = jnp.abs(det) > 1e-30  # entries no example reaches (s above t) stay put
      det = jnp.where(ok, det, 1.0)
      dc = jnp.where(ok, (he["e"] * g["c"] - he["c"] * g["e"]) / det, 0.0)
      de = jnp.where(ok, (hc["c"] * g["e"] - hc["e"] * g["c"]) / det, 0.0)
      return {"c": p["c"] - dc, "e": p["e"] - de}, None

    return jax.lax.scan(body, params, None, length=iters)[0]

  return run(params, batch, jax.random.key(7), inputs)


def test_boundary_condition_and_the_teachers_ddim_step(x64):
  denoise = lambda p, x, t, *, s: p * jnp.sin(x) + 3.0 + s[:, None]  # noqa: E731 (any g)
  G = ctm.trajectory_function(denoise, schedule=SCHEDULE)
  x = jax.random.normal(jax.random.key(0), (8, 3), jnp.float64)
  for t in (1.0, 0.37, SCHEDULE.t_min):
    tt = jnp.full((8,), t)
    np.testing.assert_array_equal(G(2.0, x, tt, tt), x)  # exactly, for any params
  with jax.enable_x64(False):
    x32 = x.astype(jnp.float32)
    tt = jnp.full((8,), 0.37, jnp.float32)
    np.testing.assert_array_equal(G(2.0, x32, tt, tt), x32)
  # with g the teacher's denoiser (s ignored: a student initialized from it) G is its DDIM step
  mix = gaussian()
  G = ctm.trajectory_function(lambda p, x, t, *, s: analytic.denoise(p, x, t, schedule=SCHEDULE),
                              schedule=SCHEDULE)
  teach = lambda x, t: analytic.denoise(mix, x, t, schedule=SCHEDULE)  # noqa: E731
  t, s = jnp.full((8,), 0.8), jnp.full((8,), 0.2)
  np.testing.assert_allclose(G(mix, x, t, s), ddim.ddim_step(teach, x, t, s, schedule=SCHEDULE),
                             rtol=1e-12, atol=1e-12)


def test_terms_compare_at_time_zero_through_the_target_params(x64):
  # online G: the exact jumps of another Gaussian; target G: the data's. The target is then the
  # exact map t -> 0 and the estimate is the data's map s -> 0 of the online jump t -> s
  online, target = gaussian(M + 0.3, V * 1.7), gaussian()
  b = 64
  x_t = marginal(jnp.float64(0.9), b, 3)
  t, u, s = jnp.full((b,), 0.9), jnp.full((b,), 0.7), jnp.full((b,), 0.5)
  t0 = jnp.full((b,), SCHEDULE.t_min)
  x_u = flow(target, x_t, t, u)
  terms, _, _ = ctm.ctm_terms(exact_G, online, target, x_t, t, s, x_u, u, t_end=t0,
                              dist=distances.l2)
  want = distances.l2(flow(target, flow(online, x_t, t, s), s, t0), flow(target, x_t, t, t0))
  np.testing.assert_allclose(terms, want, rtol=1e-12)
  # the map s -> 0 shrinks coordinates unequally (v = 0.04 by ~0.26): not the error at time s
  at_s = distances.l2(flow(online, x_t, t, s), flow(target, x_t, t, s))
  assert float(jnp.max(jnp.abs(at_s / want - 1))) > 0.5


@pytest.mark.slow  # ~20 s; the per-example loss-terms test guards the target's construction fast
def test_ctm_fixed_point_is_the_exact_jump_and_dsm_the_denoiser(x64):
  n = 6
  denoise, host = table_denoiser(n)
  G = ctm.trajectory_function(denoise, schedule=SCHEDULE)
  loss_fn = ctm.ctm_loss(denoise, analytic.denoiser(SCHEDULE), schedule=SCHEDULE,
                         solver_step=exact_step, num_steps=n, spacing=SPACING, dsm_weight=0.5)
  batch = {"x": analytic.sample(gaussian(), jax.random.key(1), 2 ** 14, dtype=jnp.float64)}
  zeros = {"c": jnp.zeros((n + 1, n + 1, 3)), "e": jnp.zeros((n + 1, n + 1, 3))}
  params = fixed_point(loss_fn, zeros, batch, n + 1, teacher_params=gaussian())
  for i, j in ((0, 1), (0, n), (2, 5), (1, 3), (n - 1, n)):
    x = marginal(host[i], 256, 10 + i)
    got = G(params, x, jnp.full((256,), host[i]), jnp.full((256,), host[j]))
    assert rel(got, flow(gaussian(), x, host[i], host[j])) < 1e-10, (i, j)  # measured 4e-16
  # g(x, t, t) is trained by the DSM term alone: the posterior mean, up to the sampling error of
  # the ~2^14 / n examples per grid time (measured 6e-2 at t_0, where x reaches 4 sigma)
  for i in (0, 3, n - 1):
    x = marginal(host[i], 256, 20 + i)
    got = denoise(params, x, jnp.full((256,), host[i]), s=jnp.full((256,), host[i]))
    want = analytic.denoise(gaussian(), x, host[i], schedule=SCHEDULE)
    assert rel(got, want) < 0.15, (i, rel(got, want))


@pytest.mark.slow
def test_ctm_fixed_point_with_the_teachers_ddim_steps_is_their_composition(x64):
  # a real teacher (the analytic denoiser through its params): G(., t_i, t_j) = DDIM i -> j
  n = 4
  denoise, host = table_denoiser(n)
  G = ctm.trajectory_function(denoise, schedule=SCHEDULE)
  loss_fn = ctm.ctm_loss(denoise, analytic.denoiser(SCHEDULE), schedule=SCHEDULE,
                         solver_step=ddim.ddim_step, num_steps=n, spacing=SPACING, dsm_weight=0.0)
  batch = {"x": analytic.sample(gaussian(), jax.random.key(1), 2 ** 12, dtype=jnp.float64)}
  zeros = {"c": jnp.zeros((n + 1, n + 1, 3)), "e": jnp.zeros((n + 1, n + 1, 3))}
  params = fixed_point(loss_fn, zeros, batch, n + 1, teacher_params=gaussian())
  teach = lambda y, t: analytic.denoise(gaussian(), y, t, schedule=SCHEDULE)  # noqa: E731
  for i, j in ((0, n), (1, 3)):
    x = marginal(host[i], 256, 40 + i)
    want = x
    for k in range(i, j):
      want = ddim.ddim_step(teach, want, host[k], host[k + 1], schedule=SCHEDULE)
    got = G(params, x, jnp.full((256,), host[i]), jnp.full((256,), host[j]))
    assert rel(got, want) < 1e-9, (i, j, rel(got, want))


def test_ctm_loss_options():
  denoise, _ = table_denoiser(2)
  teacher = analytic.denoiser(SCHEDULE)
  with pytest.raises(ValueError, match="needs features"):
    ctm.ctm_loss(denoise, teacher, schedule=SCHEDULE, gan_weight=0.1)
  with pytest.raises(ValueError, match="gan_weight must be >= 0"):
    ctm.ctm_loss(denoise, teacher, schedule=SCHEDULE, gan_weight=-1.0)
  with pytest.raises(ValueError, match="max_solver_steps"):
    ctm.ctm_loss(denoise, teacher, schedule=SCHEDULE, max_solver_steps=0)


def counted(G):
  calls = []

  def wrapped(*args, **kwargs):
    calls.append(1)
    return G(*args, **kwargs)

  return wrapped, calls


def test_gamma_zero_with_the_exact_jump_is_the_flow_map(x64):
  x_T = marginal(jnp.float64(SCHEDULE.t_max), 512, 5)
  want = flow(gaussian(), x_T, SCHEDULE.t_max, SCHEDULE.t_min)
  for times in ([SCHEDULE.t_max], [SCHEDULE.t_max, 0.5], [SCHEDULE.t_max, 0.6, 0.3, 0.05]):
    G, calls = counted(exact_G)
    got = ctm.gamma_sample(G, gaussian(), x_T, schedule=SCHEDULE, times=times, gamma=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert len(calls) == len(times)
  with pytest.raises(ValueError, match="gamma"):
    ctm.gamma_sample(exact_G, gaussian(), x_T, schedule=SCHEDULE, times=[1.0], gamma=1.5)


def test_gamma_one_is_multistep_consistency_sampling(x64):
  G = lambda p, x, t, s: exact_G(p, x, t, s) * 1.1 + 0.2  # noqa: E731 (an inexact G)
  f = lambda p, x, t: G(p, x, t, jnp.full_like(t, SCHEDULE.t_min)) / SCHEDULE.alpha(  # noqa: E731
      SCHEDULE.t_min)
  x_T = marginal(jnp.float64(SCHEDULE.t_max), 256, 7)
  times = [SCHEDULE.t_max, 0.6, 0.3]
  got = ctm.gamma_sample(G, gaussian(), x_T, schedule=SCHEDULE, times=times, gamma=1.0,
                         rng=jax.random.key(4))
  want = cm.multistep_sample(f, gaussian(), x_T, schedule=SCHEDULE, times=times,
                             rng=jax.random.key(4))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gamma_half_with_the_exact_jump_samples_the_data(x64):
  # any gamma re-noises to the exact marginal, so exact jumps give exact samples at t_end
  x_T = marginal(jnp.float64(SCHEDULE.t_max), 100_000, 9)
  run = jax.jit(lambda x, key: ctm.gamma_sample(  # under jit, as the recipes run it
      exact_G, gaussian(), x, schedule=SCHEDULE, times=[SCHEDULE.t_max, 0.5], gamma=0.5, rng=key))
  got = run(x_T, jax.random.key(0))
  a, s = SCHEDULE.alpha(SCHEDULE.t_min), SCHEDULE.sigma(SCHEDULE.t_min)
  np.testing.assert_allclose(jnp.mean(got, 0), a * M, atol=2e-2)
  np.testing.assert_allclose(jnp.var(got, 0), a * a * V + s * s, rtol=2e-2)


@pytest.mark.slow  # ~10-25 s of eager float64 CTM draws; the options test stays in the default run
def test_gan_term_wiring(x64):
  """CTM's GAN term: L = L_CTM + L_DSM + lambda [k >= gan_start] L_GAN on the same draw; the
  discriminator's logits read the FROZEN feature network (data logits do not move with the
  student) and its loss trains only the head; the student's GAN gradient reaches the student."""
  n = 4
  denoise, _ = table_denoiser(n)
  teacher = analytic.denoiser(SCHEDULE)
  features = lambda fp, x, t: jnp.tanh(x * fp["a"] + t[:, None])  # noqa: E731
  opts = dict(schedule=SCHEDULE, solver_step=exact_step, num_steps=n, spacing=SPACING)
  base = ctm.ctm_loss(denoise, teacher, **opts)
  gan = ctm.ctm_loss(denoise, teacher, gan_weight=0.3, features=features, gan_start=5, **opts)
  params = {"c": jnp.full((n + 1, n + 1, 1), 0.8), "e": jnp.full((n + 1, n + 1, 3), 0.1)}
  batch = {"x": analytic.sample(gaussian(), jax.random.key(0), 64, dtype=jnp.float64)}
  head = {"w": jnp.array([0.5, -1.0, 0.2]), "b": jnp.asarray(0.1)}
  fp = {"a": jnp.array([1.0, 0.5, -0.3])}
  kw = dict(teacher_params=gaussian(), target_params=params)
  gkw = dict(kw, discriminator_params=head, feature_params=fp)
  value0, aux0 = base(params, batch, jax.random.key(1), **kw)
  value, aux = gan(params, batch, jax.random.key(1), step=5, **gkw)
  assert float(aux["gan"]) > 0
  np.testing.assert_allclose(value, value0 + 0.3 * aux["gan"], rtol=1e-12)
  before, _ = gan(params, batch, jax.random.key(1), step=4, **gkw)  # gan_start not reached
  np.testing.assert_allclose(before, value0, rtol=1e-12)
  grad = lambda f, **k: jax.grad(lambda p: f(p, batch, jax.random.key(1), **k)[0])(params)  # noqa: E731
  assert float(jnp.max(jnp.abs(grad(gan, step=5, **gkw)["c"] - grad(base, **kw)["c"]))) > 1e-6
  with pytest.raises(ValueError, match="exactly when"):
    base(params, batch, jax.random.key(1), step=5, **gkw)

  d_loss = gan.discriminator_loss
  dkw = dict(student_params=params, target_params=params, feature_params=fp)
  _, d_aux = d_loss(head, batch, jax.random.key(2), **dkw)
  moved = jax.tree.map(lambda a: a + 0.3, params)
  _, d_aux_moved = d_loss(head, batch, jax.random.key(2), **{**dkw, "student_params": moved})
  assert float(d_aux_moved["real_logit"]) == float(d_aux["real_logit"])  # data through frozen features
  assert float(d_aux_moved["fake_logit"]) != float(d_aux["fake_logit"])
  _, d_aux_feat = d_loss(head, batch, jax.random.key(2), **{**dkw, "feature_params": {"a": 2 * fp["a"]}})
  assert float(d_aux_feat["real_logit"]) != float(d_aux["real_logit"])
  student_grad = jax.grad(lambda p: d_loss(head, batch, jax.random.key(2), **{**dkw, "student_params": p})[0])(params)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(student_grad))  # sg(x_est)
  method = ctm.consistency_trajectory_model(denoise, teacher, gan_weight=0.3, features=features, **opts)
  assert [u.player for u in method.updates] == ["discriminator", "student"]
  assert method.updates[0].inputs["feature_params"] == method.updates[1].inputs["feature_params"] == "frozen/features"
