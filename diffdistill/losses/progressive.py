"""Progressive distillation (Salimans & Ho 2022) and its guided two-stage form (Meng et al. 2023).

A student with N DDIM steps learns to match a teacher with 2N. On the N-step grid t_0 > ... > t_N
(`solvers.grid_points.grid_time`, traced, so N is an input and halving it recompiles nothing),
with i ~ U{0..N-1}, t = t_i, t' = t_{2i+1} of the 2N-step grid (the midpoint), t'' = t_{i+1}:

    x_t   = alpha_t x0 + sigma_t eps
    z'    = DDIM_teacher(x_t; t -> t'),   z'' = DDIM_teacher(z'; t' -> t'')
    x_tgt = (z'' - (sigma_t''/sigma_t) x_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)     (Alg. 2)
    L     = E w(lambda_t) mean_D (D_student(x_t, t) - sg(x_tgt))^2

x_tgt is the data prediction that makes ONE student DDIM step t -> t'' land on the teacher's two-step
result z''. Where sigma_t'' = 0 (a grid ending at clean data) the rule is x_tgt = z'' / alpha_t''
(the paper's last step). The default weighting is the paper's truncated SNR, max(SNR, 1) on the
x0 error (`dsm.x0_weighting`). Each round starts the student from the teacher; the rounds
N -> N/2 -> ... -> 1 are the experiment's loop, the teacher and N being frozen inputs.

Guided PD (Meng et al. 2023, "On Distillation of Guided Diffusion Models"), for a class-conditional
teacher with classifier-free guidance D_w = D(x | null) + w (D(x | c) - D(x | null)):
  stage 1 (`guided_copy_loss`): a student D(x, t, c, w) conditioned on w ~ U[w_min, w_max]
    regresses the guided teacher, L = E w(lambda) mean_D (D_s(x_t, t, c, w) - sg(D_w(x_t, t, c)))^2;
  stage 2: progressive distillation of that student, w drawn the same way and passed to student
    and teacher alike (`pd_loss(..., guidance=(w_min, w_max))`).

References:
  Salimans & Ho, Progressive Distillation for Fast Sampling of Diffusion Models, ICLR 2022
  (Algorithm 2; truncated-SNR weighting, Sec. 4).
  Meng et al., On Distillation of Guided Diffusion Models, CVPR 2023 (Sec. 3, two stages).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffdistill import _validate, schedules as schedules_lib
from diffdistill.losses import _common, dsm
from diffdistill.solvers import ddim
from diffdistill.solvers.grid_points import grid_time
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]


def _check_guidance(guidance):
  if guidance is None:
    return None
  w_min, w_max = (float(v) for v in guidance)
  if not w_min <= w_max:
    raise ValueError(f"guidance must be (w_min, w_max) with w_min <= w_max, got {guidance}.")
  return w_min, w_max


def _cond(batch, rng, b, guidance, dtype) -> dict[str, Array]:
  """The conditioning keywords: the batch's label, and a per-example guidance weight w [B]."""
  cond = {}
  if "label" in batch:
    cond["label"] = jnp.asarray(batch["label"])
  if guidance is not None:
    cond["w"] = jax.random.uniform(rng, (b,), dtype, guidance[0], guidance[1])
  return cond


def pd_target(x_t: Array, z2: Array, t: Array, t2: Array, *,
              schedule: schedules_lib.Schedule) -> Array:
  """x_tgt = (z'' - (s''/s) x_t) / (a'' - (s''/s) a_t), or z'' / a'' where s'' = 0 (Alg. 2)."""
  tb, t2b = schedules_lib.broadcast_to(t, x_t), schedules_lib.broadcast_to(t2, x_t)
  a, s = schedule.alpha(tb), schedule.sigma(tb)
  a2, s2 = schedule.alpha(t2b), schedule.sigma(t2b)
  ratio = s2 / s
  return jnp.where(s2 > 0, (z2 - ratio * x_t) / (a2 - ratio * a), z2 / a2)


def pd_loss(student: Apply, teacher: Apply, *, schedule: schedules_lib.Schedule,
            spacing: str = "logsnr", weighting: str = "truncated_snr",
            t_start: float | None = None, t_end: float | None = None,
            guidance: tuple[float, float] | None = None) -> Callable[..., tuple[Array, dict]]:
  """The progressive-distillation loss (module docstring) of a student denoiser.

  Args:
    student: the student's denoiser `apply(params, x, t, **cond) -> x0_hat` (a network through
      `parametrization.as_denoiser`; the paper uses v-prediction).
    teacher: the teacher's denoiser, same contract (round 1: the trained teacher; later rounds:
      the previous student, i.e. the same function as `student`).
    schedule: the forward process of both.
    spacing: the grid both sample on (grids.SPACINGS); sampling the student must use the same.
    weighting: the x0 weighting w(lambda) (`dsm.WEIGHTINGS`).
    t_start, t_end: the grid's range (default the schedule's).
    guidance: (w_min, w_max) for guided PD's stage 2 (w drawn per example, given to both as `w=`).

  Returns:
    loss_fn(params, batch, rng, *, teacher_params, num_steps) -> (loss, aux), batch = {"x": [B, ...]
    (, "label": [B])}; num_steps is the student's N (an int32 scalar: a frozen input), >= 1: a
    concrete N < 1 is a ValueError, a traced one gives a NaN loss (the step is skipped, and the
    loop's max_nonfinite_in_row stops the run). aux: x0_mse (unweighted), target_norm (RMS of
    x_tgt), nonfinite.
  """
  weight_fn = dsm.x0_weighting(weighting)
  guidance = _check_guidance(guidance)

  def loss_fn(params: Any, batch: Mapping[str, Array], rng: Array, *, teacher_params: Any,
              num_steps: Array) -> tuple[Array, dict]:
    if _validate.is_concrete(num_steps) and not int(num_steps) >= 1:
      raise ValueError(f"num_steps (the student's step count N) must be an integer >= 1, got "
                       f"{num_steps!r}.")
    x0 = _common.data(batch)
    b = x0.shape[0]
    i_rng, eps_rng, w_rng = jax.random.split(rng, 3)
    n = jnp.asarray(num_steps, jnp.int32)
    cond = _cond(batch, w_rng, b, guidance, x0.dtype)
    x_t, t, target = round_pair(teacher, teacher_params, x0, i_rng, eps_rng, num_steps=n,
                                schedule=schedule, spacing=spacing, t_start=t_start,
                                t_end=t_end, cond=cond)
    err = jnp.mean(jnp.square(student(params, x_t, t, **cond) - target).reshape(b, -1), axis=1)
    terms = weight_fn(schedule.logsnr(t)) * err  # [B]
    aux = {"x0_mse": jnp.mean(err), "target_norm": jnp.sqrt(jnp.mean(jnp.square(target))),
           "nonfinite": jnp.sum(~jnp.isfinite(terms))}
    # a traced N < 1 has no grid: NaN, so the step is skipped and the loop stops naming it
    return jnp.where(n >= 1, jnp.mean(terms), jnp.nan), aux

  return loss_fn


def guided_copy_loss(student: Apply, teacher: Apply, *, schedule: schedules_lib.Schedule,
                     null_label: int, guidance: tuple[float, float],
                     weighting: str = "truncated_snr",
                     time_sampler: schedules_lib.TimeSampler | str = "uniform"):
  """Guided PD stage 1: a w-conditioned student regresses the classifier-free-guided teacher.

  Returns:
    loss_fn(params, batch, rng, *, teacher_params) -> (loss, aux); batch = {"x", "label"}.
  """
  weight_fn = dsm.x0_weighting(weighting)
  guidance = _check_guidance(guidance)
  sampler = schedules_lib.resolve_time_sampler(time_sampler, "time_sampler")

  def loss_fn(params, batch, rng, *, teacher_params):
    x0 = _common.data(batch)
    if "label" not in batch:
      raise ValueError("guided_copy_loss needs class labels: batch['label'] [B].")
    b = x0.shape[0]
    t_rng, eps_rng, w_rng = jax.random.split(rng, 3)
    t = sampler.sample(t_rng, (b,), schedule=schedule, dtype=x0.dtype)
    x_t = _common.noised(schedule, x0, t, jax.random.normal(eps_rng, x0.shape, x0.dtype))
    cond = _cond(batch, w_rng, b, guidance, x0.dtype)
    label = cond["label"]
    d_cond = teacher(teacher_params, x_t, t, label=label)
    d_null = teacher(teacher_params, x_t, t, label=jnp.full_like(label, null_label))
    w = schedules_lib.broadcast_to(cond["w"], x0)
    target = jax.lax.stop_gradient(d_null + w * (d_cond - d_null))
    err = jnp.mean(jnp.square(student(params, x_t, t, **cond) - target).reshape(b, -1), axis=1)
    terms = weight_fn(schedule.logsnr(t)) * err
    return jnp.mean(terms), {"x0_mse": jnp.mean(err), "nonfinite": jnp.sum(~jnp.isfinite(terms))}

  return loss_fn


def round_pair(teacher: Apply, teacher_params: Any, x0: Array, i_rng: Array, eps_rng: Array, *,
               num_steps: Array, schedule: schedules_lib.Schedule, spacing: str = "logsnr",
               t_start: float | None = None, t_end: float | None = None,
               cond: Mapping[str, Array] | None = None) -> tuple[Array, Array, Array]:
  """(x_t, t, x_tgt) of one progressive-distillation draw (module docstring): i ~ U{0..N-1},
  x_t at t_i, and the data prediction x_tgt that makes one student DDIM step t_i -> t_{i+1} land
  on the teacher's two steps through the 2N-grid's midpoint (stop-gradient)."""
  b = x0.shape[0]
  n = jnp.asarray(num_steps, jnp.int32)
  i = jax.random.randint(i_rng, (b,), 0, n)
  grid = lambda j, m: grid_time(schedule, j, m, spacing=spacing, t_start=t_start,  # noqa: E731
                                t_end=t_end, dtype=x0.dtype)
  t, t_mid, t_next = grid(i, n), grid(2 * i + 1, 2 * n), grid(i + 1, n)
  x_t = _common.noised(schedule, x0, t, jax.random.normal(eps_rng, x0.shape, x0.dtype))
  teach = lambda x, tt: teacher(teacher_params, x, tt, **dict(cond or {}))  # noqa: E731
  z1 = ddim.ddim_step(teach, x_t, t, t_mid, schedule=schedule)
  z2 = ddim.ddim_step(teach, z1, t_mid, t_next, schedule=schedule)
  return x_t, t, jax.lax.stop_gradient(pd_target(x_t, z2, t, t_next, schedule=schedule))


def progressive_distillation(student: Apply, teacher: Apply, **options) -> Method:
  """The method: one student update per step; frozen inputs `teacher` (params) and `num_steps`."""
  return Method(name="pd", updates=(Update(
      player="student", loss_fn=pd_loss(student, teacher, **options),
      inputs={"teacher_params": "frozen/teacher", "num_steps": "frozen/num_steps"}),))


def guided_distillation_stage1(student: Apply, teacher: Apply, **options) -> Method:
  """Guided PD stage 1 as a method: frozen input `teacher`."""
  return Method(name="guided_pd_stage1", updates=(Update(
      player="student", loss_fn=guided_copy_loss(student, teacher, **options),
      inputs={"teacher_params": "frozen/teacher"}),))


__all__ = ["pd_target", "round_pair", "pd_loss", "guided_copy_loss", "progressive_distillation",
           "guided_distillation_stage1"]
