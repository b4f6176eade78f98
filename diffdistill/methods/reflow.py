"""Rectified flow's reflow (Liu et al. 2023): the 2-rectified flow fitted to the straight lines
between the teacher's (1-RF's) noise-data pairs, sampled with Euler; then a one-step KD of it.

Losses: `losses.rectified_flow.reflow`, `losses.kd.knowledge_distillation` (on the 2-RF's own
pairs). The teacher must be a rectified flow (the exact 1-RF on the analytic testbeds); the
student predicts the velocity on the straight-line coordinate s in [s_min, 1]. Notes: Liu et al.'s
straightness S of the 1-RF and the learned 2-RF on the evaluation's x_start.
"""

from __future__ import annotations

import dataclasses

import functools

import jax

from diffdistill import schedules as schedules_lib
from diffdistill.losses import kd, rectified_flow
from diffdistill.methods import _common, plan as plan_lib

CONFIG = {"reflow": dict(num_steps=3000, nfes=(1, 2, 4), s_min=1e-5, pair_steps=64,
                         kd_steps=2000, distance="l2", straightness_steps=128)}
SETTINGS = {"teacher.schedule": "rectified_flow",
            "teacher.schedule_kwargs": dict(t_min=1e-3, t_max=1.0),
            "student.kind": "flow",
            "copy.time_sampler": "uniform"}  # logSNR is -inf at the pure-noise end
TESTBEDS = {"digits": "reflow_digits is not a variant: reflow's adaptive pairs of the U-Net "
                      "teacher take hours on CPU; reflow runs on ring2d and gmm64."}
TINY = {"reflow.num_steps": 20, "reflow.kd_steps": 20, "reflow.nfes": (1,),
        "reflow.pair_steps": 4, "reflow.straightness_steps": 8}
EXTRA_COND = ()


def sampler(net, *, t_start: float = 1.0, t_end: float = 1e-5):
  """Euler on the learned velocity, nfe steps uniform in s from t_start to t_end."""
  return _common.ddim_sampler(net, t_start=t_start, t_end=t_end, spacing="time_uniform")


def build(config, setup) -> plan_lib.Plan:
  c = config.reflow
  _common.check_positive(c, "reflow", ("num_steps", "kd_steps", "pair_steps"))
  teacher = setup.teacher
  if not isinstance(teacher.schedule, schedules_lib.RectifiedFlow):
    raise ValueError("reflow needs a rectified-flow teacher (1-RF): set "
                     "config.teacher.schedule='rectified_flow'.")
  if config.student.kind != "flow":
    raise ValueError("reflow students predict the velocity: set config.student.kind='flow'.")
  rf = schedules_lib.RectifiedFlow(t_min=c.s_min, t_max=1.0)  # the straight-line coordinate s
  net = _common.student_net(config, setup)
  flow_net = dataclasses.replace(net, kind="flow", schedule=rf)
  stages: list[plan_lib.Stage] = []
  init = _common.initial_params(setup, stages, net)
  euler = sampler(flow_net, t_start=1.0, t_end=c.s_min)
  stages.append(plan_lib.Stage(
      name="reflow", method=rectified_flow.reflow(flow_net.apply, kind="flow", schedule=rf),
      num_steps=c.num_steps,
      players=lambda r: {"student": plan_lib.make_player(
          config.optim, init(r), num_steps=c.num_steps, ema={"eval": config.eval_ema})},
      data=_common.pairs_data(config, setup)))

  def two_rf_sampler(r):
    return jax.jit(functools.partial(euler, r["reflow"]["student"], nfe=c.pair_steps))

  kd_method = kd.knowledge_distillation(flow_net.denoise, schedule=rf, num_steps=1,
                                        spacing="time_uniform", distance=c.distance,
                                        t_start=1.0, t_end=c.s_min)
  stages.append(plan_lib.Stage(
      name="reflow_kd_1", method=kd_method, num_steps=c.kd_steps,
      players=lambda r: {"student": plan_lib.make_player(
          config.optim, r["reflow"]["student"], num_steps=c.kd_steps,
          ema={"eval": config.eval_ema})},
      data=_common.pairs_data(config, setup, "pairs_2rf", two_rf_sampler)))
  students = [plan_lib.Student(name="2-rectified flow", nfe=k,
                               params=lambda r: r["reflow"]["student"], sample=euler)
              for k in c.nfes]
  students.append(plan_lib.Student(name="2-rectified flow + KD", nfe=1,
                                   params=lambda r: r["reflow_kd_1"]["student"], sample=euler))

  def straightness(results, x_start):
    """Liu et al.'s S of the exact 1-RF (the teacher) and of the learned 2-RF, on x_start."""
    one = rectified_flow.straightness(functools.partial(teacher.apply, teacher.params), x_start,
                                      schedule=teacher.schedule, num_steps=c.straightness_steps)
    two = rectified_flow.straightness(functools.partial(flow_net.denoise,
                                                        results["reflow"]["student"]),
                                      x_start, schedule=rf, num_steps=c.straightness_steps)
    return {"straightness_1rf": float(one), "straightness_2rf": float(two)}

  return plan_lib.Plan(stages=stages, students=students, notes={"extra": straightness})
