"""Easy consistency tuning (Geng et al. 2025): from the teacher copy, consistency between t and
r = t - gap with a continuous gap divided by `q` every `stage_steps`.

Loss: `losses.consistency.easy_consistency_tuning`. Sampler: multistep consistency sampling.
"""

from __future__ import annotations

from diffdistill.losses import consistency as cm
from diffdistill.methods import _common, _consistency

CONFIG = {**_consistency.SECTION,
          "ect": dict(num_steps=4000, stage_steps=1000, q=2.0, p_mean=-1.1, p_std=2.0,
                      distance="pseudo_huber")}  # ECT's code: the norm ||f - f-|| (c = 0)
SETTINGS = {}
# gmm64: q = 4 (the paper's ImageNet setting; gap 1/4 ... 1/256): one call 0.305 against q = 2's
# 0.343 over 3 seeds (docs/consistency.md, "ECT: the first stage was pure denoising")
TESTBEDS = {"digits": {"ect.num_steps": 800, "ect.stage_steps": 200, **_consistency.DIGITS},
            "gmm64": {"ect.q": 4.0}}
# `,full`: the same 4 stages, each 4x longer. One call on a mixture handed over as a file:
# 0.237 +- 0.001 (3 seeds), 0.47x its DDIM; 4000 steps give 0.67x (docs/consistency.md)
FULL = {"gmm64": {"ect.num_steps": 16000, "ect.stage_steps": 4000}}
TINY = {"ect.num_steps": 20, "ect.stage_steps": 5}
EXTRA_COND = ()
CONDITIONAL = True  # its losses read batch["label"], its sampler passes the label on


def sampler(net, *, t_start: float, t_end: float, mid_sigma: float = 0.8):
  """Multistep consistency sampling (nfe 1 or 2; re-noised at sigma/alpha = mid_sigma)."""
  return _consistency.consistency_sampler("ect", net, t_start=t_start, t_end=t_end,
                                          mid_sigma=mid_sigma)


def build(config, setup):
  c = config.ect
  _common.check_positive(c, "ect", ("num_steps", "stage_steps"))
  net, stages, init = _consistency.setup_student(config, setup)
  f = cm.consistency_function(net.denoise, schedule=net.schedule, t_min=setup.t_end)
  method = cm.easy_consistency_tuning(f, schedule=net.schedule, stage_steps=c.stage_steps, q=c.q,
                                      p_mean=c.p_mean, p_std=c.p_std, distance=c.distance)
  return _consistency.consistency_plan("ect", config, setup, net, stages, method, c.num_steps,
                                       init)
