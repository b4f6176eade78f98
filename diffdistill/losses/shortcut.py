"""Shortcut models (Frans et al. 2025): one network for the jump of the flow over any step d.

On the rectified-flow path x_t = (1 - t) x0 + t eps (`schedules.RectifiedFlow`: t = 1 is noise,
sampling runs t downwards) the velocity is v = dx/dt = eps - x0 (the 'flow' output), and the
shortcut s(x_t, t, d) is the average velocity over the step from t down to t - d:

    x_{t-d} = x_t - d s(x_t, t, d),      s(x_t, t, 0) = v(x_t, t)  (the instantaneous velocity).

A network s_theta(x, t, d=d) (a 'flow' net conditioned on d: `nets` extra_cond=("d",),
zero-initialized, so a copy of the flow network starts as s(., ., d) = v for every d) is trained
on two parts of each batch:

  flow matching (a fraction 1 - bootstrap_fraction), t on the grid {1/M, 2/M, ..., 1}:
    L_FM = ||s_theta(x_t, t, 0) - v||^2,   v = eps - x0 (data) or the teacher's (x_t - D(x_t, t))/t
  self-consistency (the rest), D = 2d in {1, 1/2, ..., 2/M} in equal shares,
  t uniform on {D, 2D, ..., 1} (so t - D >= 0):
    s1 = s_theta-(x_t, t, d'),   x' = x_t - d s1,   s2 = s_theta-(x', t - d, d')
    L_SC = ||s_theta(x_t, t, D) - sg((s1 + s2) / 2)||^2
  with d' = d, except at the smallest step d = 1/M, which is queried at d' = 0 (the flow: the
  model is never asked for an untrained 1/M shortcut), and theta- the EMA "target" copy
  (the paper's bootstrap_ema; or the stop-gradient online params). The loss is the batch mean of
  the per-example squared errors (each part weighted by its share of the batch).

The exact shortcut composes exactly: if s(., ., d) is the exact d-jump of the probability-flow
ODE, the self-consistency target is the exact 2d-jump (tests/test_shortcut.py checks this on
Gaussian data against `analytic.gaussian_flow_map`). Sampling with k = 1/d steps (a power of two)
from t = 1: x <- x - d s(x, t, d), t <- t - d, exactly k network calls.

Options as in the paper: M = 128 base steps, bootstrap_fraction = 1/4 (the official code's
default `bootstrap_every = 8` is 1/8), EMA 0.999 for the target. The official code also clips x'
and the target to [-4, 4]; here nothing is clipped (the clip depends on the data's scale).

References:
  Frans, Hafner, Levine & Abbeel, One Step Diffusion via Shortcut Models, ICLR 2025 (Sec. 3,
  Eq. 5-6; github.com/kvfrans/shortcut-models, targets_shortcut.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import _common
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]


def _check_steps(num_base_steps: int, name: str = "num_base_steps") -> int:
  if (isinstance(num_base_steps, bool) or not isinstance(num_base_steps, int)
      or num_base_steps < 1 or num_base_steps & (num_base_steps - 1)):
    raise ValueError(f"{name} must be a power of two >= 1, got {num_base_steps!r}.")
  return num_base_steps


def sample_self_consistency(rng: Array, b: int, *, num_base_steps: int,
                            dtype=jnp.float32) -> tuple[Array, Array, Array]:
  """(t, D, d_query), each [B]: D = 2^-j with j = i mod log2(M) (equal shares of 1 ... 2/M),
  t uniform on {D, 2D, ..., 1}, d_query = D/2, or 0 at the smallest level (D = 2/M)."""
  levels = int(math.log2(_check_steps(num_base_steps)))
  if levels < 1:
    raise ValueError(f"self-consistency needs num_base_steps >= 2, got {num_base_steps}.")
  j = jnp.arange(b) % levels
  big = jnp.exp2(-j.astype(dtype))  # D, exact powers of two
  n = jnp.exp2(j.astype(dtype))     # 1 / D grid positions
  i = jnp.minimum(jnp.floor(jax.random.uniform(rng, (b,), dtype) * n), n - 1)
  t = big * (i + 1)
  d_query = jnp.where(j == levels - 1, 0.0, big / 2).astype(dtype)
  return t, big, d_query


def shortcut_loss(s_apply: Apply, teacher: Apply | None = None, *,
                  schedule: schedules_lib.RectifiedFlow | None = None,
                  bootstrap_fraction: float = 0.25,
                  num_base_steps: int = 128) -> Callable[..., tuple[Array, dict]]:
  """The shortcut-model loss (module docstring).

  Args:
    s_apply: the shortcut network s(params, x, t, d=d, **cond) (flow output on RF).
    teacher: a denoiser on the same rectified-flow schedule whose velocity (x_t - D)/t replaces
      eps - x0 in the flow-matching part (distillation); None trains from data.
    schedule: the RectifiedFlow (default RectifiedFlow(t_max=1.0)); t_max must be 1 (the step
      grid ends at pure noise) and t_min <= 1/M.
    bootstrap_fraction: the share of the batch (its first examples) given self-consistency
      targets, in [0, 1] (the paper's 1/4).
    num_base_steps: M, a power of two: the smallest step is 1/M, the flow-matching times are the
      multiples of 1/M, and the trained steps D are 2/M, ..., 1 (the paper's 128).

  Returns:
    loss_fn(params, batch, rng, *, target_params[, teacher_params]) -> (loss, aux); aux: fm_l2 and
    sc_l2 (mean squared error per dimension of each part), sc_one_step_l2 (the same at D = 1),
    nonfinite.
  """
  schedule = schedule or schedules_lib.RectifiedFlow(t_max=1.0)
  if not isinstance(schedule, schedules_lib.RectifiedFlow):
    raise ValueError(f"shortcut_loss needs a RectifiedFlow schedule, got {schedule}.")
  m = _check_steps(num_base_steps)
  if schedule.t_max != 1.0 or schedule.t_min > 1.0 / m:
    raise ValueError(f"shortcut_loss needs schedule.t_max = 1 and t_min <= 1/num_base_steps = "
                     f"{1.0 / m}, got t_min={schedule.t_min}, t_max={schedule.t_max}.")
  if not 0.0 <= bootstrap_fraction <= 1.0:
    raise ValueError(f"bootstrap_fraction must lie in [0, 1], got {bootstrap_fraction}.")
  if bootstrap_fraction > 0 and m < 2:
    raise ValueError("bootstrap_fraction > 0 needs num_base_steps >= 2 (the smallest trained "
                     f"shortcut is 2/M), got {m}.")

  def loss_fn(params: Any, batch, rng: Array, *, target_params: Any, teacher_params: Any = None):
    if (teacher is None) != (teacher_params is None):
      raise ValueError("shortcut distillation needs teacher_params (and a teacher); training "
                       "from data takes neither.")
    x = _common.data(batch)
    b = x.shape[0]
    n_sc = int(round(b * bootstrap_fraction))  # static: the batch shape is
    cond = _common.condition(batch)
    t_rng, s_rng, e_rng = jax.random.split(rng, 3)
    eps = jax.random.normal(e_rng, x.shape, x.dtype)
    dim = x[0].size
    errs, aux = [], {}

    if n_sc < b:  # flow matching at d = 0
      x0, e = x[n_sc:], eps[n_sc:]
      c = jax.tree.map(lambda a: a[n_sc:], cond)
      t = jax.random.randint(t_rng, (b - n_sc,), 1, m + 1).astype(x.dtype) / m
      xt = (1.0 - schedules_lib.broadcast_to(t, x0)) * x0 + schedules_lib.broadcast_to(t, x0) * e
      if teacher is None:
        v = e - x0
      else:
        v = jax.lax.stop_gradient((xt - teacher(teacher_params, xt, t, **c))
                                  / schedules_lib.broadcast_to(t, x0))
      s = s_apply(params, xt, t, d=jnp.zeros_like(t), **c)
      err = jnp.sum(jnp.square(s - v).reshape(b - n_sc, -1), axis=1)  # [B - n_sc]
      errs.append(err)
      aux["fm_l2"] = jnp.mean(err) / dim

    if n_sc:  # self-consistency: one step of D = 2d against two steps of d from the target
      x0, e = x[:n_sc], eps[:n_sc]
      c = jax.tree.map(lambda a: a[:n_sc], cond)
      t, big, d_query = sample_self_consistency(s_rng, n_sc, num_base_steps=m, dtype=x.dtype)
      d = big / 2
      xt = (1.0 - schedules_lib.broadcast_to(t, x0)) * x0 + schedules_lib.broadcast_to(t, x0) * e
      s1 = s_apply(target_params, xt, t, d=d_query, **c)
      # t runs downwards: the step to t - d subtracts d s
      x_mid = xt - schedules_lib.broadcast_to(d, x0) * s1
      s2 = s_apply(target_params, x_mid, t - d, d=d_query, **c)
      target = jax.lax.stop_gradient((s1 + s2) / 2)
      s = s_apply(params, xt, t, d=big, **c)
      err = jnp.sum(jnp.square(s - target).reshape(n_sc, -1), axis=1)  # [n_sc]
      errs.append(err)
      one = (big == 1.0).astype(x.dtype)
      aux["sc_l2"] = jnp.mean(err) / dim
      aux["sc_one_step_l2"] = jnp.sum(one * err) / jnp.maximum(jnp.sum(one), 1.0) / dim

    terms = jnp.concatenate(errs)  # [B]
    aux["nonfinite"] = jnp.sum(~jnp.isfinite(terms))
    return jnp.mean(terms), aux

  return loss_fn


def shortcut(s_apply: Apply, teacher: Apply | None = None, *, ema_target: bool = True,
             ema_decay: float = 0.999, **options) -> Method:
  """Shortcut models as a method: the bootstrap target from the student's EMA "target" copy
  (decay `ema_decay`), or (ema_target=False) its own stop-gradient params; frozen `teacher`
  when distilling. `options` go to `shortcut_loss`."""
  inputs = {"target_params": ("players/student/ema/target" if ema_target
                              else "players/student/params")}
  if teacher is not None:
    inputs["teacher_params"] = "frozen/teacher"
  return Method(name="shortcut", updates=(Update(
      player="student", loss_fn=shortcut_loss(s_apply, teacher, **options), inputs=inputs),),
                ema={"student": {"target": ema_decay}} if ema_target else {})


def shortcut_sample(s_apply: Apply, params: Any, x: Array, *, num_steps: int,
                    t_end: float = 0.0, **cond) -> Array:
  """k-step sampling from t = 1 with d = 1/k: x <- x - d s(x, t, d), t = 1, 1 - d, ..., d.

  Exactly k = num_steps (a power of two) network calls. The last step is shortened to end at
  t_end instead of 0 (its shortcut s(x, d, d) used over d - t_end: an O(t_end) change, for a
  reference that ends at the schedule's t_min > 0).
  """
  k = _check_steps(num_steps, "num_steps")
  d = 1.0 / k
  if not 0.0 <= t_end < d:
    raise ValueError(f"t_end must lie in [0, 1/num_steps) = [0, {d}), got {t_end}.")
  b = x.shape[0]
  dd = jnp.full((b,), d, x.dtype)
  for i in range(k):
    t = 1.0 - i * d
    h = d if i < k - 1 else d - t_end
    x = x - h * s_apply(params, x, jnp.full((b,), t, x.dtype), d=dd, **cond)
  return x


__all__ = ["sample_self_consistency", "shortcut_loss", "shortcut", "shortcut_sample"]
