"""What the consistency-model and flow-map modules share: the `consistency` config section, the
2-step intermediate time, and the multistep consistency sampler.

Every student starts from the teacher's weights, or, for an analytic teacher, from the `copy`
stage's network fit, as the papers initialize CD, ECT and sCD from the pretrained diffusion model
(CT and iCT start from the copy too here: a fair comparison at CPU scale). Students are sampled
with 1 and 2 calls (`consistency.nfes`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffdistill import solvers
from diffdistill.losses import consistency as cm
from diffdistill.methods import _common, plan as plan_lib

SECTION = {"consistency": dict(nfes=(1, 2), spacing="karras", mid_sigma=0.8)}
SOLVER_STEPS = {"ddim": solvers.ddim_step, "heun": solvers.heun_step}
# the U-Net costs ~0.3-1 s per step on 2 cores: short runs, and 1- and 2-call teacher rows from
# three solvers, timed once (each solver's jit is most of an image row's cost)
DIGITS = {"eval.solvers": ("dpm_solver_pp_2m", "unipc_2", "heun"), "eval.repeats": 1}


def solver_step(name: str, value: str):
  if value not in SOLVER_STEPS:
    raise ValueError(f"{name}.solver must be one of {sorted(SOLVER_STEPS)}, got {value!r}.")
  return SOLVER_STEPS[value]


def mid_time(schedule, sigma_hat: float) -> float:
  """The time where sigma / alpha = sigma_hat (2-step sampling's intermediate time)."""
  t = float(schedule.t_from_logsnr(jnp.float32(-2.0 * jnp.log(sigma_hat))))
  return min(max(t, float(schedule.t_min)), float(schedule.t_max))


def times(name: str, nfe, t_start: float, t_mid: float) -> list[float]:
  """The call times of a 1- or 2-call sampler: [t_start] or [t_start, t_mid]."""
  plan_lib.check_nfe(name, nfe, (1, 2))
  return [t_start] if nfe == 1 else [t_start, t_mid]


def multistep_sampler(name: str, f, schedule, *, t_start: float, t_end: float, t_mid: float):
  """Multistep consistency sampling of the consistency function f (re-noising at t_mid)."""
  def sample(params, x, *, nfe, rng=None, **cond):
    rng = jax.random.key(0) if rng is None else rng
    return cm.multistep_sample(f, params, x, schedule=schedule,
                               times=tuple(times(name, nfe, t_start, t_mid)), rng=rng,
                               t_end=t_end, **cond)
  return sample


def consistency_sampler(name: str, net, *, t_start: float, t_end: float, mid_sigma: float = 0.8):
  """The sampler of a consistency student whose network `net` is the denoiser inside f."""
  f = cm.consistency_function(net.denoise, schedule=net.schedule, t_min=t_end)
  return multistep_sampler(name, f, net.schedule, t_start=t_start, t_end=t_end,
                           t_mid=mid_time(net.schedule, mid_sigma))


def setup_student(config, setup):
  """(net, stages, init): the student network, the stage list (with the copy stage where the
  teacher has no weights) and where the student starts."""
  net = _common.student_net(config, setup)
  stages: list[plan_lib.Stage] = []
  init = _common.initial_params(setup, stages, net)
  return net, stages, init


def consistency_plan(name, config, setup, net, stages, method, num_steps, init, *, ema=None):
  """One stage training the consistency student, its students at consistency.nfes."""
  stages.append(_common.single_stage(config, setup, name, method, num_steps, init, ema=ema))
  cc = config.consistency
  sample = consistency_sampler(name, net, t_start=setup.t_start, t_end=setup.t_end,
                               mid_sigma=cc.mid_sigma)
  students = [plan_lib.Student(name=name, nfe=k, params=lambda r: r[name]["student"],
                               sample=sample) for k in cc.nfes]
  return plan_lib.Plan(stages=stages, students=students)


__all__ = ["SECTION", "SOLVER_STEPS", "DIGITS", "solver_step", "mid_time", "times",
           "multistep_sampler", "consistency_sampler", "setup_student", "consistency_plan"]
