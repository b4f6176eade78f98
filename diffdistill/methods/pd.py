"""Progressive distillation (Salimans & Ho 2022): rounds N = teacher_steps / 2, ..., 1, each
student learning two of its teacher's DDIM steps in one; round N's teacher is round 2N's student.

Loss: `losses.progressive.progressive_distillation`. The first round distils the teacher itself
(the exact denoiser for an analytic teacher, not its network copy); the student starts from the
copy (or the trained teacher's weights). Sampler: DDIM with the round's N steps.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffdistill.losses import progressive
from diffdistill.methods import _common, plan as plan_lib

CONFIG = {"pd": dict(teacher_steps=64, steps_per_round=1500, spacing="logsnr",
                     weighting="truncated_snr", eval_steps=(8, 4, 2, 1))}
SETTINGS = {}
TESTBEDS = {"gmm64": {"pd.teacher_steps": 16},
            "digits": {"pd.teacher_steps": 16, "pd.steps_per_round": 500, "pd.eval_steps": (8, 4)}}
TINY = {"pd.teacher_steps": 4, "pd.steps_per_round": 20, "pd.eval_steps": (2, 1)}
QUICK = {"pd.teacher_steps": 32, "pd.steps_per_round": 600, "pd.eval_steps": (4, 2, 1)}
EXTRA_COND = ()
CONDITIONAL = True  # its losses read batch["label"], its sampler passes the label on


def sampler(net, *, t_start: float, t_end: float, spacing: str = "logsnr"):
  """DDIM on the distilled denoiser with exactly nfe steps (any nfe >= 1)."""
  return _common.ddim_sampler(net, t_start=t_start, t_end=t_end, spacing=spacing)


def rounds(teacher_steps: int, name: str = "pd") -> list[int]:
  """The student step counts N = teacher_steps / 2, ..., 1 (teacher_steps a power of two)."""
  if (isinstance(teacher_steps, bool) or not isinstance(teacher_steps, int) or teacher_steps < 2
      or teacher_steps & (teacher_steps - 1)):
    raise ValueError(f"{name}.teacher_steps must be a power of two >= 2, got {teacher_steps!r}.")
  out, n = [], teacher_steps // 2
  while n >= 1:
    out.append(n)
    n //= 2
  return out


def build(config, setup) -> plan_lib.Plan:
  return build_rounds(config, setup, "pd", progressive.progressive_distillation)


def build_rounds(config, setup, name: str, make_method, *, frozen=None) -> plan_lib.Plan:
  """The rounds of config[name] (teacher_steps, steps_per_round, spacing, weighting,
  eval_steps): make_method(student, teacher, **options) -> Method per round, with frozen inputs
  teacher, num_steps and `frozen(results)`'s."""
  c = config[name]
  _common.check_positive(c, name, ("steps_per_round",))
  steps = rounds(c.teacher_steps, name)
  bad = sorted(set(c.eval_steps) - set(steps))
  if bad or not c.eval_steps:
    raise ValueError(f"{name}.eval_steps must be a non-empty subset of the rounds' step counts "
                     f"{steps} ({name}.teacher_steps={c.teacher_steps}), got {tuple(c.eval_steps)}.")
  net = _common.student_net(config, setup)
  stages: list[plan_lib.Stage] = []
  init = _common.initial_params(setup, stages, net)
  options = dict(schedule=net.schedule, spacing=c.spacing, weighting=c.weighting,
                 t_start=setup.t_start, t_end=setup.t_end)
  first_apply, first_params = _common.first_teacher(setup, net)
  first_method = make_method(net.denoise, first_apply, **options)
  method = make_method(net.denoise, net.denoise, **options)
  sample = sampler(net, t_start=setup.t_start, t_end=setup.t_end, spacing=c.spacing)
  extra = frozen or (lambda r: {})
  students, previous = [], None
  for round_index, n in enumerate(steps):
    stage = f"round_{n}"
    source = init if previous is None else (lambda r, p=previous: r[p]["student"])
    teacher = first_params if previous is None else source
    stages.append(plan_lib.Stage(
        name=stage, method=first_method if previous is None else method,
        num_steps=c.steps_per_round,
        players=lambda r, source=source: {"student": plan_lib.make_player(
            config.optim, source(r), num_steps=c.steps_per_round, ema={"eval": config.eval_ema})},
        frozen=lambda r, teacher=teacher, n=n: {"teacher": teacher(r), "num_steps": jnp.int32(n),
                                                **extra(r)},
        data=lambda r, d, k=round_index: setup.data(config.seed + 10 + k)))
    if n in c.eval_steps:
      students.append(plan_lib.Student(name=name, nfe=n,
                                       params=lambda r, stage=stage: r[stage]["student"],
                                       sample=sample))
    previous = stage
  return plan_lib.Plan(stages=stages, students=students)
