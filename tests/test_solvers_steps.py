"""The public single steps: one signature, each equal to its solver's engine in `sample` on the
same non-uniform grid (same keys for the stochastic ones), and the closed forms that pin down
the formulas a step and its engine share (step-size ratios, noise scales, thresholding)."""

import dataclasses
import functools
import inspect
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import analytic, schedules, solvers
from diffdistill.solvers import grids
from diffdistill.solvers import heun as heun_lib
from diffdistill.solvers import pndm as pndm_lib
from solver_testing import mixture, noise

PUBLIC_STEPS = sorted(n for n in solvers.__all__ if n.endswith("_step"))
STOCHASTIC_STEPS = {"ddim_eta_step", "euler_maruyama_step", "edm_stochastic_step"}
VP = schedules.VPLinear()
N = 6


def _uneven_grid(sch, n, t_start, t_end):
  """n steps whose logSNR sizes alternate 1 : 2, so h / h_prev is 2 or 1/2 at every step."""
  lam = grids.host_grid(sch, np.array([t_start, t_end])).lam
  w = np.where(np.arange(n) % 2 == 0, 1.0, 2.0)
  lam_i = lam[0] + (lam[1] - lam[0]) * np.concatenate([[0.0], np.cumsum(w) / w.sum()])
  t = grids.t_from_lam(sch, lam_i)
  t[0], t[-1] = t_start, t_end
  return t


def _t(x, t):
  return jnp.full((x.shape[0],), t, x.dtype)


def _chain(step, **kw):
  """Applies `step` on every interval of the grid (keys[i] on step i)."""
  def run(d, x, t, keys, sch):
    for i in range(len(t) - 1):
      x = step(d, x, t[i], t[i + 1], schedule=sch, rng=keys[i], **kw)
    return x
  return run


def _edm_chain(d, x, t, keys, sch):
  gammas = heun_lib.churn_gammas(grids.host_grid(sch, t), S_churn=40.0, S_tmin=0.05, S_tmax=50.0)
  for i in range(len(t) - 1):
    x = solvers.edm_stochastic_step(d, x, t[i], t[i + 1], schedule=sch, rng=keys[i],
                                    gamma=gammas[i], s_noise=1.003)
  return x


def _pp_multistep_chain(order, **kw):
  """DDIM, then 2M, then (order 3) 3M steps, one denoiser call per step through d_s."""
  def run(d, x, t, keys, sch):
    hist = []  # D_i, newest first
    for i in range(len(t) - 1):
      d_s = d(x, _t(x, t[i]))
      p = min(order, i + 1)
      if p == 1:
        x = solvers.ddim_step(d, x, t[i], t[i + 1], schedule=sch)
      elif p == 2:
        x = solvers.dpm_solver_pp_2m_step(d, x, t[i], t[i + 1], schedule=sch, d_prev=hist[0],
                                          t_prev=t[i - 1], d_s=d_s)
      else:
        x = solvers.dpm_solver_pp_3m_step(d, x, t[i], t[i + 1], schedule=sch,
                                          d_prev=(hist[0], hist[1]), t_prev=(t[i - 1], t[i - 2]),
                                          d_s=d_s, **kw)
      hist.insert(0, d_s)
    return x
  return run


def _pndm_chain(d, x, t, keys, sch):
  """Three pseudo-RK4 steps, then pseudo-LMS (fixed 4th-order AB) on the DDIM transfer."""
  g = grids.host_grid(sch, t)
  eps = []
  for i in range(len(t) - 1):
    d_s = d(x, _t(x, t[i]))
    eps.append((x - g.alpha[i] * d_s) / g.sigma[i])
    if i < 3:
      x = solvers.pndm_prk_step(d, x, t[i], t[i + 1], schedule=sch, d_s=d_s)
    else:
      e = sum(c * eps[-1 - j] for j, c in enumerate(pndm_lib.AB_COEFFS[4]))
      x0 = (x - g.sigma[i] * e) / g.alpha[i]  # the DDIM transfer with noise e
      x = solvers.ddim_step(lambda y, s, x0=x0: x0, x, t[i], t[i + 1], schedule=sch)
  return x


@dataclasses.dataclass(frozen=True)
class Case:
  step: str
  solver: str
  nfe: int
  chain: Callable
  options: tuple = ()


CASES = [
    Case("ddim_step", "ddim", N, _chain(solvers.ddim_step)),
    Case("euler_step", "euler", N, _chain(solvers.euler_step)),
    Case("dpm_solver_1_step", "dpm_solver_1", N, _chain(solvers.dpm_solver_1_step)),
    Case("ddim_eta_step", "ddim_eta", N, _chain(solvers.ddim_eta_step, eta=0.5),
         (("eta", 0.5),)),
    Case("ddim_eta_step", "ddpm", N, _chain(solvers.ddim_eta_step)),  # eta = 1 by default
    Case("euler_maruyama_step", "euler_maruyama", N, _chain(solvers.euler_maruyama_step)),
    Case("heun_step", "heun", 2 * N, _chain(solvers.heun_step), (("final_euler", False),)),
    Case("edm_stochastic_step", "edm_stochastic", 2 * N, _edm_chain, (("final_euler", False),)),
    Case("dpm_solver_2_step", "dpm_solver_2", 2 * N, _chain(solvers.dpm_solver_2_step)),
    Case("dpm_solver_3_step", "dpm_solver_3", 3 * N, _chain(solvers.dpm_solver_3_step)),
    Case("dpm_solver_pp_2s_step", "dpm_solver_pp_2s", 2 * N,
         _chain(solvers.dpm_solver_pp_2s_step)),
    Case("dpm_solver_pp_2m_step", "dpm_solver_pp_2m", N, _pp_multistep_chain(2),
         (("lower_order_final", False),)),
    Case("dpm_solver_pp_3m_step", "dpm_solver_pp_3m", N, _pp_multistep_chain(3),
         (("lower_order_final", False),)),
    Case("dpm_solver_pp_3m_step", "dpm_solver_pp_3m", N, _pp_multistep_chain(3, taylor_d2=True),
         (("lower_order_final", False), ("taylor_d2", True))),
    Case("pndm_prk_step", "pndm", 12 + (N - 3), _pndm_chain),
]


def test_every_public_step_has_a_case_and_the_common_signature():
  assert {c.step for c in CASES} == set(PUBLIC_STEPS)
  for name in PUBLIC_STEPS:
    params = list(inspect.signature(getattr(solvers, name)).parameters.values())
    assert [p.name for p in params[:4]] == ["denoise", "x", "t_s", "t_t"], name
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[:4]), name
    assert all(p.kind == p.KEYWORD_ONLY for p in params[4:]), name
    kw = {p.name: p for p in params[4:]}
    assert "schedule" in kw and kw["rng"].default is None, name


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.step}-{c.solver}-{dict(c.options)}")
def test_public_step_equals_engine_on_uneven_grid(case, x64):
  d = functools.partial(analytic.denoiser(VP), mixture())
  x = noise(VP, 4, 8, jnp.float64)
  t = _uneven_grid(VP, N, VP.t_max, 0.05)
  rng = jax.random.key(4)
  want = solvers.sample(d, x, schedule=VP, solver=case.solver, nfe=case.nfe, spacing=t, rng=rng,
                        **dict(case.options))
  got = case.chain(d, x, t, jax.random.split(rng, N), VP)
  assert got.shape == x.shape  # the new state only, never a tuple
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(STOCHASTIC_STEPS))
def test_stochastic_steps_need_rng(name):
  d = functools.partial(analytic.denoiser(VP), mixture())
  x = noise(VP, 2, 8)
  with pytest.raises(ValueError, match="stochastic: pass rng"):
    getattr(solvers, name)(d, x, 0.5, 0.4, schedule=VP, gamma=0.1) if name.startswith("edm") \
        else getattr(solvers, name)(d, x, 0.5, 0.4, schedule=VP)


def _linear_in_lambda(c0, c1):
  """D(x, t) = c0 + c1 lambda(t), independent of x: the data-form PF-ODE then integrates in
  closed form, x_t / sigma_t = x_s / sigma_s + [e^lam (c0 + c1 (lam - 1))] from lam_s to lam_t."""
  def d(x, t):
    lam = 0.5 * VP.logsnr(t)[:, None]
    return jnp.broadcast_to(c0 + c1 * lam, x.shape)

  def exact(x, t_s, t_t):
    ls, lt = 0.5 * float(VP.logsnr(t_s)), 0.5 * float(VP.logsnr(t_t))
    prim = lambda lam: np.exp(lam) * (c0 + c1 * (lam - 1.0))
    return float(VP.sigma(t_t)) * (x / float(VP.sigma(t_s)) + prim(lt) - prim(ls))
  return d, exact


def _times(lams):
  return [float(t) for t in grids.t_from_lam(VP, np.array(lams))]


def test_multistep_steps_use_the_true_step_size_ratio(x64):
  # lambda: t_prev2 -> t_prev -> t_s -> t_t with steps 0.6, 0.4, 0.2 (ratios 2 and 1.5).
  c0, c1 = np.linspace(-1.0, 1.0, 3), np.array([0.7, -0.3, 0.2])
  d, exact = _linear_in_lambda(c0, c1)
  t_p2, t_p1, t_s, t_t = _times([-1.0, -0.4, 0.0, 0.2])
  x = jnp.asarray(noise(VP, 2, 3, jnp.float64))
  ref = exact(np.asarray(x), t_s, t_t)
  dp1, dp2 = d(x, jnp.full((2,), t_p1)), d(x, jnp.full((2,), t_p2))
  # 3M: its Taylor part is exact for data linear in lambda, whatever the step sizes.
  out3 = solvers.dpm_solver_pp_3m_step(d, x, t_s, t_t, schedule=VP, d_prev=(dp1, dp2),
                                       t_prev=(t_p1, t_p2))
  np.testing.assert_allclose(out3, ref, rtol=1e-12, atol=1e-12)
  # 2M: the local error is alpha_t c1 (h + phi_1 + phi_1 h / 2) ~ alpha_t c1 h^3 / 12, also for
  # any h_prev; an inverted ratio h_prev / h leaves ~ alpha_t c1 h^2 (1 - (h_prev/h)^2) / 2.
  out2 = solvers.dpm_solver_pp_2m_step(d, x, t_s, t_t, schedule=VP, d_prev=dp1, t_prev=t_p1)
  h = 0.2
  bound = float(VP.alpha(t_t)) * np.abs(c1) * h ** 3 / 6.0
  assert np.all(np.abs(np.asarray(out2) - ref) < bound), (np.abs(np.asarray(out2) - ref), bound)


def _noise_std(step_fn, shape, dtype, key_of=lambda k: k):
  """The per-element std c of x_t = m(x_s) + c z, from two keys: c = (x1 - x2) / (z1 - z2), with
  z = normal(key_of(key)) the draw the step makes."""
  k1, k2 = jax.random.key(11), jax.random.key(12)
  z1, z2 = (jax.random.normal(key_of(k), shape, dtype) for k in (k1, k2))
  c = np.asarray((step_fn(k1) - step_fn(k2)) / (z1 - z2))
  np.testing.assert_allclose(c, c.flat[0], rtol=1e-8)  # the same for every element
  return float(c.flat[0])


def _ddpm_posterior_var(t_s, t_t):
  """Var[x_t | x_s, x0] by Gaussian conditioning: sigma_t^2 sigma_{s|t}^2 / sigma_s^2 with
  sigma_{s|t}^2 = sigma_s^2 - (alpha_s / alpha_t)^2 sigma_t^2."""
  a_s, s_s, a_t, s_t = (float(f(t)) for t in (t_s, t_t) for f in (VP.alpha, VP.sigma))
  return s_t ** 2 * (s_s ** 2 - (a_s / a_t) ** 2 * s_t ** 2) / s_s ** 2


@pytest.mark.parametrize("solver, t_s, t_t, rtol", [
    ("ddpm", 0.6, 0.4, 1e-10),  # the exact posterior variance, for a large step
    ("euler_maruyama", 0.5, 0.5 - 1e-4, 1e-2),  # g^2 |dt| = the posterior variance + O(dt)
])
def test_noise_scale_of_step_and_engine(solver, t_s, t_t, rtol, x64):
  d = functools.partial(analytic.denoiser(VP), mixture())
  x = noise(VP, 3, 8, jnp.float64)
  step_fn = {"ddpm": solvers.ddim_eta_step, "euler_maruyama": solvers.euler_maruyama_step}[solver]
  step = lambda k: step_fn(d, x, t_s, t_t, schedule=VP, rng=k)
  engine = lambda k: solvers.sample(d, x, schedule=VP, solver=solver, nfe=1, spacing=[t_s, t_t],
                                    rng=k)
  want = _ddpm_posterior_var(t_s, t_t)
  np.testing.assert_allclose(_noise_std(step, x.shape, x.dtype) ** 2, want, rtol=rtol)
  one_step_key = lambda k: jax.random.split(k, 1)[0]  # the engine's key of a one-step grid
  np.testing.assert_allclose(_noise_std(engine, x.shape, x.dtype, one_step_key) ** 2, want,
                             rtol=rtol)


def test_dynamic_thresholding_scales_to_data_max():
  # s = max(quantile_1(|x0|), data_max); x0 <- clip(x0, -s, s) * data_max / s.
  x0 = jnp.array([[0.5, -6.0, 2.0, 0.1], [0.2, 1.5, -2.4, 0.5], [0.5, -3.0, 2.0, 0.1]])
  out = solvers.dynamic_thresholding(lambda x, t: x, percentile=1.0, data_max=2.5)(x0, None)
  np.testing.assert_allclose(out[0], x0[0] * 2.5 / 6.0, rtol=1e-6)  # s = 6: into [-2.5, 2.5]
  np.testing.assert_allclose(out[1], x0[1], rtol=1e-6)  # s = max(2.4, 2.5) = 2.5: unchanged
  np.testing.assert_allclose(out[2], x0[2] * 2.5 / 3.0, rtol=1e-6)
