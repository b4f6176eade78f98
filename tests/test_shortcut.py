"""Shortcut models on single-Gaussian data, where every jump of the flow is closed-form and affine.

The student is a lookup s(x, t, d) = a[t, d] x + b[t, d] (per coordinate) over the grid times
t = i/M and steps d in {0, 1/M, ..., 1} the loss uses: affine in x like the exact shortcut
(x - Phi_{t -> t-d}(x)) / d, so at a fixed target the loss is quadratic in (a, b) and one Newton
step is its exact minimiser. The references come from `analytic.gaussian_flow_map` (the exact
jump) and `analytic.denoise` (the instantaneous velocity (x - D(x, t)) / t).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, schedules
from diffdistill.losses import shortcut

M_ = np.array([0.5, -1.0, 2.0])
V_ = np.array([0.25, 1.5, 0.04])
RF = schedules.RectifiedFlow(t_min=1e-3, t_max=1.0)
# the exact jumps end at t = 0, outside RF's range: the reference ends at 1e-12 (changes it by
# sigma^2 / var ~ 1e-23 relative)
T0 = 1e-12
REF = schedules.RectifiedFlow(t_min=T0, t_max=1.0)
M = 8                            # base steps: d in {1/8, ..., 1}
STEPS = [0.0] + [2.0 ** -j for j in range(3, -1, -1)]  # d index 0..4: 0, 1/8, 1/4, 1/2, 1


def gaussian():
  return analytic.GaussianMixture(np.ones(1), M_[None], V_[None])


def family(params, x, t, *, d):
  ti = jnp.round(t * M).astype(jnp.int32)
  di = jnp.where(d == 0, 0, 1 + jnp.round(jnp.log2(jnp.where(d == 0, 1.0, d) * M))).astype(
      jnp.int32)
  return params["a"][ti, di] * x + params["b"][ti, di]


def affine(fn):
  """(a, b) of a per-coordinate affine map x -> a x + b, read off at x = 0 and x = 1."""
  zero, one = fn(jnp.zeros((1, 3))), fn(jnp.ones((1, 3)))
  return one[0] - zero[0], zero[0]


def velocity(x, t):
  return (x - analytic.denoise(gaussian(), x, jnp.full((x.shape[0],), t), schedule=RF)) / t


def exact_table():
  """a, b [M + 1, 5, 3]: the velocity at d = 0, the exact jump (x - Phi_{t -> t-d}) / d at d > 0."""
  a, b = np.zeros((M + 1, len(STEPS), 3)), np.zeros((M + 1, len(STEPS), 3))
  for ti in range(1, M + 1):
    t = ti / M
    a[ti, 0], b[ti, 0] = affine(lambda x: velocity(x, t))  # noqa: B023
    for di, d in enumerate(STEPS[1:], 1):
      if d <= t + 1e-12:
        jump = lambda x: (x - analytic.gaussian_flow_map(  # noqa: E731
            gaussian(), x, schedule=REF, t_start=t, t_end=max(t - d, T0))) / d  # noqa: B023
        a[ti, di], b[ti, di] = affine(jump)
  return {"a": jnp.asarray(a), "b": jnp.asarray(b)}


def compose(params, t, d, d_query):
  """(a, b) of the self-consistency target (s(x, t, d') + s(x - d s(x, t, d'), t - d, d')) / 2."""
  def fn(x):
    tt = jnp.full((1,), t)
    dq = jnp.full((1,), d_query)
    s1 = family(params, x, tt, d=dq)
    return (s1 + family(params, x - d * s1, tt - d, d=dq)) / 2
  return affine(fn)


def newton(loss_fn, batch, params, target_of, iterations):
  """`iterations` exact minimisations, each at the target `target_of(current params)`."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)

  @jax.jit
  def step(flat, target, key):
    f = lambda q: loss_fn(unravel(q), batch, key, **target)[0]  # noqa: E731
    # lstsq: entries the loss never reads (t = 0, t < d) have zero rows and stay put
    return flat - jnp.linalg.lstsq(jax.hessian(f)(flat), jax.grad(f)(flat))[0]

  for it in range(iterations):
    flat = step(flat, target_of(unravel(flat)), jax.random.key(it))
  return unravel(flat)


def zeros():
  return {"a": jnp.zeros((M + 1, len(STEPS), 3)), "b": jnp.zeros((M + 1, len(STEPS), 3))}


def batch(n=1024):
  return {"x": analytic.sample(gaussian(), jax.random.key(0), n, dtype=jnp.float64)}


def test_flow_matching_part_is_the_instantaneous_velocity(x64):
  loss_fn = shortcut.shortcut_loss(family, analytic.denoiser(RF), schedule=RF,
                                   bootstrap_fraction=0.0, num_base_steps=M)
  params = newton(loss_fn, batch(), zeros(),
                  lambda p: {"target_params": p, "teacher_params": gaussian()}, 1)
  exact = exact_table()
  for key in ("a", "b"):
    np.testing.assert_allclose(params[key][1:, 0], exact[key][1:, 0], rtol=1e-9, atol=1e-9)


def test_flow_matching_from_data_is_stationary_at_the_velocity(x64):
  # eps - x0 is an unbiased sample of the velocity: the expected gradient vanishes at the exact
  # table (up to sampling error), and not at a perturbed one
  loss_fn = shortcut.shortcut_loss(family, schedule=RF, bootstrap_fraction=0.0, num_base_steps=M)
  data = batch(2 ** 15)
  grad = jax.jit(jax.grad(lambda p: loss_fn(p, data, jax.random.key(1), target_params=p)[0]))
  norm = lambda g: float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g))))  # noqa: E731
  exact = exact_table()
  off = {"a": exact["a"] * 1.1, "b": exact["b"] + 0.1}
  assert norm(grad(exact)) < 0.1 * norm(grad(off)), (norm(grad(exact)), norm(grad(off)))


def test_self_consistency_from_exact_shortcuts_is_the_exact_double_jump(x64):
  # target = the exact table: one step of D = 2d must become the exact D-jump for d >= 1/4, and
  # at the smallest step d = 1/8 (queried at d = 0) two Euler steps of the exact velocity
  exact = exact_table()
  loss_fn = shortcut.shortcut_loss(family, schedule=RF, bootstrap_fraction=1.0, num_base_steps=M)
  params = newton(loss_fn, batch(), zeros(), lambda p: {"target_params": exact}, 1)
  for di in (3, 4):  # D = 1/2 and 1
    big = STEPS[di]
    rows = [round(k * big * M) for k in range(1, round(1 / big) + 1)]
    for key in ("a", "b"):
      np.testing.assert_allclose(params[key][rows, di], exact[key][rows, di], rtol=1e-9,
                                 atol=1e-9)
  for ti in (2, 4, 6, 8):  # D = 1/4: t in {1/4, ..., 1}
    a, b = compose(exact, ti / M, 1 / M, 0.0)
    np.testing.assert_allclose(params["a"][ti, 2], a, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(params["b"][ti, 2], b, rtol=1e-9, atol=1e-9)
    # the check can tell: two Euler steps of 1/8 are not the exact 1/4-jump
    assert float(jnp.max(jnp.abs(a - exact["a"][ti, 2]))) > 1e-4


@pytest.mark.slow  # ~10 s: four exact minimisations over both parts
def test_fixed_point_of_the_full_loss_is_the_bootstrap_recursion(x64):
  # flow matching (teacher velocity) and self-consistency together, the target re-read from the
  # student (an EMA's fixed point): log2(M) + 1 exact minimisations reach the fixed point, level
  # by level, which is the recursion S_{2d} = compose(S_d) started from the exact velocity
  loss_fn = shortcut.shortcut_loss(family, analytic.denoiser(RF), schedule=RF,
                                   bootstrap_fraction=0.5, num_base_steps=M)
  params = newton(loss_fn, batch(2048), zeros(),
                  lambda p: {"target_params": p, "teacher_params": gaussian()}, 4)
  ref = {k: np.array(v) for k, v in exact_table().items()}
  ref["a"][:, 1:], ref["b"][:, 1:] = 0.0, 0.0
  for di in (2, 3, 4):
    big = STEPS[di]
    for k in range(1, round(1 / big) + 1):
      ti = round(k * big * M)
      ref["a"][ti, di], ref["b"][ti, di] = compose(
          {kk: jnp.asarray(v) for kk, v in ref.items()}, ti / M, big / 2,
          0.0 if di == 2 else big / 2)
      for key in ("a", "b"):
        np.testing.assert_allclose(params[key][ti, di], ref[key][ti, di], rtol=1e-8, atol=1e-8)
  # so the one-step map at the fixed point is the M-step Euler solve of the flow (0.18 off the
  # exact map's slope at M = 8, 0.012 at M = 128: the bootstrap's O(1/M) bias)
  z = jax.random.normal(jax.random.key(3), (64, 3), jnp.float64)
  euler = z
  for i in range(M):
    euler = euler - velocity(euler, 1.0 - i / M) / M
  np.testing.assert_allclose(shortcut.shortcut_sample(family, params, z, num_steps=1), euler,
                             rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sampler_with_exact_shortcuts_is_the_flow_map_in_k_calls(x64, k):
  exact = exact_table()
  calls = []

  def counted(params, x, t, *, d):
    calls.append(1)
    return family(params, x, t, d=d)

  z = jax.random.normal(jax.random.key(3), (64, 3), jnp.float64)
  out = shortcut.shortcut_sample(counted, exact, z, num_steps=k)
  assert len(calls) == k
  np.testing.assert_allclose(out, analytic.gaussian_flow_map(gaussian(), z, schedule=REF,
                                                             t_start=1.0, t_end=T0),
                             rtol=1e-10, atol=1e-10)


def test_time_and_step_draws():
  t, big, dq = shortcut.sample_self_consistency(jax.random.key(0), 7 * 4096, num_base_steps=128)
  np.testing.assert_array_equal(np.unique(np.asarray(big)), 2.0 ** -np.arange(6, -1, -1))
  np.testing.assert_array_equal(np.bincount(np.round(-np.log2(np.asarray(big))).astype(int)),
                                np.full(7, 4096))  # equal shares of each level
  grid = np.asarray(t) / np.asarray(big)
  np.testing.assert_array_equal(grid, np.round(grid))  # t is a multiple of D ...
  assert float(jnp.min(t - big)) == 0.0 and float(jnp.max(t)) == 1.0  # ... in [D, 1]
  np.testing.assert_array_equal(np.asarray(dq), np.where(np.asarray(big) == 2 / 128, 0.0,
                                                         np.asarray(big) / 2))
  with pytest.raises(ValueError, match="bootstrap_fraction"):
    shortcut.shortcut_loss(family, bootstrap_fraction=1.5)
  with pytest.raises(ValueError, match="num_base_steps"):
    shortcut.shortcut_loss(family, num_base_steps=100)
  with pytest.raises(ValueError, match="num_steps"):
    shortcut.shortcut_sample(family, zeros(), jnp.zeros((1, 3)), num_steps=3)
