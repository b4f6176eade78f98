"""Knowledge distillation of the teacher's sampler (Luhman & Luhman 2021), and of its denoiser.

Output distillation. Offline pairs (x_T, x_0 = the teacher's probability-flow solution of x_T) are
generated once (`data.pairs`). A k-step student is a denoiser sampled with k DDIM steps on a fixed
grid, S_k(x_T) = DDIM_student^k(x_T), and learns the teacher's map directly:

    L = E_(x_T, x_0) dist(S_k(x_T), x_0)                 dist: l2, l1, pseudo-Huber (`distances`)

with the gradient through all k steps (the sampler is `solvers.sample`, a differentiable
`lax.scan`, so the student is trained exactly as it is sampled). k = 1 is Luhman & Luhman's
one-step student x_0 = D(x_T, t_max) (up to the DDIM step's vanishing x_T term).

Denoiser distillation (`copy_loss`). A network learns the teacher's denoiser itself,

    L = E_t,x0,eps w(lambda_t) mean_D (D_student(x_t, t) - D_teacher(x_t, t))^2,

the regression of DSM with the teacher's E[x0 | x_t] in place of the noisy x0, so it has no
irreducible variance. It makes a network copy of an analytic teacher, which has no weights to
start a student from (progressive distillation, distribution matching), in minutes.

References:
  Luhman & Luhman, Knowledge Distillation in Iterative Generative Models for Improved Sampling
  Speed, 2021.
  Hinton et al., Distilling the Knowledge in a Neural Network, 2015 (regressing a teacher's outputs).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill import solvers
from diffdistill.losses import _common, distances, dsm
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]


def student_sampler(student: Apply, *, schedule: schedules_lib.Schedule, num_steps: int,
                    spacing="logsnr", t_start: float | None = None,
                    t_end: float | None = None) -> Callable[[Any, Array], Array]:
  """S_k(params, x_T): the k-step DDIM sampler of a student denoiser (differentiable)."""

  def run(params, x_T, **cond):
    return solvers.sample(functools.partial(student, params, **cond), x_T, schedule=schedule,
                          solver="ddim", nfe=num_steps, spacing=spacing, t_start=t_start,
                          t_end=t_end)

  solvers.steps_for_nfe("ddim", num_steps)  # a bad k fails here, not when traced
  return run


def kd_loss(student: Apply, *, schedule: schedules_lib.Schedule, num_steps: int,
            spacing="logsnr", distance="l2", t_start: float | None = None,
            t_end: float | None = None, **distance_options) -> Callable[..., tuple[Array, dict]]:
  """Knowledge distillation on offline pairs (module docstring).

  Args:
    student: the student denoiser `apply(params, x, t) -> x0_hat`.
    schedule: the forward process of the pairs' start x_T (at t_start).
    num_steps: k, the student's DDIM steps (its NFE).
    spacing, t_start, t_end: the student's grid (as for `solvers.sample`).
    distance: 'l2', 'l1', 'pseudo_huber' or a callable fn(x, y) -> [B].

  Returns:
    loss_fn(params, batch, rng) -> (loss, aux), batch = {"x_T": [B, ...], "x": [B, ...] the
    teacher's solution}. aux: l2 (mean squared error whatever the distance), nonfinite.
  """
  dist = distances.get(distance, **distance_options)
  sample = student_sampler(student, schedule=schedule, num_steps=num_steps, spacing=spacing,
                           t_start=t_start, t_end=t_end)

  def loss_fn(params, batch: Mapping[str, Array], rng: Array):
    del rng
    if "x_T" not in batch or "x" not in batch:
      raise ValueError(f"kd_loss needs teacher pairs, batch {{'x_T', 'x'}}; got {sorted(batch)}.")
    x_T, target = jnp.asarray(batch["x_T"]), jnp.asarray(batch["x"])
    out = sample(params, x_T)
    terms = dist(out, target)  # [B]
    return jnp.mean(terms), {"l2": jnp.mean(distances.l2(out, target)),
                             "nonfinite": jnp.sum(~jnp.isfinite(terms))}

  return loss_fn


def copy_loss(student: Apply, teacher: Apply, *, schedule: schedules_lib.Schedule,
              weighting: str = "uniform", time_sampler: schedules_lib.TimeSampler | str = "uniform"):
  """Denoiser distillation: regress the teacher's denoiser on noised data (module docstring).

  Returns:
    loss_fn(params, batch, rng, *, teacher_params) -> (loss, aux), batch = {"x": [B, ...]}; aux:
    x0_mse (unweighted mean squared gap to the teacher's denoiser), nonfinite.
  """
  weight_fn = dsm.x0_weighting(weighting)
  sampler = schedules_lib.resolve_time_sampler(time_sampler, "time_sampler")

  def loss_fn(params, batch, rng, *, teacher_params):
    x0 = _common.data(batch)
    b = x0.shape[0]
    t_rng, eps_rng = jax.random.split(rng)
    t = sampler.sample(t_rng, (b,), schedule=schedule, dtype=x0.dtype)
    x_t = _common.noised(schedule, x0, t, jax.random.normal(eps_rng, x0.shape, x0.dtype))
    target = jax.lax.stop_gradient(teacher(teacher_params, x_t, t))
    err = jnp.mean(jnp.square(student(params, x_t, t) - target).reshape(b, -1), axis=1)
    terms = weight_fn(schedule.logsnr(t)) * err
    return jnp.mean(terms), {"x0_mse": jnp.mean(err), "nonfinite": jnp.sum(~jnp.isfinite(terms))}

  return loss_fn


def knowledge_distillation(student: Apply, **options) -> Method:
  """The KD method: one student update per step on offline pairs; no frozen input."""
  return Method(name="kd", updates=(Update(player="student", loss_fn=kd_loss(student, **options)),))


def denoiser_copy(student: Apply, teacher: Apply, **options) -> Method:
  """The denoiser-copy method: frozen input `teacher`."""
  return Method(name="copy", updates=(Update(
      player="student", loss_fn=copy_loss(student, teacher, **options),
      inputs={"teacher_params": "frozen/teacher"}),))


__all__ = ["student_sampler", "kd_loss", "copy_loss", "knowledge_distillation", "denoiser_copy"]
