"""Continuous-time consistency distillation, sCD (Lu & Song 2025), on a TrigFlow teacher: the
student's flow network (plus a log-variance head for the adaptive weight) is trained with the
jvp tangent of the consistency function, with tangent normalization and warm-up.

Loss: `losses.scm.scm`. Sampler: sCM's (re-noising at t_mid, TrigFlow time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import scm
from diffdistill.methods import _common, _consistency, plan as plan_lib

CONFIG = {**_consistency.SECTION,
          "scd": dict(num_steps=4000, p_mean=-1.0, p_std=1.4, tangent_normalization=0.1,
                      warmup_steps=1000, logvar_features=16, t_mid=1.1)}
SETTINGS = {"teacher.schedule": "trigflow", "teacher.schedule_kwargs": dict(sigma_data=0.5),
            "student.kind": "flow",
            # the tangent differentiates the net in t: the default positional scale 1000 makes
            # du/dt (and ||g||) ~1e3 (Lu & Song 2025, Sec. 4.1: keep the time embedding's
            # frequencies low)
            "student.kwargs.embedding_scale": 10.0}
TESTBEDS = {"digits": {"scd.num_steps": 800, **_consistency.DIGITS}}
TINY = {"scd.num_steps": 20, "scd.warmup_steps": 5}
EXTRA_COND = ()
CONDITIONAL = True  # its losses read batch["label"], its sampler passes the label on


def sampler(net, *, t_start: float, t_end: float, t_mid: float = 1.1):
  """sCM sampling of the flow network `net` (TrigFlow), nfe 1 or 2 (re-noised at t_mid); the
  last state's noise carries on to t_end (a DDIM step from t = 0 data to t_end), since sCM's f
  maps to t = 0 and the reference is the flow map to t_end."""
  schedule = net.schedule
  f = scm.consistency_function(net.apply)

  def sample(params, x, *, nfe, rng=None, **cond):
    ts = _consistency.times("scd", nfe, t_start, t_mid)
    rng = jax.random.key(0) if rng is None else rng
    b = x.shape[0]
    x0 = t_in = None  # set by the first iteration, read from the second on
    for i, t in enumerate(ts):
      if i:
        z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        x = jnp.cos(t) * x0 + jnp.sin(t) * schedule.sigma_data * z
      t_in = t
      x0 = f(params, x, jnp.full((b,), t, x.dtype), **cond)
    eps = (x - jnp.cos(t_in) * x0) / (schedule.sigma_data * jnp.sin(t_in))
    return schedule.alpha(jnp.float32(t_end)) * x0 + schedule.sigma(jnp.float32(t_end)) * eps

  return sample


def build(config, setup):
  c, cc = config.scd, config.consistency
  _common.check_positive(c, "scd", ("num_steps",))
  schedule = setup.teacher.schedule
  if not isinstance(schedule, schedules_lib.TrigFlow) or config.student.kind != "flow":
    raise ValueError("scd needs config.teacher.schedule='trigflow' and config.student.kind='flow'.")
  net, stages, init = _consistency.setup_student(config, setup)
  method = scm.scm(net.apply, setup.teacher.apply, schedule=schedule, p_mean=c.p_mean,
                   p_std=c.p_std, tangent_normalization=c.tangent_normalization or None,
                   warmup_steps=c.warmup_steps, adaptive_weighting=True)
  stages.append(_common.single_stage(
      config, setup, "scd", method, c.num_steps, init,
      params=lambda r: {"net": init(r), "logvar": scm.logvar_init(c.logvar_features)}))
  sample = sampler(net, t_start=setup.t_start, t_end=setup.t_end, t_mid=c.t_mid)
  students = [plan_lib.Student(name="scd", nfe=k, params=lambda r: r["scd"]["student"]["net"],
                               sample=sample) for k in cc.nfes]
  return plan_lib.Plan(stages=stages, students=students)
