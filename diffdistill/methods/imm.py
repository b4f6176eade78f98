"""Inductive moment matching (Zhou, Ermon & Song 2025): a flow map f(x_t; s, t) from the copy (its
s input zero-initialized), trained in one stage on data by a group-wise MMD between its t -> s
jumps and its own (stop-gradient) r -> s jumps; no teacher in the loss.

Loss: `losses.imm.imm` (groups of `imm.group_size` consecutive examples: `Update.group_size`).
Sampler: pushforward x <- f(x; t_{i+1}, t_i), 1 call to the end or 2 through sigma/alpha =
consistency.mid_sigma (more: the consistency.spacing grid).
"""

from __future__ import annotations

import jax

from diffdistill import nets, solvers
from diffdistill.losses import imm as imm_lib
from diffdistill.methods import _common, _consistency, plan as plan_lib

# k: r(s, t)'s decrement (eta_max - eta_min) / 2^k; estimator "u" (distinct pairs) or "v";
# mu > 0: an EMA target instead of the stop-gradient student (the paper: none)
CONFIG = {**_consistency.SECTION,
          "imm": dict(num_steps=4000, group_size=4, k=12.0, estimator="u", weight_a=2.0,
                      weight_b=4.0, weighting=True, time_sampler="uniform", mu=0.0,
                      kernel_scale=1.0)}
SETTINGS = {}
# gmm64 at 4000 steps (experiments/distill/README.md, the IMM sweep): a larger eta step
# (k = 6 against the default 12), a kernel 8x shorter than the paper's 1 / (|c_out| D), w = 1
# (the paper's weighting, alpha_t^2-weighted, starves the long jumps from t ~ 1), and the V
# statistic over groups of 16: the U statistic plus a pull of each particle to its own target of
# weight 2 / (M - 1), which keeps one call's mode weights (TV 0.21 -> 0.10, 3 seeds)
TESTBEDS = {"digits": "imm needs a student network with an s input (the MLP): the digits "
                      "teacher's U-Net has no s input yet; imm runs on ring2d and gmm64.",
            "gmm64": {"imm.k": 6.0, "imm.kernel_scale": 8.0, "imm.weighting": False,
                      "imm.estimator": "v", "imm.group_size": 16}}
TINY = {"imm.num_steps": 20}
EXTRA_COND = ("s",)


def sampler(net, *, t_start: float, t_end: float, mid_sigma: float = 0.8,
            spacing: str = "karras"):
  """Pushforward sampling of f = DDIM(x, net.denoise(params, x, t, s=s), s, t) with nfe calls."""
  f = imm_lib.flow_map_of(net.denoise, schedule=net.schedule)
  t_mid = _consistency.mid_time(net.schedule, mid_sigma)

  def sample(params, x, *, nfe, rng=None, **cond):
    del rng  # deterministic
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
      raise ValueError(f"imm's sampler takes an integer nfe >= 1, got {nfe!r}.")
    if nfe <= 2:
      times = [t_start, t_end] if nfe == 1 else [t_start, t_mid, t_end]
    else:
      times = solvers.time_grid(net.schedule, nfe, spacing=spacing, t_start=t_start, t_end=t_end)
    return imm_lib.pushforward_sample(f, params, x, times=times, **cond)
  return sample


def build(config, setup):
  c, cc = config.imm, config.consistency
  _common.check_positive(c, "imm", ("num_steps", "group_size"))
  if setup.teacher.module is not None:
    raise ValueError(TESTBEDS["digits"])
  net, stages, init = _consistency.setup_student(config, setup)
  f_net = _common.make_net(config, net.schedule, setup.teacher.example_shape,
                           extra_cond=EXTRA_COND)
  fresh = f_net.init(jax.random.key(config.seed + 5))
  try:
    method = imm_lib.imm(imm_lib.flow_map_of(f_net.denoise, schedule=net.schedule),
                         group_size=c.group_size, ema_target=c.mu > 0, schedule=net.schedule,
                         k=c.k, t_start=setup.t_start, t_end=setup.t_end,
                         time_sampler=c.time_sampler, estimator=c.estimator,
                         weight_a=c.weight_a, weight_b=c.weight_b, weighting_on=c.weighting,
                         kernel_scale=c.kernel_scale)
  except ValueError as e:
    raise ValueError(f"config.imm: {e}") from None
  stages.append(_common.single_stage(config, setup, "imm", method, c.num_steps, init,
                                     ema={"target": c.mu} if c.mu > 0 else None,
                                     params=lambda r: nets.init_from(fresh, init(r)),
                                     frozen=False))
  sample = sampler(f_net, t_start=setup.t_start, t_end=setup.t_end, mid_sigma=cc.mid_sigma,
                   spacing=cc.spacing)
  students = [plan_lib.Student(name="imm", nfe=k, params=lambda r: r["imm"]["student"],
                               sample=sample) for k in cc.nfes]
  return plan_lib.Plan(stages=stages, students=students)
