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


M2, V2 = np.array([-1.0, 0.5, 0.0]), np.array([0.5, 0.1, 1.0])


def two_classes():
  mix = analytic.GaussianMixture(np.array([0.5, 0.5]), np.stack([M, M2]), np.stack([V, V2]))
  return analytic.class_mixtures(mix, np.array([0, 1]))


def family_by_class(params, x, t, *, label):
  """`family` with each example's class's (e, ln s_hat): the exact conditional consistency
  function of each class's Gaussian at EXACT2."""
  return family({k: v[label] for k, v in params.items()}, x, t)


EXACT2 = {"e": jnp.asarray(np.stack([M, M2]))[:, None, :],
          "ls": jnp.asarray(0.5 * np.log(np.stack([V, V2])))[:, None, :]}


def test_guided_scd_distils_the_guided_teachers_velocity(x64):
  """Classifier-free guidance in sCD's teacher. At w = 1 the guided teacher is the conditional
  one, so the per-class closed form is sCD's fixed point (zero loss); at w = 2.5 it no longer is,
  and the loss equals the unguided loss of a teacher with w = 2.5 built in, to the bit."""
  classes = two_classes()
  guided_teacher = analytic.GuidedDenoiser(TRIG)
  n = 1024
  label = jnp.arange(n) % 2
  x = jnp.where(label[:, None] == 0, analytic.sample(classes[0], jax.random.key(0), n, dtype=jnp.float64),
                analytic.sample(classes[1], jax.random.key(1), n, dtype=jnp.float64))
  batch = {"x": x, "label": label}
  opts = dict(schedule=TRIG, tangent_normalization=None, warmup_steps=0, adaptive_weighting=False)
  params = {k: v[:, 0, :] for k, v in EXACT2.items()}

  def loss(w, teacher=guided_teacher, **kw):
    fn = scm.scm_loss(family_by_class, teacher, guidance=None if w is None else (w, w), **opts, **kw)
    return fn(params, batch, jax.random.key(2), step=0, teacher_params=classes)

  assert float(loss(1.0)[1]["l2"]) < 1e-12
  guided_value, guided_aux = loss(2.5)
  assert float(guided_aux["l2"]) > 1e-4
  built_in = lambda p, xx, t, *, label: guided_teacher(p, xx, t, label=label, w=2.5)  # noqa: E731
  unguided_value, _ = loss(None, teacher=built_in)
  assert float(guided_value) == float(unguided_value)


def test_guidance_range_conditions_the_student_on_w(x64):
  seen = {}

  def student(params, x, t, *, label, w=None):
    seen["w"] = None if w is None else w.shape
    return family_by_class(params, x, t, label=label)

  batch = {"x": jnp.zeros((8, 3)) + 0.1, "label": jnp.arange(8) % 2}
  params = {k: v[:, 0, :] for k, v in EXACT2.items()}
  for guidance, want in (((1.0, 4.0), (8,)), ((2.0, 2.0), None)):
    fn = scm.scm_loss(student, analytic.GuidedDenoiser(TRIG), schedule=TRIG, warmup_steps=0,
                      adaptive_weighting=False, guidance=guidance)
    fn(params, batch, jax.random.key(0), step=0, teacher_params=two_classes())
    assert seen["w"] == want, guidance
  with pytest.raises(ValueError, match="guidance needs a teacher"):
    scm.scm_loss(family, schedule=TRIG, guidance=(1.0, 2.0))
  with pytest.raises(ValueError, match="w_min <= w_max"):
    scm.scm_loss(family, analytic.denoiser(TRIG), schedule=TRIG, guidance=(3.0, 2.0))
  fn = scm.scm_loss(family, analytic.denoiser(TRIG), schedule=TRIG, guidance=(1.0, 2.0))
  with pytest.raises(ValueError, match="labelled batches"):
    fn({"net": EXACT, "logvar": scm.logvar_init(4)}, {"x": jnp.zeros((4, 3))}, jax.random.key(0),
       step=0, teacher_params=gaussian())
