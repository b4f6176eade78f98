"""Distribution-matching generator gradients away from the optimum, against closed forms.

At the optimum every term of a generator gradient vanishes, so a wrong coefficient or a normalizer
taken from the wrong network survives a test that looks only there (STYLE rule 9). Here the data
are Gaussian, N(m_d, s_d^2), the generator is affine, x = a z + b, and both denoisers are exact:
D(x_t) = m + k (x_t - alpha m), k = alpha s^2 / (alpha^2 s^2 + sigma^2), with the fake one of the
generator's own law N(b, a^2). With z and t fixed and x_t read from the teacher's call, each
per-example gradient is a closed form:

  Diff-Instruct   w(lambda) (D_f - D_d) dx/dtheta
  DMD             (D_f - D_d) / |x - D_d| dx/dtheta                       (normalizer from D_d)
  SiD             w [(2 (1 - alpha_s) u + D_f - x) (k_d - k_f) alpha + u (k_f alpha - 1)] dx/dtheta,
                  u = D_d - D_f, w = 1 / |x - D_d|   (x_t carries the gradient into both denoisers)
  DMD2 (GAN)      DMD + gan_weight * (-sigmoid(-l)) w_head alpha dx/dtheta, l = w_head x_t' + c

with dx/da = z, dx/db = 1, averaged over the batch. Checked to fail when SiD's (1 - alpha) term
is scaled by 1.1 or DMD's normalizer is taken from |x - D_f| (both mutations were run).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import schedules
from diffdistill.losses import distribution_matching as dm
from diffdistill.losses import dmd2

SCHEDULE = schedules.VPLinear()
TIMES = (0.15, 0.35, 0.6, 0.85)
B = 32
Z = np.asarray(jax.random.normal(jax.random.key(3), (B, 1)))
PARAMS = {"a": jnp.float32(0.7), "b": jnp.float32(0.3)}  # far from the data's (1.2, -0.5)
DATA = {"m": jnp.float32(-0.5), "s2": jnp.float32(1.44)}
FAKE = {"m": PARAMS["b"], "s2": PARAMS["a"] ** 2}  # the exact fake score of N(b, a^2)


@dataclasses.dataclass(frozen=True)
class FixedNoiseGenerator(dm.Generator):
  """An affine generator x = a z + b whose noise z is the fixed Z (the rng is not used)."""
  z: Any = None

  def noise(self, rng, like):
    del rng
    return jnp.asarray(self.z, like.dtype)


@dataclasses.dataclass(frozen=True)
class FixedTimes(schedules.TimeSampler):
  """t of example i is TIMES[i mod 4] (the rng is not used)."""

  def sample(self, rng, shape, *, schedule, dtype=jnp.float32):
    del rng, schedule
    return jnp.asarray(np.resize(TIMES, shape), dtype)

  def log_density(self, t, *, schedule):
    raise NotImplementedError


def _affine(params, x_init, rng=None):
  del rng
  return params["a"] * x_init + params["b"]


GEN = FixedNoiseGenerator(sample=_affine, train_sample=_affine, sigma_init=1.0, z=Z)


def _k(s2, t):
  a, s = SCHEDULE.alpha(t), SCHEDULE.sigma(t)
  return a * s2 / (a * a * s2 + s * s)


def gaussian_denoiser(record):
  """The exact denoiser of N(m, s2); concrete calls append (x_t, t) to `record`."""
  def apply(params, x_t, t):
    if not isinstance(x_t, jax.core.Tracer):
      record.append((np.asarray(x_t, np.float64), np.asarray(t, np.float64)))
    tb = schedules.broadcast_to(t, x_t)
    return params["m"] + _k(params["s2"], tb) * (x_t - SCHEDULE.alpha(tb) * params["m"])
  return apply


def _np_terms(x_t, t):
  """Per-example (x, D_d, D_f, k_d, k_f, alpha, lambda) in float64 at the recorded x_t, t."""
  a, b = float(PARAMS["a"]), float(PARAMS["b"])
  x = a * Z[:, 0] + b
  x_t, t = x_t[:, 0], t
  alpha = np.asarray(SCHEDULE.alpha(jnp.asarray(t)), np.float64)
  sigma = np.asarray(SCHEDULE.sigma(jnp.asarray(t)), np.float64)
  k = lambda s2: alpha * s2 / (alpha ** 2 * s2 + sigma ** 2)  # noqa: E731
  k_d, k_f = k(1.44), k(a * a)
  d_d = -0.5 + k_d * (x_t + 0.5 * alpha)
  d_f = b + k_f * (x_t - alpha * b)
  return x, d_d, d_f, k_d, k_f, alpha, np.log(alpha ** 2 / sigma ** 2)


def _grad_and_record(loss_fn, **inputs):
  record = []
  teacher, fake = gaussian_denoiser(record), gaussian_denoiser([])
  loss = loss_fn(teacher, fake)
  batch, rng = {"x": jnp.zeros((B, 1))}, jax.random.key(0)
  loss(PARAMS, batch, rng, teacher_params=DATA, fake_params=FAKE, **inputs)  # concrete: records
  grad = jax.grad(lambda p: loss(p, batch, rng, teacher_params=DATA, fake_params=FAKE,
                                 **inputs)[0])(PARAMS)
  return {k: float(v) for k, v in grad.items()}, record


def _expect(per_example):
  """{a: mean(g z), b: mean(g)} of per-example coefficients g [B] of dx/dtheta."""
  return {"a": float(np.mean(per_example * Z[:, 0])), "b": float(np.mean(per_example))}


def _check(got, want):
  for name in ("a", "b"):
    np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-6, err_msg=name)
  assert abs(want["a"]) > 1e-2 and abs(want["b"]) > 1e-2  # away from the optimum


def test_diff_instruct_gradient_is_the_weighted_score_difference():
  got, rec = _grad_and_record(lambda te, fa: dm.diff_instruct_loss(
      GEN, te, fa, schedule=SCHEDULE, weighting="snr", time_sampler=FixedTimes()))
  x, d_d, d_f, _, _, _, lam = _np_terms(*rec[0])
  _check(got, _expect(np.exp(lam) * (d_f - d_d)))


def test_dmd_gradient_is_normalized_by_the_teachers_error():
  got, rec = _grad_and_record(lambda te, fa: dm.dmd_loss(
      GEN, te, fa, schedule=SCHEDULE, time_sampler=FixedTimes()))
  x, d_d, d_f, *_ = _np_terms(*rec[0])
  _check(got, _expect((d_f - d_d) / (np.abs(x - d_d) + 1e-6)))


@pytest.mark.parametrize("alpha_s", [1.2, 0.5])
def test_sid_gradient_flows_through_x_and_both_denoisers_inputs(alpha_s):
  got, rec = _grad_and_record(lambda te, fa: dm.sid_loss(
      GEN, te, fa, schedule=SCHEDULE, alpha=alpha_s, time_sampler=FixedTimes()))
  x, d_d, d_f, k_d, k_f, alpha, _ = _np_terms(*rec[0])
  u = d_d - d_f
  w = 1.0 / (np.abs(x - d_d) + 1e-6)
  _check(got, _expect(w * ((2 * (1 - alpha_s) * u + d_f - x) * (k_d - k_f) * alpha
                           + u * (k_f * alpha - 1))))


def test_dmd2_gradient_adds_the_non_saturating_gan_term():
  head = {"w": jnp.array([0.8], jnp.float32), "b": jnp.float32(-0.3)}
  seen = []

  def features(fake_params, x_t, t):  # the fake network's "features": x_t itself (F = 1)
    del fake_params
    if not isinstance(x_t, jax.core.Tracer):
      seen.append((np.asarray(x_t, np.float64)[:, 0], np.asarray(t, np.float64)))
    return x_t

  got, rec = _grad_and_record(lambda te, fa: dmd2.generator_loss(
      GEN, te, fa, schedule=SCHEDULE, features=features, gan_weight=0.5,
      time_sampler=FixedTimes()), discriminator_params=head)
  x, d_d, d_f, *_ = _np_terms(*rec[0])
  x_t2, t2 = seen[0]
  alpha2 = np.asarray(SCHEDULE.alpha(jnp.asarray(t2)), np.float64)
  logit = 0.8 * x_t2 - 0.3
  gan = -1.0 / (1.0 + np.exp(logit)) * 0.8 * alpha2  # d softplus(-l) / dx = -sigmoid(-l) w alpha
  _check(got, _expect((d_f - d_d) / (np.abs(x - d_d) + 1e-6) + 0.5 * gan))


# ------------------------------------------------------------------------------------------------
# f-distill (Xu et al. 2025): h(r) = r^2 f''(r) times DMD's normalized score difference
# ------------------------------------------------------------------------------------------------

F_FUNCTIONS = {  # the divergences' generators f(r), differentiated twice by jax below
    "reverse_kl": lambda r: -jnp.log(r),
    "forward_kl": lambda r: r * jnp.log(r),
    "js": lambda r: r * jnp.log(r) - (1 + r) * jnp.log((1 + r) / 2),
    "hellinger": lambda r: (jnp.sqrt(r) - 1) ** 2,
    "jeffreys": lambda r: (r - 1) * jnp.log(r),
    "pearson": lambda r: (r - 1) ** 2,
}


@pytest.mark.parametrize("divergence", sorted(F_FUNCTIONS))
def test_f_distill_weight_is_r_squared_f_second_derivative(x64, divergence):
  from diffdistill.losses import f_distill  # noqa: PLC0415
  r = jnp.array([0.05, 0.5, 1.0, 2.0, 7.0], jnp.float64)
  f2 = jax.vmap(jax.grad(jax.grad(F_FUNCTIONS[divergence])))(r)
  np.testing.assert_allclose(f_distill.weight(jnp.log(r), divergence=divergence), r * r * f2,
                             rtol=1e-12)


def _gaussian_log_ratio(disc_params, fake_params, x_t, t):
  """The exact log p_t(x_t) / q_t(x_t) of the data N(m_d, s_d^2) and the generator N(b, a^2)."""
  del disc_params
  tb = schedules.broadcast_to(t, x_t)
  alpha, sigma = SCHEDULE.alpha(tb), SCHEDULE.sigma(tb)

  def log_n(m, s2):
    v = alpha ** 2 * s2 + sigma ** 2
    return -0.5 * jnp.log(2 * jnp.pi * v) - 0.5 * (x_t - alpha * m) ** 2 / v

  return (log_n(DATA["m"], DATA["s2"]) - log_n(fake_params["m"], fake_params["s2"]))[:, 0]


@pytest.mark.parametrize("divergence", ["forward_kl", "js", "hellinger"])
def test_f_distill_gradient_weights_dmd_by_the_exact_density_ratio(divergence):
  from diffdistill.losses import f_distill  # noqa: PLC0415
  got, rec = _grad_and_record(lambda te, fa: f_distill.generator_loss(
      GEN, te, fa, schedule=SCHEDULE, divergence=divergence, log_ratio=_gaussian_log_ratio,
      time_sampler=FixedTimes()), discriminator_params={})
  x_t, t = rec[0]
  x, d_d, d_f, *_ = _np_terms(x_t, t)
  log_r = np.asarray(_gaussian_log_ratio(None, FAKE, jnp.asarray(x_t, jnp.float32),
                                         jnp.asarray(t, jnp.float32)), np.float64)
  r = np.exp(log_r)
  h = {"forward_kl": r, "js": r / (1 + r), "hellinger": 0.5 * np.sqrt(r)}[divergence]
  assert np.std(h) / np.mean(h) > 0.1  # the weights differ across the batch: a real test
  _check(got, _expect(h / np.mean(h) * (d_f - d_d) / (np.abs(x - d_d) + 1e-6)))


def test_f_distill_with_reverse_kl_is_dmd():
  from diffdistill.losses import f_distill  # noqa: PLC0415
  got, _ = _grad_and_record(lambda te, fa: f_distill.generator_loss(
      GEN, te, fa, schedule=SCHEDULE, divergence="reverse_kl", time_sampler=FixedTimes()))
  want, _ = _grad_and_record(lambda te, fa: dm.dmd_loss(
      GEN, te, fa, schedule=SCHEDULE, time_sampler=FixedTimes()))
  for name in ("a", "b"):  # h = 1: the same numbers up to the order of one product
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6)
  with pytest.raises(ValueError, match="divergence must be one of"):
    f_distill.generator_loss(GEN, None, None, schedule=SCHEDULE, divergence="kl")
  with pytest.raises(ValueError, match="give log_ratio"):
    f_distill.generator_loss(GEN, None, None, schedule=SCHEDULE, divergence="js")
