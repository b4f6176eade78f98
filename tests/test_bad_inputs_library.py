"""Silent and unclear inputs of the library found by issue 19: each is now a ValueError naming
the argument and what is accepted, or a documented behaviour (docs/bad_inputs.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, metrics, parametrization, schedules, solvers
from diffdistill.losses import consistency as cm, progressive

S = schedules.VPLinear()
MIX = analytic.ring2d()
BATCH = {"x": jax.random.normal(jax.random.PRNGKey(0), (8, 2))}


def teacher(params, x, t, **cond):
  del cond
  return analytic.denoise(params, x, t, schedule=S)


def student(params, x, t, **cond):
  del t, cond
  return params["c"] * x


def test_pd_loss_num_steps_below_one():
  # before: NaN (0) or a finite loss on a meaningless grid (-2)
  loss_fn = progressive.pd_loss(student, student, schedule=S)
  call = lambda n: loss_fn({"c": jnp.ones(())}, BATCH, jax.random.PRNGKey(1),  # noqa: E731
                           teacher_params={"c": 0.5 * jnp.ones(())}, num_steps=n)[0]
  for n in (0, -2):
    with pytest.raises(ValueError, match=rf"num_steps \(the student's step count N\) must be an "
                       rf"integer >= 1, got {n}"):
      call(n)
  traced = jax.jit(call)  # traced: NaN, so the step is skipped and the loop stops
  assert np.isnan(traced(jnp.int32(0))) and np.isnan(traced(jnp.int32(-2)))
  assert np.isfinite(traced(jnp.int32(4)))


@pytest.mark.parametrize("kwargs, message", [
    ({"num_steps": 0}, r"num_steps must be an integer >= 1, got 0"),  # before: NaN loss
    ({"num_steps": -3}, r"num_steps must be an integer >= 1, got -3"),  # before: about t
    ({"solver_step": "heun"}, r"solver_step must be a single-step function .*solvers.heun_step; "
                              r"got 'heun'"),  # before: 'str' object is not callable
])
def test_cd_loss_bad_options_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    cm.cd_loss(student, teacher, schedule=S, **kwargs)


@pytest.mark.parametrize("q", [1.0, 0.5])
def test_ect_gap_divisor_must_exceed_one(q):
  # q <= 1 would leave the gap at >= 1 (denoising only) or grow it stage by stage
  with pytest.raises(ValueError, match=rf"q \(ECT's gap divisor per stage\) must be > 1, got {q}"):
    cm.ect_loss(student, schedule=S, stage_steps=10, q=q)


def test_sample_with_a_denoiser_that_returns_nan_for_some_t_is_an_error():
  # before: all 16 samples NaN, no error
  def bad(x, t):
    return jnp.where(jnp.reshape(t, (-1, 1)) < 0.5, jnp.nan, 0.5 * x)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
  with pytest.raises(ValueError, match=r"denoise\(x, t\) returned NaN or inf at some time of the "
                     r"grid: 16 of 16 samples are non-finite \(the first: row 0\)"):
    solvers.sample(bad, x_T, schedule=S, solver="ddim", nfe=8)


def test_sample_with_a_nan_row_in_x_T():
  # before: that row came back NaN, silently. Eagerly an error; under jit (documented) only that
  # row is NaN and the others are unchanged
  denoise = lambda x, t: analytic.denoise(MIX, x, t, schedule=S)  # noqa: E731
  x_T = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
  bad = x_T.at[3, 1].set(jnp.nan)
  with pytest.raises(ValueError, match=r"x_T holds non-finite values \(NaN or inf\) in 1 of 16 "
                     r"rows \(the first: row 3\)"):
    solvers.sample(denoise, bad, schedule=S, solver="dpm_solver_pp_2m", nfe=8)
  run = jax.jit(lambda x: solvers.sample(denoise, x, schedule=S, solver="dpm_solver_pp_2m", nfe=8))
  good, got = np.asarray(run(x_T)), np.asarray(run(bad))
  assert np.isnan(got[3]).all() and np.isfinite(np.delete(got, 3, axis=0)).all()
  np.testing.assert_allclose(np.delete(got, 3, axis=0), np.delete(good, 3, axis=0), rtol=1e-6)


@pytest.mark.parametrize("kind", ["eps", "score", "edm"])
def test_to_x0_where_alpha_is_zero(kind):
  # before: NaN (eps: (x - sigma eps) / 0)
  flow = schedules.RectifiedFlow()
  x = jnp.ones((2, 2))
  t = jnp.array([0.5, flow.t_max])
  assert float(flow.alpha(flow.t_max)) == 0.0
  with pytest.raises(ValueError, match=rf"kind='{kind}' cannot give x0 where alpha\(t\) = 0 "
                     rf"\(t = 1.0 is the pure-noise end of RectifiedFlow"):
    parametrization.to_x0(x, x, t, kind=kind, schedule=flow)
  # 'v' and 'flow' are defined there, and t < t_max stays allowed
  for ok in ("v", "flow"):
    assert np.isfinite(parametrization.to_x0(x, x, t, kind=ok, schedule=flow)).all()
  assert np.isfinite(parametrization.to_x0(x, x, t[0], kind=kind, schedule=flow)).all()


def test_mmd2_of_an_input_with_nan_names_it():
  # before: NaN
  x = np.random.RandomState(0).randn(32, 2)
  y = x.copy()
  y[5, 0] = np.nan
  with pytest.raises(ValueError, match=r"y holds non-finite values \(NaN or inf\) in 1 of 32 "
                     r"rows \(the first: row 5\)"):
    metrics.mmd2(x, y)
  with pytest.raises(ValueError, match=r"x holds non-finite"):
    metrics.mmd2(np.where(np.arange(32)[:, None] == 0, np.inf, x), x)
