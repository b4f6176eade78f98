"""TRACT: transitive-closure time distillation (Berthelot et al. 2023).

The teacher's T-step grid t_0 > ... > t_T is cut into S segments of T/S steps. In a phase the
student learns to jump from any grid time t_j to the end of its segment, e_j = t_{(floor(j S/T)+1) T/S},
in one DDIM step. The target follows the transitive closure: one teacher DDIM step t_j -> t_{j+1},
then the self-teacher (an EMA of the student) jumps t_{j+1} -> e_j, unless t_{j+1} already is e_j:

    z       = DDIM_teacher(x_t; t_j -> t_{j+1})
    z_e     = z                                         if t_{j+1} = e_j
              DDIM_self(z; t_{j+1} -> e_j)              otherwise (self-teacher = EMA of the student)
    x_tgt   = (z_e - (sigma_e/sigma_t) x_t) / (alpha_e - (sigma_e/sigma_t) alpha_t)     (as PD's target)
    L       = E w(lambda_t) mean_D (D_student(x_t, t_j) - sg(x_tgt))^2

A phase with S segments yields an S-step sampler (DDIM on the S-step grid, the segment ends). The
phases chain (e.g. T = 64 -> S = 8 -> S = 1): the next phase's teacher is this phase's student
and its T is this phase's S. T and S are frozen inputs (traced grids), so phases recompile
nothing. At the fixed point the student reproduces the teacher's T/S-step DDIM within a segment.

References:
  Berthelot et al., TRACT: Denoising Diffusion Models with Transitive Closure Time-Distillation,
  2023 (Sec. 3, Algorithm 1; the self-teacher is an EMA of the student).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import _common, dsm
from diffdistill.losses.progressive import pd_target
from diffdistill.solvers import ddim
from diffdistill.solvers.grid_points import grid_time
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]


def tract_loss(student: Apply, teacher: Apply, *, schedule: schedules_lib.Schedule,
               spacing: str = "logsnr", weighting: str = "truncated_snr",
               t_start: float | None = None, t_end: float | None = None):
  """The TRACT loss (module docstring).

  Args:
    student: the student's denoiser (also the self-teacher's, with the EMA params).
    teacher: the phase's teacher denoiser.
    schedule, spacing, t_start, t_end: the grid (as for `solvers.sample`).
    weighting: the x0 weighting w(lambda) (`dsm.WEIGHTINGS`).

  Returns:
    loss_fn(params, batch, rng, *, teacher_params, self_teacher_params, teacher_steps,
    num_segments) -> (loss, aux); batch = {"x": [B, ...]}; teacher_steps T and num_segments S are
    int32 scalars with S dividing T.
  """
  weight_fn = dsm.x0_weighting(weighting)

  def loss_fn(params: Any, batch: Mapping[str, Array], rng: Array, *, teacher_params: Any,
              self_teacher_params: Any, teacher_steps: Array, num_segments: Array):
    x0 = _common.data(batch)
    b = x0.shape[0]
    j_rng, eps_rng = jax.random.split(rng)
    n = jnp.asarray(teacher_steps, jnp.int32)
    per_segment = n // jnp.asarray(num_segments, jnp.int32)
    j = jax.random.randint(j_rng, (b,), 0, n)
    end = (j // per_segment + 1) * per_segment
    grid = lambda i: grid_time(schedule, i, n, spacing=spacing, t_start=t_start,  # noqa: E731
                               t_end=t_end, dtype=x0.dtype)
    t, t_next, t_end_j = grid(j), grid(j + 1), grid(end)
    x_t = _common.noised(schedule, x0, t, jax.random.normal(eps_rng, x0.shape, x0.dtype))
    z = ddim.ddim_step(lambda x, tt: teacher(teacher_params, x, tt), x_t, t, t_next,
                       schedule=schedule)
    jumped = ddim.ddim_step(lambda x, tt: student(self_teacher_params, x, tt), z, t_next, t_end_j,
                            schedule=schedule)
    at_end = schedules_lib.broadcast_to(j + 1 == end, x0)
    z_e = jnp.where(at_end, z, jumped)
    target = jax.lax.stop_gradient(pd_target(x_t, z_e, t, t_end_j, schedule=schedule))
    err = jnp.mean(jnp.square(student(params, x_t, t) - target).reshape(b, -1), axis=1)
    terms = weight_fn(schedule.logsnr(t)) * err
    return jnp.mean(terms), {"x0_mse": jnp.mean(err), "nonfinite": jnp.sum(~jnp.isfinite(terms))}

  return loss_fn


def tract(student: Apply, teacher: Apply, *, self_teacher_decay: float = 0.99, **options) -> Method:
  """The TRACT method: frozen `teacher`, `teacher_steps`, `num_segments`; the student's EMA
  "self_teacher" (decay `self_teacher_decay`) is the self-teacher."""
  return Method(name="tract", updates=(Update(
      player="student", loss_fn=tract_loss(student, teacher, **options),
      inputs={"teacher_params": "frozen/teacher", "teacher_steps": "frozen/teacher_steps",
              "num_segments": "frozen/num_segments",
              "self_teacher_params": "players/student/ema/self_teacher"}),),
      ema={"student": {"self_teacher": self_teacher_decay}})


__all__ = ["tract_loss", "tract"]
