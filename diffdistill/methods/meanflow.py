"""MeanFlow (Geng et al. 2025) distilled from a rectified-flow teacher: the average velocity
u(z, r, t) over [r, t], trained by the MeanFlow identity with a jvp, on the teacher's velocity.

Loss: `losses.meanflow.meanflow`. The student is the copy's network with an extra input r
(zero-initialized). Sampler: z <- z - (t - r) u(z, r, t) over 1 or 2 jumps.
"""

from __future__ import annotations

import jax

from diffdistill import nets
from diffdistill import schedules as schedules_lib
from diffdistill.losses import meanflow as mf
from diffdistill.methods import _common, _consistency, plan as plan_lib

CONFIG = {**_consistency.SECTION,
          "meanflow": dict(num_steps=5000, p_mean=-0.4, p_std=1.0, ratio_r_neq_t=0.25,
                           adaptive_p=1.0, teacher_velocity=True, t_mid=0.5)}
SETTINGS = {"teacher.schedule": "rectified_flow",
            "teacher.schedule_kwargs": dict(t_min=1e-3, t_max=1.0),
            "student.kind": "flow",
            "copy.time_sampler": "uniform"}  # logsnr(t_max = 1) = -inf: no logSNR-uniform draw
# every built-in testbed: (t, r) drawn wider and r != t for 3/4 of the batch, with p = 1/2, so
# the one-call jump (r, t) = (t_min, 1) is trained at all (docs/consistency.md, "MeanFlow's (t, r)
# sampler"). One call, this against the paper's recipe: gmm64 coupling 0.324 / 0.557 (DDIM
# 0.518), ring2d 0.131 / 0.549 (DDIM 0.709), digits FD-digits 444 / 863 (DDIM 825; two calls 68 /
# 142). The loss's defaults, and `import` (real models), stay the paper's.
WIDE = {"meanflow.adaptive_p": 0.5, "meanflow.ratio_r_neq_t": 0.75, "meanflow.p_std": 2.0}
TESTBEDS = {"digits": {"meanflow.num_steps": 800, **_consistency.DIGITS, **WIDE},
            "gmm64": WIDE, "ring2d": WIDE}
# `,full`: 4x the steps. One call on a mixture handed over as a file: 0.222 +- 0.012 (3 seeds),
# 0.44x its DDIM; 5000 steps give 0.61x (docs/consistency.md, "The bar ... at 4x the steps")
# Past 4x the steps, lower the rate (--config.optim.learning_rate=1.25e-4, a quarter): at 5e-4 a
# 16x run's MeanFlow residual climbs instead of settling and its one call stalls (gmm64 0.258 at
# 16x, 0.135 +- 0.006 at the quarter rate (3 seeds); ring2d 0.115 +- 0.064 against 0.065 +- 0.017;
# docs/consistency.md, "The curve to 16x the steps")
FULL = {"gmm64": {"meanflow.num_steps": 20000}}
TINY = {"meanflow.num_steps": 20}
EXTRA_COND = ("r",)
CONDITIONAL = True  # the loss reads batch["label"] (student and teacher), the sampler passes it on


def sampler(net, *, t_start: float, t_end: float, t_mid: float = 0.5):
  """k-jump MeanFlow sampling of u = net.apply(params, z, t, r=r): nfe 1 (t_start -> t_end) or
  2 (through t_mid)."""
  def sample(params, x, *, nfe, rng=None, **cond):
    del rng  # deterministic
    plan_lib.check_nfe("meanflow", nfe, (1, 2))
    times = [t_start, t_end] if nfe == 1 else [t_start, t_mid, t_end]
    return mf.meanflow_sample(net.apply, params, x, times=times, **cond)
  return sample


def build(config, setup):
  c, cc = config.meanflow, config.consistency
  _common.check_positive(c, "meanflow", ("num_steps",))
  schedule = setup.teacher.schedule
  if not isinstance(schedule, schedules_lib.RectifiedFlow) or config.student.kind != "flow":
    raise ValueError("meanflow needs config.teacher.schedule='rectified_flow' and "
                     "config.student.kind='flow'.")
  net, stages, init = _consistency.setup_student(config, setup)
  u_net = _common.extra_input_net(config, setup, net, EXTRA_COND)
  fresh = u_net.init(jax.random.key(config.seed + 3))
  method = mf.meanflow(u_net.apply, setup.teacher.apply if c.teacher_velocity else None,
                       schedule=schedule, p_mean=c.p_mean, p_std=c.p_std,
                       ratio_r_neq_t=c.ratio_r_neq_t, adaptive_p=c.adaptive_p)
  stages.append(_common.single_stage(config, setup, "meanflow", method, c.num_steps, init,
                                     params=lambda r: nets.init_from(fresh, init(r)),
                                     frozen=c.teacher_velocity))
  sample = sampler(u_net, t_start=setup.t_start, t_end=setup.t_end, t_mid=c.t_mid)
  students = [plan_lib.Student(name="meanflow", nfe=k, params=lambda r: r["meanflow"]["student"],
                               sample=sample) for k in cc.nfes]
  return plan_lib.Plan(stages=stages, students=students)
