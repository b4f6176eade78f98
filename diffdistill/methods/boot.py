"""BOOT (Gu et al. 2023): data-free distillation; a student g(x_T, t) of the state at time t
bootstraps along the teacher's steps from prior noise alone, then maps x_T to data in one call.

Loss: `losses.boot.boot`. The student is the network used raw as a signal prediction ('x0').
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from diffdistill.data import PriorNoise
from diffdistill.losses import boot
from diffdistill.methods import _common, plan as plan_lib

CONFIG = {"boot": dict(num_steps=6000, grid_steps=32, spacing="logsnr", step="heun",
                       weighting="uniform")}
SETTINGS = {}
TESTBEDS = {"gmm64": {"boot.num_steps": 4000}}
TINY = {"boot.num_steps": 20, "boot.grid_steps": 4}
EXTRA_COND = ()


def sampler(net, *, t_start: float, t_end: float):
  """One call: the student's state at t_end from x_T (nfe 1 only). `net` is g, read as 'x0'."""
  def sample(params, x, *, nfe, rng=None, **cond):
    del rng
    plan_lib.check_nfe("boot", nfe, (1,))
    plan_lib.check_unconditional("boot", cond)
    return boot.boot_state(net.denoise, params, x, t_end, schedule=net.schedule, t_start=t_start)
  return sample


def build(config, setup) -> plan_lib.Plan:
  c = config.boot
  _common.check_positive(c, "boot", ("num_steps", "grid_steps"))
  net = _common.student_net(config, setup)
  stages: list[plan_lib.Stage] = []
  init = _common.initial_params(setup, stages, net)
  # g predicts the signal like a data prediction, so the student network is used raw ('x0')
  g_net = dataclasses.replace(net, kind="x0")
  method = boot.boot(g_net.denoise, setup.teacher.apply, schedule=net.schedule, spacing=c.spacing,
                     step=c.step, weighting=c.weighting, t_start=setup.t_start, t_end=setup.t_end)
  scale = float(net.schedule.sigma(jnp.float32(setup.t_start)))
  stages.append(plan_lib.Stage(
      name="boot", method=method, num_steps=c.num_steps,
      players=lambda r: {"student": plan_lib.make_player(
          config.optim, init(r), num_steps=c.num_steps, ema={"eval": config.eval_ema})},
      frozen=lambda r: {"teacher": setup.teacher.params, "num_steps": jnp.int32(c.grid_steps)},
      data=lambda r, d: PriorNoise(scale, setup.teacher.example_shape, config.batch_size,
                                   config.seed + 30)))
  students = [plan_lib.Student(name="boot", nfe=1, params=lambda r: r["boot"]["student"],
                               sample=sampler(g_net, t_start=setup.t_start, t_end=setup.t_end))]
  return plan_lib.Plan(stages=stages, students=students)
