"""Knowledge distillation (Luhman & Luhman 2021): a k-step student regresses the teacher's
sample of the same noise, one student per k in kd.nfes, each from the teacher copy.

Loss: `losses.kd.knowledge_distillation` on offline teacher pairs (`config.pairs`). Sampler: DDIM
with the student's k steps.
"""

from __future__ import annotations

from diffdistill.losses import kd
from diffdistill.methods import _common, plan as plan_lib

CONFIG = {"kd": dict(nfes=(1, 2, 4), num_steps=2000, spacing="logsnr", distance="l2")}
SETTINGS = {}
TESTBEDS = {}
TINY = {"kd.nfes": (1,), "kd.num_steps": 20}
QUICK = {"kd.num_steps": 1000}
EXTRA_COND = ()


def sampler(net, *, t_start: float, t_end: float, spacing: str = "logsnr"):
  """DDIM on the distilled denoiser with exactly nfe steps."""
  return _common.ddim_sampler(net, t_start=t_start, t_end=t_end, spacing=spacing)


def build(config, setup) -> plan_lib.Plan:
  c = config.kd
  _common.check_positive(c, "kd", ("num_steps",))
  net = _common.student_net(config, setup)
  stages: list[plan_lib.Stage] = []
  init = _common.initial_params(setup, stages, net)
  sample = sampler(net, t_start=setup.t_start, t_end=setup.t_end, spacing=c.spacing)
  students = []
  for k in c.nfes:
    method = kd.knowledge_distillation(net.denoise, schedule=net.schedule, num_steps=k,
                                       spacing=c.spacing, distance=c.distance,
                                       t_start=setup.t_start, t_end=setup.t_end)
    name = f"kd_{k}"
    stages.append(plan_lib.Stage(
        name=name, method=method, num_steps=c.num_steps,
        players=lambda r: {"student": plan_lib.make_player(
            config.optim, init(r), num_steps=c.num_steps, ema={"eval": config.eval_ema})},
        data=_common.pairs_data(config, setup)))
    students.append(plan_lib.Student(name="kd", nfe=k,
                                     params=lambda r, name=name: r[name]["student"], sample=sample))
  return plan_lib.Plan(stages=stages, students=students)
