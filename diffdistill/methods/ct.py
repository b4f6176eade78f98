"""Consistency training (Song et al. 2023): consistency between adjacent noise levels of the same
data point, with the N(k) and mu(k) curricula and an EMA target; no teacher calls.

Loss: `losses.consistency.consistency_training`. Sampler: multistep consistency sampling.
"""

from __future__ import annotations

import functools

from diffdistill.losses import consistency as cm
from diffdistill.methods import _common, _consistency

CONFIG = {**_consistency.SECTION,
          "ct": dict(num_steps=6000, s0=2, s1=150, mu0=0.9, distance="l2")}
SETTINGS = {}
TESTBEDS = {"digits": {"ct.num_steps": 800, **_consistency.DIGITS}}
# `,full`: 4x the steps, the paper's EMA target kept. One call 0.253 on gmm64 (0.495x its DDIM, one
# seed) and 0.241 +- 0.000 on a mixture handed over as a file (0.48x, 3 seeds); 6000 steps: 0.508,
# DDIM's level; 16x: 0.147 (one seed; docs/consistency.md, "The curve to 16x the steps")
FULL = {"gmm64": {"ct.num_steps": 24000}}
TINY = {"ct.num_steps": 20}
EXTRA_COND = ()
CONDITIONAL = True  # its losses read batch["label"], its sampler passes the label on


def sampler(net, *, t_start: float, t_end: float, mid_sigma: float = 0.8):
  """Multistep consistency sampling (nfe 1 or 2; re-noised at sigma/alpha = mid_sigma)."""
  return _consistency.consistency_sampler("ct", net, t_start=t_start, t_end=t_end,
                                          mid_sigma=mid_sigma)


def build(config, setup):
  c, cc = config.ct, config.consistency
  _common.check_positive(c, "ct", ("num_steps",))
  net, stages, init = _consistency.setup_student(config, setup)
  f = cm.consistency_function(net.denoise, schedule=net.schedule, t_min=setup.t_end)
  n_fn = functools.partial(cm.ct_num_steps, total_steps=c.num_steps, s0=c.s0, s1=c.s1)
  method = cm.consistency_training(
      f, ema_target=True, schedule=net.schedule, num_steps=n_fn, spacing=cc.spacing,
      distance=c.distance, t_start=setup.t_start, t_end=setup.t_end)
  return _consistency.consistency_plan(
      "ct", config, setup, net, stages, method, c.num_steps, init,
      ema={"target": cm.ct_mu(total_steps=c.num_steps, mu0=c.mu0, s0=c.s0, s1=c.s1)})
