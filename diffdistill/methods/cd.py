"""Consistency distillation (Song et al. 2023): f(x_{t_{n+1}}) regresses the EMA target's
f at the teacher's one-step (Heun or DDIM) estimate of x_{t_n}, on N intervals.

Loss: `losses.consistency.consistency_distillation`. Sampler: multistep consistency sampling.
"""

from __future__ import annotations

from diffdistill.losses import consistency as cm
from diffdistill.methods import _common, _consistency

CONFIG = {**_consistency.SECTION,
          "cd": dict(num_steps=4000, num_intervals=32, solver="heun", mu=0.95, distance="l2")}
SETTINGS = {}
TESTBEDS = {"digits": {"cd.num_steps": 800, **_consistency.DIGITS}}
TINY = {"cd.num_steps": 20, "cd.num_intervals": 4}
EXTRA_COND = ()
CONDITIONAL = True  # its losses read batch["label"], its sampler passes the label on


def sampler(net, *, t_start: float, t_end: float, mid_sigma: float = 0.8):
  """Multistep consistency sampling (nfe 1 or 2; re-noised at sigma/alpha = mid_sigma)."""
  return _consistency.consistency_sampler("cd", net, t_start=t_start, t_end=t_end,
                                          mid_sigma=mid_sigma)


def build(config, setup):
  c, cc = config.cd, config.consistency
  _common.check_positive(c, "cd", ("num_steps", "num_intervals"))
  step = _consistency.solver_step("cd", c.solver)
  net, stages, init = _consistency.setup_student(config, setup)
  f = cm.consistency_function(net.denoise, schedule=net.schedule, t_min=setup.t_end)
  method = cm.consistency_distillation(
      f, setup.teacher.apply, ema_target=c.mu > 0, schedule=net.schedule, solver_step=step,
      num_steps=c.num_intervals, spacing=cc.spacing, distance=c.distance, t_start=setup.t_start,
      t_end=setup.t_end)
  return _consistency.consistency_plan("cd", config, setup, net, stages, method, c.num_steps, init,
                                       ema={"target": c.mu} if c.mu > 0 else None)
