"""TRACT (Berthelot et al. 2023): transitive-closure time distillation in phases; phase p's student
learns the teacher's DDIM over each of `segments[p]` segments (with an EMA self-teacher inside a
segment) and is phase p+1's teacher.

Loss: `losses.tract.tract`. The first phase distils the teacher itself. Sampler: DDIM with the
phase's segment count.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffdistill.losses import tract
from diffdistill.methods import _common, plan as plan_lib

CONFIG = {"tract": dict(teacher_steps=64, segments=(8, 1), steps_per_phase=3000, spacing="logsnr",
                        weighting="truncated_snr", self_teacher_decay=0.99)}
SETTINGS = {}
TESTBEDS = {"gmm64": {"tract.teacher_steps": 16, "tract.segments": (4, 1),
                      "tract.steps_per_phase": 1500}}
TINY = {"tract.teacher_steps": 4, "tract.segments": (2, 1), "tract.steps_per_phase": 20}
EXTRA_COND = ()


def sampler(net, *, t_start: float, t_end: float, spacing: str = "logsnr"):
  """DDIM on the distilled denoiser with exactly nfe steps."""
  return _common.ddim_sampler(net, t_start=t_start, t_end=t_end, spacing=spacing)


def build(config, setup) -> plan_lib.Plan:
  c = config.tract
  _common.check_positive(c, "tract", ("steps_per_phase", "teacher_steps"))
  net = _common.student_net(config, setup)
  stages: list[plan_lib.Stage] = []
  init = _common.initial_params(setup, stages, net)
  options = dict(schedule=net.schedule, spacing=c.spacing, weighting=c.weighting,
                 t_start=setup.t_start, t_end=setup.t_end, self_teacher_decay=c.self_teacher_decay)
  first_apply, first_params = _common.first_teacher(setup, net)
  first_method = tract.tract(net.denoise, first_apply, **options)
  method = tract.tract(net.denoise, net.denoise, **options)
  sample = sampler(net, t_start=setup.t_start, t_end=setup.t_end, spacing=c.spacing)
  students, previous, teacher_steps = [], None, c.teacher_steps
  for phase, segments in enumerate(c.segments):
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1 \
        or teacher_steps % segments:
      raise ValueError(f"tract.segments {tuple(c.segments)} must each be a positive integer "
                       f"dividing the previous phase's steps (first: tract.teacher_steps="
                       f"{c.teacher_steps}).")
    name = f"phase_{segments}"
    source = init if previous is None else (lambda r, p=previous: r[p]["student"])
    teacher = first_params if previous is None else source
    stages.append(plan_lib.Stage(
        name=name, method=first_method if previous is None else method,
        num_steps=c.steps_per_phase,
        players=lambda r, source=source: {"student": plan_lib.make_player(
            config.optim, source(r), num_steps=c.steps_per_phase,
            ema={"eval": config.eval_ema, "self_teacher": c.self_teacher_decay})},
        frozen=lambda r, teacher=teacher, t=teacher_steps, s=segments: {
            "teacher": teacher(r), "teacher_steps": jnp.int32(t), "num_segments": jnp.int32(s)},
        data=lambda r, d, k=phase: setup.data(config.seed + 20 + k)))
    students.append(plan_lib.Student(name="tract", nfe=segments,
                                     params=lambda r, name=name: r[name]["student"],
                                     sample=sample))
    previous, teacher_steps = name, segments
  return plan_lib.Plan(stages=stages, students=students)
