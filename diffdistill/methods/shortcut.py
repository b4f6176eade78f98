"""Shortcut models (Frans et al. 2025) on a rectified-flow teacher: s(x, t, d) from the copy
(d zero-initialized); the flow-matching part at d = 0 (the teacher's velocity, or eps - x0), the
self-consistency part against the student's EMA "target" copy (the paper's M = 128 base steps,
1/4 of the batch on self-consistency targets from a 0.999 EMA).

Loss: `losses.shortcut.shortcut`. Sampler: k steps from t = 1 with d = 1/k (k a power of two).
"""

from __future__ import annotations

import jax

from diffdistill import nets
from diffdistill import schedules as schedules_lib
from diffdistill.losses import shortcut as sc
from diffdistill.methods import _common, _consistency, plan as plan_lib

CONFIG = {**_consistency.SECTION,
          "shortcut": dict(num_steps=5000, bootstrap_fraction=0.25, num_base_steps=128, ema=0.999,
                           teacher_velocity=True)}
SETTINGS = {"teacher.schedule": "rectified_flow",
            "teacher.schedule_kwargs": dict(t_min=1e-3, t_max=1.0),
            "student.kind": "flow",
            "copy.time_sampler": "uniform"}
TESTBEDS = {"digits": {"shortcut.num_steps": 800, **_consistency.DIGITS}}
TINY = {"shortcut.num_steps": 20}
EXTRA_COND = ("d",)


def sampler(net, *, t_start: float = 1.0, t_end: float = 0.0):
  """nfe steps of d = 1/nfe from t = 1 (nfe a power of two), the last one ending at t_end."""
  if t_start != 1.0:
    raise ValueError(f"shortcut samples from t = 1 (schedule t_max = 1), got t_start={t_start}.")

  def sample(params, x, *, nfe, rng=None, **cond):
    del rng  # deterministic
    return sc.shortcut_sample(net.apply, params, x, num_steps=nfe, t_end=t_end, **cond)
  return sample


def build(config, setup):
  c, cc = config.shortcut, config.consistency
  _common.check_positive(c, "shortcut", ("num_steps", "num_base_steps"))
  schedule = setup.teacher.schedule
  if not isinstance(schedule, schedules_lib.RectifiedFlow) or config.student.kind != "flow":
    raise ValueError("shortcut needs config.teacher.schedule='rectified_flow' and "
                     "config.student.kind='flow'.")
  sampler(None, t_start=setup.t_start)  # refuses another start than t = 1 before any training
  net, stages, init = _consistency.setup_student(config, setup)
  s_net = _common.extra_input_net(config, setup, net, EXTRA_COND)
  fresh = s_net.init(jax.random.key(config.seed + 3))
  method = sc.shortcut(s_net.apply, setup.teacher.apply if c.teacher_velocity else None,
                       ema_decay=c.ema, schedule=schedule,
                       bootstrap_fraction=c.bootstrap_fraction, num_base_steps=c.num_base_steps)
  stages.append(_common.single_stage(config, setup, "shortcut", method, c.num_steps, init,
                                     ema={"target": c.ema},
                                     params=lambda r: nets.init_from(fresh, init(r)),
                                     frozen=c.teacher_velocity))
  sample = sampler(s_net, t_start=setup.t_start, t_end=setup.t_end)
  students = [plan_lib.Student(name="shortcut", nfe=k, params=lambda r: r["shortcut"]["student"],
                               sample=sample) for k in cc.nfes]
  return plan_lib.Plan(stages=stages, students=students)
