"""Tests for losses/dsm.py against closed forms on single-Gaussian data."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffdistill import analytic, parametrization, schedules
from diffdistill.losses import dsm

D = 8
MEANS = np.linspace(-1.0, 1.0, D)[None]  # [1, D]
VARS = np.geomspace(0.05, 2.0, D)[None]  # [1, D] diagonal covariance


@dataclasses.dataclass(frozen=True)
class PointMass(schedules.TimeSampler):
  """All times at t0 (a test-only sampler: the loss at one fixed t)."""

  t0: float = 0.5
  name: ClassVar[str] = "point_mass"

  def sample(self, rng, shape, *, schedule, dtype=jnp.float32):
    del rng, schedule
    return jnp.full(shape, self.t0, dtype)

  def log_density(self, t, *, schedule):
    del schedule
    return jnp.zeros_like(t)


def analytic_network(kind, schedule, sigma_data=None):
  """The exact denoiser of `mix` expressed as a raw network of `kind`, plus an x0 offset `b`.

  params = (mix, b); D(x, t) = E[x0 | x_t = x] + b. The network sees net_inputs, so for 'edm'
  it undoes (c_in x / alpha, c_noise = -lambda / 8) first.
  """
  sd = parametrization.resolve_sigma_data(schedule, sigma_data)

  def apply(params, x_in, t_in):
    mix, b = params
    if kind == "edm":
      t = schedule.t_from_logsnr(-8.0 * t_in)
      tb = schedules.broadcast_to(t, x_in)
      alpha, sigma = schedule.alpha(tb), schedule.sigma(tb)
      _, _, c_in, _ = parametrization.edm_coefficients(sigma / alpha, sd)
      x = x_in * alpha / c_in
    else:
      x, t = x_in, t_in
    x0 = analytic.denoise(mix, x, t, schedule=schedule) + b
    return parametrization.from_x0(x0, x, t, kind=kind, schedule=schedule, sigma_data=sd)

  return apply


def posterior_variance_mean(schedule, t):
  """mean_D Var[x0 | x_t] = mean_i s_i sigma^2 / (alpha^2 s_i + sigma^2) for N(mu, diag(s)) data."""
  a, s = float(schedule.alpha(jnp.float32(t))), float(schedule.sigma(jnp.float32(t)))
  return float(np.mean(VARS * s * s / (a * a * VARS + s * s)))


CASES = [  # (kind, schedule, t0): every kind once, every schedule family at least once
    ("x0", schedules.VPLinear(), 0.3),
    ("eps", schedules.TrigFlow(), 0.7),
    ("v", schedules.VPCosine(), 0.5),
    ("flow", schedules.RectifiedFlow(), 0.6),
    ("score", schedules.VE(), 0.2),
    ("edm", schedules.EDM(), 0.8),
]


@pytest.mark.parametrize("kind,schedule,t0", CASES, ids=[c[0] for c in CASES])
def test_exact_denoiser_reaches_the_irreducible_loss(kind, schedule, t0):
  """E[loss] = w(lambda) mean_D Var[x0 | x_t] at the exact denoiser, in every parametrization;
  an x0 offset b adds w |b|^2 / D, and the gradient in b is 2 w b / D (zero at b = 0)."""
  mix = analytic.GaussianMixture(np.ones(1), MEANS, VARS)
  weighting = "edm" if kind == "edm" else "min_snr_gamma"
  loss_fn = dsm.dsm_loss(analytic_network(kind, schedule), schedule=schedule, kind=kind,
                         weighting=weighting, time_sampler=PointMass(t0))
  x0 = analytic.sample(mix, jax.random.key(0), 8192, dtype=jnp.float32)
  batch = {"x": x0}
  rng = jax.random.key(1)
  value_and_grad = jax.jit(jax.value_and_grad(lambda b: loss_fn((mix, b), batch, rng), has_aux=True))
  lam = schedule.logsnr(jnp.float32(t0))
  w = float(dsm.x0_weighting(weighting, sigma_data=0.5)(lam))
  expected = w * posterior_variance_mean(schedule, t0)

  b0, delta = jnp.zeros(D), jnp.full(D, 0.3)
  (loss, aux), g0 = value_and_grad(b0)
  np.testing.assert_allclose(loss, expected, rtol=0.03)
  np.testing.assert_allclose(aux["x0_mse"], expected / w, rtol=0.03)
  # Same noise: the offset adds w (|delta|^2 / D + 2 delta . mean error / D), the second ~0.
  (loss_pert, _), g1 = value_and_grad(delta)
  np.testing.assert_allclose(loss_pert - loss, w * 0.09, rtol=0.05)
  assert float(jnp.max(jnp.abs(g0))) < 0.06 * float(jnp.max(jnp.abs(g1)))
  np.testing.assert_allclose(g1 - g0, 2.0 * w * delta / D, rtol=1e-3)


@pytest.mark.parametrize("name,formula", [
    ("uniform", lambda lam: np.ones_like(lam)),
    ("snr", np.exp),
    ("truncated_snr", lambda lam: np.maximum(np.exp(lam), 1.0)),
    ("min_snr_gamma", lambda lam: np.minimum(np.exp(lam), 5.0)),
    ("edm", lambda lam: (np.exp(-lam) + 0.25) / (np.exp(-lam) * 0.25)),  # (s^2 + sd^2) / (s sd)^2
    ("v", lambda lam: np.exp(lam) + 1.0),
])
def test_weightings_equal_their_formulas(name, formula):
  lam = np.array([-8.0, -2.0, 0.0, np.log(5.0), 2.0, 7.0], np.float32)
  np.testing.assert_allclose(dsm.x0_weighting(name, gamma=5.0, sigma_data=0.5)(lam), formula(lam),
                             rtol=1e-5)


def _randomish_net(params, x, t, **cond):
  del cond
  return jnp.tanh(params * x + t[:, None])


@pytest.mark.parametrize("kind,weighting,schedule", [
    ("eps", "snr", schedules.VPLinear()),  # Ho et al.'s L_simple
    ("v", "v", schedules.VPCosine()),  # v-MSE on VP
    ("edm", "edm", schedules.EDM()),  # EDM: unit weight on F
    ("x0", "uniform", schedules.RectifiedFlow()),
])
def test_natural_pairs_have_unit_output_weight(kind, weighting, schedule):
  """For these pairs w(lambda) c(t)^2 = 1: the loss is the plain output-space MSE."""
  loss_fn = jax.jit(dsm.dsm_loss(_randomish_net, schedule=schedule, kind=kind, weighting=weighting,
                                 time_sampler="lognormal" if kind != "x0" else "uniform"))
  loss, aux = loss_fn(jnp.float32(0.7), {"x": jax.random.normal(jax.random.key(0), (256, 3))},
                      jax.random.key(1))
  np.testing.assert_allclose(loss, aux["out_mse"], rtol=1e-4)
  np.testing.assert_allclose(aux["weight_mean"], 1.0, rtol=1e-4)


def test_output_to_x0_scale_closed_forms():
  t = jnp.array([0.1, 0.5, 0.9])
  vp = schedules.VPCosine()
  a, s = vp.alpha(t), vp.sigma(t)
  np.testing.assert_allclose(dsm.output_to_x0_scale(t, kind="eps", schedule=vp), -s / a, rtol=1e-5)
  np.testing.assert_allclose(dsm.output_to_x0_scale(t, kind="v", schedule=vp), -s, rtol=1e-5)
  rf = schedules.RectifiedFlow()
  np.testing.assert_allclose(dsm.output_to_x0_scale(t, kind="flow", schedule=rf), -t, rtol=1e-5)
  edm = schedules.EDM()
  np.testing.assert_allclose(dsm.output_to_x0_scale(t, kind="edm", schedule=edm),
                             t * 0.5 / np.sqrt(t * t + 0.25), rtol=1e-5)


def test_importance_weights_retarget_the_time_distribution():
  """x0 = 0, out = t: each term is t^2 q(t); its batch mean estimates E_target[t^2]."""
  schedule = schedules.VPLinear()
  target = schedules.LogNormalSigma()
  loss_fn = dsm.dsm_loss(lambda p, x, t: jnp.broadcast_to(t[:, None], x.shape), schedule=schedule,
                         kind="x0", weighting="uniform", time_sampler="uniform",
                         importance_target=target)
  loss, _ = jax.jit(loss_fn)(None, {"x": jnp.zeros((20000, 1))}, jax.random.key(0))
  t_target = target.sample(jax.random.key(1), (200000,), schedule=schedule)
  np.testing.assert_allclose(loss, jnp.mean(t_target ** 2), rtol=0.05)


def test_cond_dropout_rate_and_null_label():
  """out = 1 exactly where the network sees the null label: the loss is the drop rate."""
  null = 10

  def null_indicator(params, x, t, label):
    del params, t
    return jnp.broadcast_to((label == null).astype(x.dtype)[:, None], x.shape)

  batch = {"x": jnp.zeros((20000, 1)), "label": jnp.arange(20000) % null}
  loss_fn = dsm.dsm_loss(null_indicator, schedule=schedules.VPLinear(), kind="x0",
                         weighting="uniform", cond_drop_prob=0.2, null_label=null)
  loss, aux = jax.jit(loss_fn)(None, batch, jax.random.key(0))
  assert abs(float(loss) - 0.2) < 0.01
  np.testing.assert_allclose(aux["cond_drop_frac"], loss, rtol=1e-6)
  no_drop = dsm.dsm_loss(null_indicator, schedule=schedules.VPLinear(), kind="x0",
                         weighting="uniform")
  assert float(no_drop(None, batch, jax.random.key(0))[0]) == 0.0


def test_logsnr_bins_count_and_average_back_to_the_loss():
  schedule = schedules.VPLinear()
  loss_fn = jax.jit(dsm.dsm_loss(_randomish_net, schedule=schedule, kind="eps", weighting="snr"))
  loss, aux = loss_fn(jnp.float32(0.3), {"x": jnp.ones((512, 2))}, jax.random.key(3))
  assert float(aux["bin_count"].sum()) == 512
  np.testing.assert_allclose(jnp.sum(aux["bin_loss"] * aux["bin_count"]) / 512, loss, rtol=1e-5)
  # All times at lambda(0.3) ~ -0.3 fall in the bin [-2.5, 0) (index 3 of the default edges).
  fixed = jax.jit(dsm.dsm_loss(_randomish_net, schedule=schedule, kind="eps",
                               time_sampler=PointMass(0.3)))
  _, aux = fixed(jnp.float32(0.3), {"x": jnp.ones((16, 2))}, jax.random.key(3))
  assert -2.5 <= float(schedule.logsnr(0.3)) < 0.0
  np.testing.assert_array_equal(aux["bin_count"], [0, 0, 0, 16, 0, 0, 0, 0])


def test_randomness_comes_from_rng_and_ignores_the_device_count():
  schedule = schedules.EDM()
  loss_fn = jax.jit(dsm.dsm_loss(_randomish_net, schedule=schedule, kind="edm", weighting="edm",
                                 time_sampler="lognormal"))
  x = jax.random.normal(jax.random.key(0), (64, 4))
  l1, _ = loss_fn(jnp.float32(0.5), {"x": x}, jax.random.key(1))
  l2, _ = loss_fn(jnp.float32(0.5), {"x": x}, jax.random.key(2))
  assert float(l1) != float(l2)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  l_sharded, _ = loss_fn(jnp.float32(0.5), {"x": x_sharded}, jax.random.key(1))
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(l_sharded, l1, rtol=1e-6)


def test_low_precision_data_is_computed_in_float32():
  seen = {}

  def net(params, x, t):
    seen["dtypes"] = (x.dtype, t.dtype)
    return x * params

  x = jax.random.normal(jax.random.key(0), (64, 3))
  loss_fn = jax.jit(dsm.dsm_loss(net, schedule=schedules.VPLinear(), kind="x0", weighting="uniform"))
  loss16, _ = loss_fn(jnp.float32(0.5), {"x": x.astype(jnp.bfloat16)}, jax.random.key(1))
  assert seen["dtypes"] == (jnp.float32, jnp.float32) and loss16.dtype == jnp.float32
  loss32, _ = loss_fn(jnp.float32(0.5), {"x": x.astype(jnp.bfloat16).astype(jnp.float32)},
                      jax.random.key(1))
  np.testing.assert_allclose(loss16, loss32, rtol=1e-6)


def test_dropout_flag_passes_a_fresh_key():
  seen = {}

  def net(params, x, t, *, dropout_rng):
    seen["key"] = dropout_rng
    return x

  jax.jit(dsm.dsm_loss(net, schedule=schedules.VPLinear(), kind="x0", dropout=True))(
      None, {"x": jnp.ones((4, 2))}, jax.random.key(0))
  assert jnp.issubdtype(seen["key"].dtype, jax.dtypes.prng_key)


def test_bad_inputs():
  vp = schedules.VPLinear()
  net = lambda p, x, t, **c: x  # noqa: E731
  with pytest.raises(ValueError, match="Unknown weighting 'snr2'.*min_snr_gamma"):
    dsm.dsm_loss(net, schedule=vp, kind="eps", weighting="snr2")
  with pytest.raises(ValueError, match="Unknown parametrization kind 'epsilon'"):
    dsm.dsm_loss(net, schedule=vp, kind="epsilon")
  with pytest.raises(ValueError, match="Unknown time sampler"):
    dsm.dsm_loss(net, schedule=vp, kind="eps", time_sampler="gaussian")
  with pytest.raises(ValueError, match="needs null_label"):
    dsm.dsm_loss(net, schedule=vp, kind="eps", cond_drop_prob=0.1)
  with pytest.raises(ValueError, match="cond_drop_prob must lie in"):
    dsm.dsm_loss(net, schedule=vp, kind="eps", cond_drop_prob=1.5, null_label=3)
  with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
    dsm.dsm_loss(net, schedule=vp, kind="eps", min_snr_gamma=0.0)
  with pytest.raises(ValueError, match="logsnr_bin_edges"):
    dsm.dsm_loss(net, schedule=vp, kind="eps", logsnr_bin_edges=(1.0, 0.0))
  rng = jax.random.key(0)
  loss_fn = dsm.dsm_loss(net, schedule=vp, kind="eps")
  with pytest.raises(ValueError, match="batch must hold 'x'"):
    loss_fn(None, {"image": jnp.ones((4, 2))}, rng)
  with pytest.raises(ValueError, match=r"batch\['label'\] must have shape \[B\] = \[4\]"):
    loss_fn(None, {"x": jnp.ones((4, 2)), "label": jnp.zeros((4, 1), int)}, rng)
  with pytest.raises(ValueError, match="output shape"):
    dsm.dsm_loss(lambda p, x, t: x[:, :1], schedule=vp, kind="eps")(None, {"x": jnp.ones((4, 2))}, rng)
  with pytest.raises(ValueError, match="no 'label'"):
    dsm.dsm_loss(net, schedule=vp, kind="eps", cond_drop_prob=0.1, null_label=3)(
        None, {"x": jnp.ones((4, 2))}, rng)


@pytest.mark.slow
def test_mlp_trained_with_dsm_approaches_the_analytic_floor():
  """1500 Adam steps of the MLP on ring2d (eps, SNR weighting): the loss on 20k fresh examples is
  within 15% of the exact denoiser's (the irreducible minimum) and not below it."""
  import optax  # pylint: disable=import-outside-toplevel

  from diffdistill import nets  # pylint: disable=import-outside-toplevel

  mix, schedule = analytic.ring2d(), schedules.VPCosine()
  module = nets.get_network("mlp", features=64, num_blocks=2, emb_dim=32)
  loss_fn = dsm.dsm_loss(nets.make_apply(module), schedule=schedule, kind="eps", weighting="snr")
  params = nets.init_params(module, jax.random.key(1), jnp.zeros((1, 2)))
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, rng):
    data_rng, loss_rng = jax.random.split(rng)
    batch = {"x": analytic.sample(mix, data_rng, 256)}
    grads, _ = jax.grad(loss_fn, has_aux=True)(params, batch, loss_rng)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = opt.init(params)
  for i in range(1500):
    params, opt_state = step(params, opt_state, jax.random.fold_in(jax.random.key(2), i))
  teacher = dsm.dsm_loss(analytic_network("eps", schedule), schedule=schedule, kind="eps",
                         weighting="snr")
  batch, rng = {"x": analytic.sample(mix, jax.random.key(9), 20000)}, jax.random.key(10)
  floor, _ = jax.jit(teacher)((mix, jnp.zeros(2)), batch, rng)
  trained, _ = jax.jit(loss_fn)(params, batch, rng)
  assert floor * 0.99 < trained < floor * 1.15, (float(trained), float(floor))


# ---- Bad inputs (issue 7). ----


def _x0_loss():
  return dsm.dsm_loss(lambda p, x, t: p * x, schedule=schedules.VPLinear(), kind="x0",
                      weighting="uniform")


def test_a_nonfinite_example_is_left_out_of_the_bins():
  loss_fn = _x0_loss()
  x = jax.random.normal(jax.random.PRNGKey(1), (256, 2))
  rng = jax.random.PRNGKey(2)
  _, clean = loss_fn(0.5, {"x": x}, rng)
  _, dirty = loss_fn(0.5, {"x": x.at[3].set(jnp.nan)}, rng)
  assert int(dirty["nonfinite"]) == 1
  assert np.all(np.isfinite(dirty["bin_loss"])) and np.all(np.isfinite(dirty["bin_x0_mse"]))
  # The same times and noise for every other example: only example 3's bin loses one count,
  # every other bin keeps its value exactly.
  lost = np.asarray(clean["bin_count"]) - np.asarray(dirty["bin_count"])
  assert lost.sum() == 1 and lost.min() == 0
  others = lost == 0
  np.testing.assert_allclose(np.asarray(dirty["bin_loss"])[others],
                             np.asarray(clean["bin_loss"])[others], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(dirty["bin_x0_mse"])[others],
                             np.asarray(clean["bin_x0_mse"])[others], rtol=1e-6)


def test_rng_of_either_key_kind_and_schedule_by_name():
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 2))
  raw = _x0_loss()(0.5, {"x": x}, jax.random.PRNGKey(2))[0]
  typed = _x0_loss()(0.5, {"x": x}, jax.random.key(2))[0]
  by_name = dsm.dsm_loss(lambda p, x, t: p * x, schedule="vp_linear", kind="x0",
                         weighting="uniform")(0.5, {"x": x}, jax.random.PRNGKey(2))[0]
  assert float(raw) == float(typed) == float(by_name)
  with pytest.raises(ValueError, match=r"rng must be a PRNG key, not the integer 2: pass jax.random.key\(2\)"):
    _x0_loss()(0.5, {"x": x}, 2)
