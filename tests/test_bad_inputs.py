"""Bad inputs to `solvers.sample` and the shared checks of `diffdistill._validate` (issue 7).

Each class of bad input is a ValueError that names the argument and the accepted values, or a
correct answer; docs/bad_inputs.md lists the inputs and their messages.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import _validate, analytic, schedules, solvers

S = schedules.VPLinear()
MIX = analytic.ring2d()


def denoise(x, t):
  return analytic.denoise(MIX, x, t, schedule=S)


def noise(b=16):
  return jax.random.normal(jax.random.PRNGKey(0), (b, 2))


@pytest.mark.parametrize("bad, message", [
    (lambda x, t: denoise(x, t)[:, :1],
     r"must return x0_hat of x's shape \(16, 2\); it returned shape \(16, 1\)"),
    (lambda x, t: denoise(x, t)[:, 0], r"it returned shape \(16,\)"),
    (lambda x, t: denoise(x, t).astype(jnp.int32), "must return a floating-point array"),
    (lambda x, t: (denoise(x, t), t), "must return one array"),
], ids=["B_1", "B", "int32", "tuple"])
@pytest.mark.parametrize("solver", ["ddim", "dpm_solver_pp_2m", "heun", "adaptive"])
def test_denoiser_output_is_checked_by_name(bad, message, solver):
  # [B, 1] used to broadcast silently (median error 0.51 instead of 0.054); [B] was a bare
  # AssertionError deep in the multistep engine.
  with pytest.raises(ValueError, match=r"denoise\(x, t\) .*" + message):
    solvers.sample(bad, noise(), schedule=S, solver=solver, nfe=None if solver == "adaptive" else 5)


def test_nfe_takes_numpy_integers_only():
  want = solvers.sample(denoise, noise(), schedule=S, solver="ddim", nfe=5)
  got = solvers.sample(denoise, noise(), schedule=S, solver="ddim", nfe=np.int64(5))
  np.testing.assert_array_equal(got, want)
  assert solvers.steps_for_nfe("heun", np.int32(9)) == (5, 9)
  for bad in (5.0, True, "5"):
    with pytest.raises(ValueError, match="nfe must be an integer"):
      solvers.sample(denoise, noise(), schedule=S, solver="ddim", nfe=bad)


def test_rng_of_either_key_kind_and_int_rejected():
  typed = solvers.sample(denoise, noise(), schedule=S, solver="ddpm", nfe=5, rng=jax.random.key(1))
  raw = solvers.sample(denoise, noise(), schedule=S, solver="ddpm", nfe=5, rng=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(typed, raw)
  with pytest.raises(ValueError, match=r"rng must be a PRNG key, not the integer 0: pass jax.random.key\(0\)"):
    solvers.sample(denoise, noise(), schedule=S, solver="ddpm", nfe=5, rng=0)


def test_schedule_by_name():
  np.testing.assert_array_equal(
      solvers.sample(denoise, noise(), schedule="vp_linear", solver="ddim", nfe=4),
      solvers.sample(denoise, noise(), schedule=S, solver="ddim", nfe=4))
  with pytest.raises(ValueError, match="Unknown schedule 'vp'"):
    solvers.sample(denoise, noise(), schedule="vp", solver="ddim", nfe=4)


def test_check_int():
  assert _validate.check_int("n", np.uint8(3), min=1) == 3
  assert type(_validate.check_int("n", np.int64(3))) is int
  for bad, message in ((True, "an integer, got True"), (np.bool_(True), "an integer"),
                       (3.0, r"an integer, got 3.0 \(float\)"), (np.float32(3), "an integer"),
                       (0, "an integer >= 1, got 0"), (9, "an integer <= 8, got 9")):
    with pytest.raises(ValueError, match=f"n must be {message}"):
      _validate.check_int("n", bad, min=1, max=8)


def test_check_key():
  for key in (jax.random.key(0), jax.random.PRNGKey(0)):
    assert _validate.check_key("rng", key) is key
  jax.jit(lambda k: _validate.check_key("rng", k))(jax.random.key(0))  # shapes only: traceable
  for bad, message in ((np.int64(7), r"not the integer 7: pass jax.random.key\(7\)"),
                       (jax.random.split(jax.random.key(0), 3), "a single PRNG key"),
                       (jnp.zeros(2), r"got an array of shape \(2,\) and dtype float32"),
                       (None, "got None")):
    with pytest.raises(ValueError, match=f"rng must be .*{message}"):
      _validate.check_key("rng", bad)


def test_check_time_slack_and_tracers():
  check = lambda t: _validate.check_time("t", t, t_min=1e-3, t_max=1.0)
  check(np.float32(1.0) + np.float32(6e-8))  # float32 rounding of the end
  check(jnp.asarray(1.0, jnp.bfloat16))
  check(jnp.array([0.5, jnp.nan]))  # NaN is not a time out of range
  jax.jit(lambda t: check(t) or t)(5.0)  # traced: unchecked
  for bad in (1.001, -0.0, jnp.array([0.5, 2.0]), jnp.array([jnp.nan, 2.0])):
    with pytest.raises(ValueError, match=r"t must lie in \[t_min, t_max\] = \[0.001, 1.0\]"):
      check(bad)
