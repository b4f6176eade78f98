"""Inductive moment matching: the grouped MMD against a direct computation, r(s, t), and the
exact flow map of single-Gaussian data as the loss's stationary point."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import schedules
from diffdistill.losses import imm


def direct_mmd2(y, z, scale, estimator):
  """Loops over the particle pairs of one group."""
  m = len(y)
  k = lambda a, b: np.exp(-scale * max(np.linalg.norm(a - b), 1e-8))  # noqa: E731
  pairs = [(i, j) for i, j in itertools.product(range(m), range(m))
           if estimator == "v" or i != j]
  return sum(k(y[i], y[j]) + k(z[i], z[j]) - k(y[i], z[j]) - k(y[j], z[i])
             for i, j in pairs) / len(pairs)


@pytest.mark.parametrize("estimator", ["u", "v"])
def test_grouped_mmd2_matches_a_direct_computation(estimator):
  rs = np.random.RandomState(0)
  y, z = rs.randn(3, 4, 2, 3), rs.randn(3, 4, 2, 3) + 0.3  # 3 groups of 4 particles of 2 x 3
  z[1, 2] = y[1, 2]  # a coincident pair: the kernel's distance floor
  scale = np.array([0.5, 1.0, 2.0])
  got = imm.grouped_mmd2(jnp.asarray(y), jnp.asarray(z), jnp.asarray(scale), estimator=estimator)
  want = [direct_mmd2(y[g].reshape(4, -1), z[g].reshape(4, -1), scale[g], estimator)
          for g in range(3)]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
  # the coincident pair's gradient is finite (the distance is clipped, not differentiated at 0)
  grad = jax.grad(lambda a: imm.grouped_mmd2(a, jnp.asarray(z), jnp.asarray(scale),
                                             estimator=estimator).sum())(jnp.asarray(y))
  assert np.all(np.isfinite(np.asarray(grad)))
  with pytest.raises(ValueError, match="estimator must be one of"):
    imm.grouped_mmd2(jnp.asarray(y), jnp.asarray(z), jnp.asarray(scale), estimator="w")


def test_v_is_u_plus_a_pull_of_each_particle_to_its_own_target():
  """V = ((M - 1) / M) U + (2 / M) mean_i (1 - k(y_i, ytil_i)) (the module docstring)."""
  rs = np.random.RandomState(1)
  m = 8
  y, z = rs.randn(2, m, 5), rs.randn(2, m, 5) * 0.7
  scale = np.array([0.3, 1.5])
  u, v = (np.asarray(imm.grouped_mmd2(jnp.asarray(y), jnp.asarray(z), jnp.asarray(scale),
                                      estimator=e)) for e in ("u", "v"))
  pull = np.mean(1 - np.exp(-scale[:, None] * np.linalg.norm(y - z, axis=-1)), axis=1)
  np.testing.assert_allclose(v, (m - 1) / m * u + 2 / m * pull, rtol=1e-5, atol=1e-7)


def test_r_is_a_constant_eta_decrement_clipped_at_s():
  sch = schedules.VPLinear()
  t = jnp.linspace(0.05, 1.0, 40)
  s = 0.5 * t
  r = imm.r_of(sch, s, t, k=8, t_min=sch.t_min, t_max=sch.t_max)
  gap = imm.eta_decrement(sch, k=8, t_min=sch.t_min, t_max=sch.t_max)
  assert gap == pytest.approx((float(imm.eta(sch, 1.0)) - float(imm.eta(sch, sch.t_min))) / 256)
  assert np.all(np.asarray(s) <= np.asarray(r)) and np.all(np.asarray(r) < np.asarray(t))
  free = np.asarray(r) > np.asarray(s)  # not clipped: eta(t) - eta(r) is the decrement
  assert free.sum() > 20 and (~free).sum() > 3
  np.testing.assert_allclose(np.asarray(imm.eta(sch, t) - imm.eta(sch, r))[free], gap, rtol=2e-3)
  # c_out is the DDIM interpolant's weight on the data, alpha_s - sigma_s alpha_t / sigma_t
  np.testing.assert_allclose(
      np.asarray(imm.c_out(sch, s, t)),
      np.asarray(sch.alpha(s) - sch.sigma(s) * sch.alpha(t) / sch.sigma(t)), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(imm.c_out(sch, t, t)) == 0)
  with pytest.raises(ValueError, match="finite sigma/alpha at t_max=1.0"):
    imm.eta_decrement(schedules.RectifiedFlow(t_max=1.0), k=8, t_min=1e-3, t_max=1.0)


# Single-Gaussian data N(mu, c^2 I): the exact flow map is affine,
#   f(x; s, t) = alpha_s mu + (gamma_s / gamma_t)(x - alpha_t mu),  gamma_u^2 = alpha_u^2 c^2 + sigma_u^2.
# The family below perturbs its scale (d) and its mean (m); d = m = 0 is exact.
SCH = schedules.RectifiedFlow(t_min=1e-3, t_max=0.994)
D, C = 16, 0.5
MU = jnp.linspace(-1.0, 1.0, D)


def gamma(u):
  return jnp.sqrt(SCH.alpha(u) ** 2 * C ** 2 + SCH.sigma(u) ** 2)


def affine_map(p, x, t, s):
  tb, sb = t[:, None], s[:, None]
  return SCH.alpha(sb) * (MU + p["m"]) + (1 + p["d"]) * gamma(sb) / gamma(tb) * (x - SCH.alpha(tb) * MU)


def mean_gradient(params, target, *, reps=6, groups=1024, m=4):
  """The loss's gradient in (d, m) averaged over `reps` batches, and its standard error."""
  loss = imm.imm_loss(affine_map, schedule=SCH, group_size=m, k=6)
  grad = jax.jit(jax.grad(lambda q, x, r: loss(q, {"x": x}, r, target_params=target)[0]))
  out = []
  for i in range(reps):
    kx, kr = jax.random.split(jax.random.key(i))
    g = grad(params, MU + C * jax.random.normal(kx, (groups * m, D)), kr)
    out.append([float(g["d"]), float(g["m"])])
  out = np.array(out)
  return out.mean(0), out.std(0, ddof=1) / np.sqrt(reps)


def test_exact_flow_map_is_stationary_and_a_perturbed_one_is_pulled_back():
  exact = {"d": 0.0, "m": 0.0}
  # the unbiased estimator's expected gradient at the exact map is 0: within 4 standard errors
  mean, se = mean_gradient(exact, None)
  assert np.all(np.abs(mean) < 4 * se), (mean, se)
  # a perturbed online map against the exact target: a gradient far outside the noise, pointing
  # back to the exact map (descent lowers d > 0, raises d < 0, lowers m > 0)
  for p, i, sign in [({"d": 0.1, "m": 0.0}, 0, 1), ({"d": -0.1, "m": 0.0}, 0, -1),
                     ({"d": 0.0, "m": 0.1}, 1, 1)]:
    mean, se = mean_gradient(p, exact)
    assert sign * mean[i] > 15 * se[i], (p, mean, se)


def test_loss_arguments_are_checked():
  f = affine_map
  with pytest.raises(ValueError, match="group_size must be >= 2 with estimator='u'"):
    imm.imm_loss(f, schedule=SCH, group_size=1)
  with pytest.raises(ValueError, match="group_size must be an integer"):
    imm.imm_loss(f, schedule=SCH, group_size=2.5)
  with pytest.raises(ValueError, match="kernel_scale must be > 0"):
    imm.imm_loss(f, schedule=SCH, kernel_scale=0.0)
  with pytest.raises(ValueError, match="k must be > 0"):
    imm.imm_loss(f, schedule=SCH, k=0)
  with pytest.raises(ValueError, match="finite sigma/alpha"):
    imm.imm_loss(f, schedule=schedules.RectifiedFlow(t_max=1.0))
  loss = imm.imm_loss(f, schedule=SCH, group_size=4)
  with pytest.raises(ValueError, match="batch_size=6 is not a multiple of group_size=4"):
    loss({"d": 0.0, "m": 0.0}, {"x": jnp.zeros((6, D))}, jax.random.key(0))
  method = imm.imm(f, group_size=4, schedule=SCH)
  assert method.updates[0].group_size == 4 and not method.updates[0].inputs
