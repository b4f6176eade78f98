"""Rectified flow's reflow (Liu et al. 2023): straighten the teacher's coupling, then distil it.

The teacher's probability-flow ODE couples each start x_T with its solution x_0 (the 1-rectified
flow when the teacher is a rectified-flow model). Reflow trains a new flow on the straight lines
between the coupled pairs,

    x_s = (1 - s) x_0 + s x_T,   s in [0, 1],     L = E_s E_(x_T, x_0) mean_D (v(x_s, s) - (x_T - x_0))^2,

which is rectified flow's velocity matching with the teacher's pairs in place of independent
(data, noise) draws. In the library's terms the student is a denoiser on the `RectifiedFlow`
schedule (alpha = 1 - s, sigma = s) whose "noise" is x_T: a network of kind 'flow' predicts
u = alpha' x_0 + sigma' eps = x_T - x_0, and any other kind is trained through the same
`parametrization.from_x0` target. Sampling it is Euler (= DDIM on that schedule) from s = 1; the
2-rectified flow is then straighter, so few Euler steps do well, and k-step knowledge distillation
of its own pairs (`kd`) gives the paper's distilled k-step model.

Straightness (Liu et al., Def. 3.6) of a flow dZ = v(Z, s) ds from Z_1 = x_T to Z_0:

    S = int_0^1 E |(Z_1 - Z_0) - v(Z_s, s)|^2 ds / D,        v = (x - D(x, s)) / s on RectifiedFlow,

zero iff every trajectory is a straight line run at constant speed; `straightness` estimates it
with a fine Euler solve of the flow itself.

References:
  Liu, Gong & Liu, Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
  Flow, ICLR 2023 (Alg. 1, reflow; Def. 3.6, straightness).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from diffdistill import parametrization
from diffdistill import schedules as schedules_lib
from diffdistill.method import Method, Update

Array = jax.Array


def reflow_loss(apply: Callable[..., Array], *, kind: str = "flow",
                schedule: schedules_lib.RectifiedFlow | None = None,
                time_sampler: schedules_lib.TimeSampler | str = "uniform"):
  """Velocity matching on the teacher's pairs (module docstring), for a raw network of `kind`.

  Args:
    apply: the raw network `apply(params, x, s) -> out` of `kind`.
    kind: its output (parametrization.KINDS); 'flow' is rectified flow's velocity.
    schedule: a RectifiedFlow (default RectifiedFlow(t_min=1e-5, t_max=1.0)).
    time_sampler: the distribution of s (default uniform on the schedule's range).

  Returns:
    loss_fn(params, batch, rng) -> (loss, aux), batch = {"x_T": [B, ...], "x": [B, ...] the
    teacher's solution of x_T}. aux: x0_mse (the implied data prediction's squared error),
    nonfinite.
  """
  schedule = schedule or schedules_lib.RectifiedFlow(t_min=1e-5, t_max=1.0)
  if not isinstance(schedule, schedules_lib.RectifiedFlow):
    raise ValueError(f"reflow_loss needs a RectifiedFlow schedule (straight lines), got {schedule}.")
  parametrization.check_kind(kind)
  sampler = schedules_lib.resolve_time_sampler(time_sampler, "time_sampler")

  def loss_fn(params, batch: Mapping[str, Array], rng: Array):
    if "x_T" not in batch or "x" not in batch:
      raise ValueError(f"reflow_loss needs teacher pairs, batch {{'x_T', 'x'}}; got {sorted(batch)}.")
    x0, x_T = jnp.asarray(batch["x"]), jnp.asarray(batch["x_T"])
    b = x0.shape[0]
    s = sampler.sample(rng, (b,), schedule=schedule, dtype=x0.dtype)
    sb = schedules_lib.broadcast_to(s, x0)
    x_s = schedule.alpha(sb) * x0 + schedule.sigma(sb) * x_T
    out = apply(params, x_s, s)
    target = parametrization.from_x0(x0, x_s, s, kind=kind, schedule=schedule)
    terms = jnp.mean(jnp.square(out - target).reshape(b, -1), axis=1)
    x0_hat = parametrization.to_x0(out, x_s, s, kind=kind, schedule=schedule)
    return jnp.mean(terms), {
        "x0_mse": jnp.mean(jnp.square(x0_hat - x0)), "nonfinite": jnp.sum(~jnp.isfinite(terms))}

  return loss_fn


def straightness(denoise: Callable[[Array, Array], Array], x_T: Array, *,
                 schedule: schedules_lib.RectifiedFlow, num_steps: int = 64) -> Array:
  """S of the flow of denoiser `denoise(x, s)` on `schedule` from x_T at s = t_max (module
  docstring), by a `num_steps` Euler solve; returns a scalar (0 for straight, constant-speed paths)."""
  if not isinstance(schedule, schedules_lib.RectifiedFlow):
    raise ValueError(f"straightness is defined on a RectifiedFlow schedule, got {schedule}.")
  s_grid = jnp.linspace(schedule.t_max, schedule.t_min, num_steps + 1, dtype=x_T.dtype)

  def step(x, ss):
    s, s_next = ss
    v = (x - denoise(x, jnp.full((x.shape[0],), s, x.dtype))) / s
    return x + (s_next - s) * v, v

  x_end, vs = jax.lax.scan(step, x_T, (s_grid[:-1], s_grid[1:]))
  chord = (x_T - x_end) / (schedule.t_max - schedule.t_min)  # [B, ...]
  weights = -jnp.diff(s_grid) / (schedule.t_max - schedule.t_min)  # [N], sums to 1
  dev = jnp.mean(jnp.square(vs - chord[None]).reshape(num_steps, x_T.shape[0], -1), axis=(1, 2))
  return jnp.sum(weights * dev)


def reflow(apply: Callable[..., Array], **options) -> Method:
  """The reflow method: one update of the student flow per step on teacher pairs."""
  return Method(name="reflow", updates=(Update(player="student",
                                               loss_fn=reflow_loss(apply, **options)),))


__all__ = ["reflow_loss", "straightness", "reflow"]
