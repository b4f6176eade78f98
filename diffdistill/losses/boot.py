"""BOOT: data-free distillation by bootstrapping along the teacher's ODE (Gu et al. 2023).

The student g(x_T, t) is conditioned on the TARGET time t and sees only the start x_T (noise; no
data). It predicts the signal of the teacher's trajectory from x_T: the state at t is read as a
DDIM step from t_0 = t_start with g as the data prediction,

    x_hat_t(x_T) = (sigma_t / sigma_0) x_T + (alpha_t - alpha_0 sigma_t / sigma_0) g(x_T, t),

which is x_T itself at t = t_0 (the boundary condition holds by construction) and is BOOT's
signal-ODE state y_t = (x_t - sigma_t eps) / alpha_t when alpha_0 = 0. On the N-step grid
(traced), with i ~ U{0..N-1}, t = t_i, s = t_{i+1}, the student bootstraps itself one teacher step
at a time:

    z_s   = step_teacher(sg(x_hat_t(x_T)); t -> s)           (a DDIM or Heun step of the teacher)
    g_tgt = (z_s - (sigma_s/sigma_0) x_T) / (alpha_s - (sigma_s/sigma_0) alpha_0)
    L     = E w(lambda_s) mean_D (g(x_T, s) - sg(g_tgt))^2

so at the fixed point x_hat_{t_i} is the teacher's i-step solution from x_T, for every i: the
student is a one-step generator for any end time. x_T is drawn from the prior sigma(t_0) N(0, I).

References:
  Gu et al., BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping, 2023
  (Sec. 3: signal ODE, bootstrapping objective, boundary condition).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import dsm
from diffdistill.losses.progressive import pd_target
from diffdistill.solvers import ddim, grids, heun
from diffdistill.solvers.grid_points import grid_time
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]
STEPS = {"ddim": ddim.ddim_step, "heun": heun.heun_step}


def boot_state(student: Apply, params: Any, x_T: Array, t: Array, *,
               schedule: schedules_lib.Schedule, t_start: float) -> Array:
  """x_hat_t(x_T) = (s_t/s_0) x_T + (a_t - a_0 s_t/s_0) g(x_T, t) (module docstring)."""
  t = jnp.broadcast_to(jnp.asarray(t, x_T.dtype), (x_T.shape[0],))
  tb = schedules_lib.broadcast_to(t, x_T)
  t0 = jnp.asarray(t_start, x_T.dtype)
  ratio = schedule.sigma(tb) / schedule.sigma(t0)
  return ratio * x_T + (schedule.alpha(tb) - schedule.alpha(t0) * ratio) * student(params, x_T, t)


def boot_loss(student: Apply, teacher: Apply, *, schedule: schedules_lib.Schedule,
              spacing: str = "logsnr", step: str | Callable = "ddim", weighting: str = "uniform",
              t_start: float | None = None, t_end: float | None = None):
  """The BOOT loss (module docstring).

  Args:
    student: g(params, x_T, t) -> signal prediction (a denoiser-shaped network whose inputs are the
      start x_T and the target time t).
    teacher: the teacher's denoiser.
    schedule, spacing, t_start, t_end: the grid (t_start is where x_T lives).
    step: the teacher's step, 'ddim', 'heun' or a single step `fn(denoise, x, t_s, t_t, *, schedule)`.
    weighting: the weight w(lambda_s) on the signal error (`dsm.WEIGHTINGS`; BOOT: uniform).

  Returns:
    loss_fn(params, batch, rng, *, teacher_params, num_steps) -> (loss, aux), batch =
    {"x_T": [B, ...]} (prior noise at t_start).
  """
  step_fn = STEPS.get(step) if isinstance(step, str) else step
  if step_fn is None:
    raise ValueError(f"step must be one of {sorted(STEPS)} or a single-step function, got {step!r}.")
  weight_fn = dsm.x0_weighting(weighting)
  t_start, t_end = grids.resolve_range(schedule, t_start, t_end)

  def loss_fn(params: Any, batch: Mapping[str, Array], rng: Array, *, teacher_params: Any,
              num_steps: Array):
    if "x_T" not in batch:
      raise ValueError(f"boot_loss needs starts batch['x_T'] (prior noise); got {sorted(batch)}.")
    x_T = jnp.asarray(batch["x_T"])
    x_T = x_T.astype(jnp.promote_types(x_T.dtype, jnp.float32))
    b = x_T.shape[0]
    n = jnp.asarray(num_steps, jnp.int32)
    i = jax.random.randint(rng, (b,), 0, n)
    grid = lambda k: grid_time(schedule, k, n, spacing=spacing, t_start=t_start,  # noqa: E731
                               t_end=t_end, dtype=x_T.dtype)
    t, s = grid(i), grid(i + 1)
    x_t = jax.lax.stop_gradient(boot_state(student, params, x_T, t, schedule=schedule,
                                           t_start=t_start))
    z_s = step_fn(lambda x, tt: teacher(teacher_params, x, tt), x_t, t, s, schedule=schedule)
    t0 = jnp.full((b,), t_start, x_T.dtype)
    target = jax.lax.stop_gradient(pd_target(x_T, z_s, t0, s, schedule=schedule))
    err = jnp.mean(jnp.square(student(params, x_T, s) - target).reshape(b, -1), axis=1)
    terms = weight_fn(schedule.logsnr(s)) * err
    return jnp.mean(terms), {"signal_mse": jnp.mean(err),
                             "nonfinite": jnp.sum(~jnp.isfinite(terms))}

  return loss_fn


def boot(student: Apply, teacher: Apply, **options) -> Method:
  """The BOOT method: frozen `teacher` and `num_steps` (the bootstrapping grid's N)."""
  return Method(name="boot", updates=(Update(
      player="student", loss_fn=boot_loss(student, teacher, **options),
      inputs={"teacher_params": "frozen/teacher", "num_steps": "frozen/num_steps"}),))


__all__ = ["boot_state", "boot_loss", "boot", "STEPS"]
