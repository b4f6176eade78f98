"""MeanFlow (Geng et al. 2025): one network for the average velocity of the flow between any r < t.

On the rectified-flow path z_t = (1 - t) x + t eps (`schedules.RectifiedFlow`), with the
instantaneous velocity v(z_t, t) (data: the conditional eps - x; distillation: the teacher's
E[eps - x | z_t] = (z_t - D(z_t, t)) / t), the average velocity and its identity are

    u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds,      u = v - (t - r) d/dt u,
    d/dt u = v . d_z u + d_t u                           (total derivative along the flow).

The network u_theta(z, t, r=r) (a 'flow' network conditioned on r: `nets` extra_cond=("r",)) is
trained on the identity with a stop-gradient target, the total derivative from one `jax.jvp`
with tangents (v, 0, 1) in (z, r, t):

    (u, du/dt) = jvp(u_theta, (z, r, t), (v, 0, 1))
    u_tgt      = sg(v - (t - r) du/dt),   err = ||u - u_tgt||^2
    L          = sg(w) err,  w = 1 / (err + c)^p        (adaptive weighting, p = 1, c = 1e-3)

(the jvp's primal output is the online u: one forward and its tangent, no second forward).
(t, r): two logit-normal draws (P_mean, P_std) sorted so t >= r, then r = t for a fraction
1 - `ratio_r_neq_t` of the batch (at r = t the loss is plain flow matching). Sampling with k steps
on t_0 = 1 > ... > t_k = t_end: z_{i+1} = z_i - (t_i - t_{i+1}) u(z_i, t_{i+1}, t_i).

References:
  Geng, Deng, Bai, Kolter & He, Mean Flows for One-step Generative Modeling, 2025 (Eq. 6-9,
  Alg. 1; Table 1: the r != t ratio and the adaptive weighting).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import _common
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]


def sample_times(rng: Array, b: int, *, p_mean: float, p_std: float, ratio_r_neq_t: float,
                 t_min: float, t_max: float, dtype=jnp.float32) -> tuple[Array, Array]:
  """(t, r), each [B]: sorted logit-normal pairs, r = t for a fraction 1 - ratio_r_neq_t."""
  k1, k2 = jax.random.split(rng)
  tr = jax.nn.sigmoid(p_mean + p_std * jax.random.normal(k1, (2, b), dtype))
  tr = jnp.clip(tr, t_min, t_max)
  t, r = jnp.max(tr, axis=0), jnp.min(tr, axis=0)
  r = jnp.where(jax.random.uniform(k2, (b,), dtype) < ratio_r_neq_t, r, t)
  return t, r


def meanflow_loss(u_apply: Apply, teacher: Apply | None = None, *,
                  schedule: schedules_lib.RectifiedFlow | None = None, p_mean: float = -0.4,
                  p_std: float = 1.0, ratio_r_neq_t: float = 0.25, adaptive_p: float = 1.0,
                  adaptive_c: float = 1e-3) -> Callable[..., tuple[Array, dict]]:
  """The MeanFlow loss (module docstring).

  Args:
    u_apply: the average-velocity network u(params, z, t, r=r, **cond) (flow output on RF).
    teacher: a denoiser on the same rectified-flow schedule whose velocity replaces eps - x
      (distillation); None trains from data.
    schedule: the RectifiedFlow (default RectifiedFlow(t_max=1.0)); (t, r) are kept in its range.
    p_mean, p_std: the logit-normal of t and r (the paper's -0.4, 1.0).
    ratio_r_neq_t: the fraction of examples with r != t (the paper's best: 0.25).
    adaptive_p: p of the adaptive weight (0: plain squared error).
    adaptive_c: its c.

  Returns:
    loss_fn(params, batch, rng[, *, teacher_params]) -> (loss, aux); aux: l2 (mean squared
    error to the target), fm_l2 (the same at r = t examples only), nonfinite.
  """
  schedule = schedule or schedules_lib.RectifiedFlow(t_max=1.0)
  if not isinstance(schedule, schedules_lib.RectifiedFlow):
    raise ValueError(f"meanflow_loss needs a RectifiedFlow schedule, got {schedule}.")
  if not 0.0 <= ratio_r_neq_t <= 1.0:
    raise ValueError(f"ratio_r_neq_t must lie in [0, 1], got {ratio_r_neq_t}.")

  def loss_fn(params: Any, batch, rng: Array, *, teacher_params: Any = None):
    if (teacher is None) != (teacher_params is None):
      raise ValueError("MeanFlow distillation needs teacher_params (and a teacher); training "
                       "from data takes neither.")
    x = _common.data(batch)
    b = x.shape[0]
    cond = _common.condition(batch)
    t_rng, e_rng = jax.random.split(rng)
    t, r = sample_times(t_rng, b, p_mean=p_mean, p_std=p_std, ratio_r_neq_t=ratio_r_neq_t,
                        t_min=schedule.t_min, t_max=schedule.t_max, dtype=x.dtype)
    eps = jax.random.normal(e_rng, x.shape, x.dtype)
    z = (1.0 - schedules_lib.broadcast_to(t, x)) * x + schedules_lib.broadcast_to(t, x) * eps
    if teacher is None:
      v = eps - x
    else:
      v = jax.lax.stop_gradient((z - teacher(teacher_params, z, t, **cond))
                                / schedules_lib.broadcast_to(t, x))
    fn = lambda zz, rr, tt: u_apply(params, zz, tt, r=rr, **cond)  # noqa: E731
    u, dudt = jax.jvp(fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    target = jax.lax.stop_gradient(v - schedules_lib.broadcast_to(t - r, x) * dudt)
    err = jnp.sum(jnp.square(u - target).reshape(b, -1), axis=1)  # [B]
    w = jax.lax.stop_gradient(1.0 / (err + adaptive_c) ** adaptive_p) if adaptive_p else 1.0
    terms = w * err
    same = (r == t).astype(x.dtype)
    d = x[0].size
    aux = {"l2": jnp.mean(err) / d,
           "fm_l2": jnp.sum(same * err) / jnp.maximum(jnp.sum(same), 1.0) / d,
           "nonfinite": jnp.sum(~jnp.isfinite(terms))}
    return jnp.mean(terms), aux

  return loss_fn


def meanflow(u_apply: Apply, teacher: Apply | None = None, **options) -> Method:
  """MeanFlow as a method (frozen `teacher` when distilling)."""
  inputs = {"teacher_params": "frozen/teacher"} if teacher is not None else {}
  return Method(name="meanflow", updates=(Update(
      player="student", loss_fn=meanflow_loss(u_apply, teacher, **options), inputs=inputs),))


def meanflow_sample(u_apply: Apply, params: Any, z: Array, *, times: Sequence[float],
                    **cond) -> Array:
  """k-step sampling z_{i+1} = z_i - (t_i - t_{i+1}) u(z_i, t_{i+1}, t_i); times decreasing."""
  def flow_map(p, z, t, r, **c):
    return z - schedules_lib.broadcast_to(t - r, z) * u_apply(p, z, t, r=r, **c)
  return _common.pushforward(flow_map, params, z, times=times, **cond)


__all__ = ["sample_times", "meanflow_loss", "meanflow", "meanflow_sample"]
