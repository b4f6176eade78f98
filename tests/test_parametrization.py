"""Parametrizations round-trip exactly and give the textbook targets; guidance is linear in w."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import parametrization as P
from diffdistill import schedules

SCHEDS = sorted(schedules.SCHEDULES)


def _setup(name, b=6, d=3, seed=0):
  s = schedules.get(name)
  k0, k1, k2 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x0 = jax.random.normal(k0, (b, d))
  eps = jax.random.normal(k1, (b, d))
  t = jax.random.uniform(k2, (b,), minval=s.t_min + 0.01 * (s.t_max - s.t_min),
                         maxval=s.t_max - 0.01 * (s.t_max - s.t_min))
  tb = t[:, None]
  x = s.alpha(tb) * x0 + s.sigma(tb) * eps
  return s, x0, eps, x, t


@pytest.mark.parametrize("kind", P.KINDS)
@pytest.mark.parametrize("name", SCHEDS)
def test_round_trip(kind, name, x64):
  s, x0, _, x, t = _setup(name)
  out = P.from_x0(x0, x, t, kind=kind, schedule=s)
  np.testing.assert_allclose(P.to_x0(out, x, t, kind=kind, schedule=s), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDS)
def test_targets_are_the_textbook_quantities(name, x64):
  s, x0, eps, x, t = _setup(name)
  tb = t[:, None]
  a, sg = s.alpha(tb), s.sigma(tb)
  tgt = lambda kind: P.from_x0(x0, x, t, kind=kind, schedule=s)
  np.testing.assert_allclose(tgt("eps"), eps, rtol=1e-8, atol=1e-8)
  np.testing.assert_allclose(tgt("v"), a * eps - sg * x0, rtol=1e-8, atol=1e-8)
  np.testing.assert_allclose(tgt("score"), -eps / sg, rtol=1e-8, atol=1e-8)
  np.testing.assert_allclose(tgt("flow"), s.d_alpha(tb) * x0 + s.d_sigma(tb) * eps, rtol=1e-8, atol=1e-8)
  np.testing.assert_allclose(tgt("x0"), x0)


def test_flow_is_eps_minus_x0_for_rectified_flow(x64):
  s, x0, eps, x, t = _setup("rectified_flow")
  np.testing.assert_allclose(P.from_x0(x0, x, t, kind="flow", schedule=s), eps - x0, rtol=1e-10, atol=1e-10)
  # and the velocity of the interpolation is d/dt (alpha x0 + sigma eps) by autodiff:
  vel = jax.jvp(lambda u: s.alpha(u)[:, None] * x0 + s.sigma(u)[:, None] * eps, (t,), (jnp.ones_like(t),))[1]
  np.testing.assert_allclose(P.from_x0(x0, x, t, kind="flow", schedule=s), vel, rtol=1e-10, atol=1e-10)


def test_edm_preconditioning_matches_paper(x64):
  s, x0, _, x, t = _setup("edm")
  sd = 0.5
  x_in, c_noise = P.net_inputs(x, t, kind="edm", schedule=s)
  np.testing.assert_allclose(x_in, x / np.sqrt(np.asarray(t)[:, None] ** 2 + sd ** 2), rtol=1e-12)
  np.testing.assert_allclose(c_noise, 0.25 * np.log(np.asarray(t)), rtol=1e-12)
  c_skip, c_out, _, _ = P.edm_coefficients(jnp.asarray(2.0), sd)
  np.testing.assert_allclose([c_skip, c_out], [0.25 / 4.25, 2 * 0.5 / np.sqrt(4.25)], rtol=1e-12)
  # On another schedule the preconditioning acts on x / alpha at sigma / alpha.
  v, x0, _, xv, tv = _setup("vp_linear")
  xin_v, cn_v = P.net_inputs(xv, tv, kind="edm", schedule=v)
  sh = (v.sigma(tv) / v.alpha(tv))[:, None]
  np.testing.assert_allclose(xin_v, xv / v.alpha(tv)[:, None] / np.sqrt(sh ** 2 + sd ** 2), rtol=1e-10)
  np.testing.assert_allclose(cn_v, 0.25 * np.log(sh[:, 0]), rtol=1e-10)


@pytest.mark.parametrize("kind", P.KINDS)
def test_as_denoiser_recovers_x0_from_an_oracle_network(kind, x64):
  s, x0, _, x, t = _setup("vp_cosine")

  def oracle(params, x_in, t_in):
    # A "network" that knows x0 (params) and answers in `kind`, from the inputs it is shown.
    del x_in, t_in
    return P.from_x0(params, x, t, kind=kind, schedule=s)

  d = P.as_denoiser(oracle, kind=kind, schedule=s)
  np.testing.assert_allclose(d(x0, x, t), x0, rtol=1e-9, atol=1e-9)


class ParametrizationVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_to_x0_same_with_and_without_jit(self):
    s, x0, _, x, t = _setup("edm")
    f = self.variant(lambda out, x, t: P.to_x0(out, x, t, kind="v", schedule=s))
    out = P.from_x0(x0, x, t, kind="v", schedule=s)
    np.testing.assert_allclose(f(out, x, t), x0, rtol=2e-4, atol=2e-4)


def test_no_retrace_across_calls():
  s = schedules.VPLinear()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(out, x, t):
    return P.to_x0(out, x, t, kind="eps", schedule=s)

  x = jnp.ones((4, 2))
  f(x, x, jnp.full((4,), 0.5))
  f(2 * x, x, jnp.full((4,), 0.7))
  chex.clear_trace_counter()


def test_guided_is_linear_in_w_and_one_call():
  calls = []

  def denoiser(params, x, t, label):
    calls.append(x.shape[0])
    return x * params + label[:, None].astype(x.dtype)

  x = jnp.ones((3, 2))
  t = jnp.full((3,), 0.5)
  label = jnp.array([1, 2, 3])
  cond = denoiser(2.0, x, t, label)
  null = denoiser(2.0, x, t, jnp.full((3,), 10))
  calls.clear()
  for w in (0.0, 1.0, 3.5):
    g = P.guided(denoiser, w, null_cond={"label": 10})(2.0, x, t, label=label)
    np.testing.assert_allclose(g, null + w * (cond - null), rtol=1e-6)
  assert calls == [6, 6, 6], "guided must evaluate cond and null as one batch"
  w = jnp.array([0.0, 1.0, 3.5])  # one scale per example
  np.testing.assert_allclose(P.guided(denoiser, w, null_cond={"label": 10})(2.0, x, t, label=label),
                             null + w[:, None] * (cond - null), rtol=1e-6)
  with pytest.raises(ValueError, match="must match null_cond"):
    P.guided(denoiser, 2.0, null_cond={"label": 10, "text": 0})(2.0, x, t, label=label)


def test_bad_input():
  s = schedules.EDM()
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match=r"Unknown parametrization kind 'noise'; expected one of \['x0', 'eps'"):
    P.to_x0(x, x, jnp.ones(2), kind="noise", schedule=s)
  with pytest.raises(ValueError, match="Unknown parametrization kind"):
    P.as_denoiser(lambda p, x, t: x, kind="epsilon", schedule=s)
  with pytest.raises(ValueError, match="does not match x's shape"):
    P.as_denoiser(lambda p, x, t: x[:, :2], kind="eps", schedule=s)(None, x, jnp.ones(2))
  with pytest.raises(ValueError, match="sigma_data must be > 0"):
    P.as_denoiser(lambda p, x, t: x, kind="edm", schedule=s, sigma_data=-1.0)


@pytest.mark.parametrize("source,target", [("edm", "rectified_flow"), ("vp_linear", "trigflow"),
                                           ("trigflow", "vp_cosine")])
def test_rescheduled_is_the_exact_denoiser_of_the_target_schedule(source, target):
  """The mixture's exact denoiser on `source`, rescheduled, is the exact denoiser on `target`."""
  from diffdistill import analytic  # noqa: PLC0415
  with jax.enable_x64(True):
    mix = analytic.ring2d()
    src, tgt = schedules.get(source), schedules.get(target)
    moved = P.rescheduled(analytic.denoiser(src), source=src, target=tgt)
    # target times whose logSNR lies inside the source's range
    lam = jnp.linspace(max(src.logsnr_min, tgt.logsnr_min) + 0.1,
                       min(src.logsnr_max, tgt.logsnr_max) - 0.1, 6, dtype=jnp.float64)
    t = tgt.t_from_logsnr(lam)
    x = jax.random.normal(jax.random.key(0), (6, 2), jnp.float64) * 3.0
    got, want = moved(mix, x, t), analytic.denoiser(tgt)(mix, x, t)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert got.dtype == jnp.float64


@pytest.mark.parametrize("source,kind,target,target_kind",
                         [("edm", "edm", "trigflow", "flow"), ("vp_linear", "eps", "rectified_flow", "flow"),
                          ("vp_linear", "v", "ve", "score")])
def test_rescheduled_net_is_the_exact_network_of_the_target_schedule(source, kind, target,
                                                                     target_kind):
  """A network of `kind` on `source` that is exact (the mixture's denoiser written as that
  output), read through `rescheduled_net`, is the exact `target_kind` output on `target`: what a
  student starting from an imported teacher's weights on another schedule computes."""
  from diffdistill import analytic  # noqa: PLC0415
  with jax.enable_x64(True):
    mix = analytic.ring2d()
    src, tgt = schedules.get(source), schedules.get(target)
    exact_src = analytic.denoiser(src)

    def net(params, x_in, t_in):  # the exact network of `kind` on the source, on its inputs
      if kind == "edm":  # (c_in x, log(sigma) / 4) on EDM (alpha = 1, t = sigma)
        t = jnp.exp(4.0 * t_in)
        x = x_in * jnp.sqrt(t**2 + 0.5**2)[:, None]
      else:
        x, t = x_in, t_in
      return P.from_x0(exact_src(params, x, t), x, t, kind=kind, schedule=src)
    moved = P.rescheduled_net(net, kind=kind, source=src, target=tgt, target_kind=target_kind)
    lam = jnp.linspace(max(src.logsnr_min, tgt.logsnr_min) + 0.1,
                       min(src.logsnr_max, tgt.logsnr_max) - 0.1, 6, dtype=jnp.float64)
    t = tgt.t_from_logsnr(lam)
    x = jax.random.normal(jax.random.key(0), (6, 2), jnp.float64) * 3.0
    want = P.from_x0(analytic.denoiser(tgt)(mix, x, t), x, t, kind=target_kind, schedule=tgt)
    np.testing.assert_allclose(moved(mix, x, t), want, rtol=1e-8, atol=1e-8)
  with pytest.raises(ValueError, match="target_kind='edm' is not supported"):
    P.rescheduled_net(net, kind=kind, source=src, target=tgt, target_kind="edm")


def test_rescheduled_clips_outside_the_source_range():
  """A rectified flow's t = 1 (lambda = -inf) reaches an EDM denoiser at its sigma_max, with the
  pure noise scaled to that level; above the EDM range (t < 0.002) the data keep their scale."""
  src, tgt = schedules.EDM(), schedules.RectifiedFlow()
  seen = {}

  def denoise(params, x, t):
    seen["x"], seen["t"] = x, t
    return x

  eps = jnp.ones((2, 3))
  P.rescheduled(denoise, source=src, target=tgt)(None, eps, jnp.ones(2))
  np.testing.assert_allclose(seen["t"], src.t_max, rtol=1e-6)
  # EDM: alpha = 1, sigma = t; the rectified flow's sigma is 1 at t = 1
  np.testing.assert_allclose(seen["x"], src.t_max * eps, rtol=1e-6)
  P.rescheduled(denoise, source=src, target=tgt)(None, eps, jnp.full((2,), 1e-3))
  np.testing.assert_allclose(seen["t"], src.t_min, rtol=1e-6)
  np.testing.assert_allclose(seen["x"], eps / (1.0 - 1e-3), rtol=1e-6)  # alpha_S / alpha_T
  # TrigFlow up to pi/2 (tan(float32(pi/2)) < 0): the noise end, not NaN
  trig = schedules.TrigFlow(t_max=float(np.pi / 2))
  P.rescheduled(denoise, source=src, target=trig)(None, eps, jnp.full((2,), np.pi / 2, jnp.float32))
  assert np.all(np.isfinite(seen["x"])) and np.allclose(seen["t"], src.t_max)
  with pytest.raises(ValueError, match="source must be a schedules.Schedule"):
    P.rescheduled(denoise, source=3, target=tgt)
