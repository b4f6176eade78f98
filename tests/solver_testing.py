"""Shared fixtures of the solver tests: a small analytic mixture, noise, NFE helpers."""


import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import analytic, schedules, solvers

DETERMINISTIC = [n for n, s in solvers.SOLVERS.items() if not s.stochastic and n != "adaptive"]
STOCHASTIC = [n for n, s in solvers.SOLVERS.items() if s.stochastic]
ALL_SCHEDULES = [schedules.VPLinear(), schedules.VPCosine(), schedules.VPDiscrete.from_name(),
                 schedules.VE(), schedules.EDM(), schedules.RectifiedFlow(), schedules.TrigFlow(),
                 schedules.TrigFlow(t_max=np.pi / 2)]


def mixture(k=4, d=8, seed=0):
  rng = np.random.default_rng(seed)
  return analytic.GaussianMixture(np.ones(k), 0.7 * rng.standard_normal((k, d)),
                                  np.exp(rng.uniform(-3, -1, (k, d))))


def noise(schedule, n, d, dtype=jnp.float32, seed=1):
  scale = float(np.hypot(schedule.alpha(schedule.t_max), schedule.sigma(schedule.t_max)))
  return scale * jax.random.normal(jax.random.key(seed), (n, d), dtype)


def feasible_nfe(name, target):
  return solvers.steps_for_nfe(name, target, allow_nearest_nfe=True)[1]


def counting(denoise):
  """Wraps a denoiser so that every executed call (not trace) bumps count[0]."""
  count = [0]

  def bump():
    count[0] += 1

  def wrapped(x, t):
    jax.debug.callback(bump)
    return denoise(x, t)

  return wrapped, count


