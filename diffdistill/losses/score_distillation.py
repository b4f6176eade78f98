"""Score distillation on particles: SDS (DreamFusion) and VSD (ProlificDreamer).

The "generator" is a set of free parameters theta = {x_1, ..., x_N} (particles; a NeRF in the
papers, here the samples themselves). With x_t = alpha x + sigma eps and the teacher's (possibly
guided) denoiser D_w:

  SDS:  grad_theta = E_t,eps w(lambda) (x - D_w(x_t, t)) . dx/dtheta
        (= w' (eps_hat - eps) in eps units). Its fixed points solve x = E_eps D_w(x_t): every
        particle goes to a mode of the smoothed teacher, whatever N; for single-Gaussian data
        N(m, s^2) the only fixed point is x = m, so the particles' spread collapses to 0, and a
        guidance scale w > 0 sharpens the modes further.
  VSD:  grad_theta = E_t,eps w(lambda) (D_phi(x_t, t) - D_w(x_t, t)) . dx/dtheta,
        with D_phi a variational denoiser fitted by DSM to the particles themselves (the
        "fake score" of distribution matching, player "variational"): the particles follow
        the KL gradient of their empirical law, so they keep the teacher's spread.

Both are `Method`s with player "particles" (params = the [N, ...] array) and frozen input
"teacher"; VSD adds player "variational" (updated first). The batch is not read.

References:
  Poole et al., DreamFusion: Text-to-3D using 2D Diffusion, ICLR 2023 (SDS).
  Wang et al., ProlificDreamer: High-Fidelity and Diverse Text-to-3D Generation with Variational
  Score Distillation, NeurIPS 2023 (VSD).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import distribution_matching as dm
from diffdistill.losses import dsm
from diffdistill.method import Method, Update

Array = jax.Array


def _identity(params, x_init, rng=None):
  del x_init, rng
  return params


PARTICLES = dm.Generator(sample=_identity, train_sample=_identity, sigma_init=1.0)


def sds_loss(teacher: Callable, *, schedule: schedules_lib.Schedule, weighting: str = "uniform",
             time_sampler: schedules_lib.TimeSampler | str = "uniform", **weighting_options):
  """SDS on particles: loss_fn(params [N, ...], batch, rng, *, teacher_params) -> (loss, aux).

  teacher: the (guided: `parametrization.guided`) denoiser. aux: gap, nonfinite.
  """
  weight_fn = dsm.x0_weighting(weighting, **weighting_options)
  sampler = schedules_lib.resolve_time_sampler(time_sampler, "time_sampler")

  def loss_fn(params, batch, rng, *, teacher_params):
    del batch
    x = params
    x_t, t, lam = dm.noised(jax.lax.stop_gradient(x), rng, schedule=schedule, sampler=sampler)
    diff = x - teacher(teacher_params, x_t, t)
    g = jax.lax.stop_gradient(schedules_lib.broadcast_to(weight_fn(lam), diff) * diff)
    terms = dm.pushed(x, g)
    return jnp.mean(terms), {"gap": jnp.mean(dm.mean_over_dims(jnp.square(diff))),
                             "nonfinite": dm.nonfinite_count(diff)}

  return loss_fn


def sds(teacher: Callable, *, schedule: schedules_lib.Schedule, **options) -> Method:
  """SDS: player "particles", frozen input "teacher"."""
  return Method(name="sds", updates=(Update(
      player="particles", loss_fn=sds_loss(teacher, schedule=schedule, **options),
      inputs={"teacher_params": "frozen/teacher"}),))


def vsd(teacher: Callable, variational: Callable, *, schedule: schedules_lib.Schedule,
        weighting: str = "uniform", time_sampler: schedules_lib.TimeSampler | str = "uniform",
        variational_repeats: int = 1, variational_weighting: str = "uniform") -> Method:
  """VSD: "variational" (DSM on the particles, x variational_repeats), then "particles"
  (Diff-Instruct's gradient with the particles as the generator); frozen input "teacher"."""
  fit = dm.fake_score_loss(PARTICLES, variational, schedule=schedule,
                           weighting=variational_weighting, time_sampler=time_sampler)
  move = dm.diff_instruct_loss(PARTICLES, teacher, variational, schedule=schedule,
                               weighting=weighting, time_sampler=time_sampler)

  def fit_loss(params, batch, rng, *, particles):
    return fit(params, {"x": particles}, rng, generator_params=particles)

  def move_loss(params, batch, rng, *, teacher_params, variational_params):
    del batch
    return move(params, {"x": params}, rng, teacher_params=teacher_params,
                fake_params=variational_params)

  return Method(name="vsd", updates=(
      Update(player="variational", loss_fn=fit_loss, inputs={"particles": "players/particles/params"},
             repeats=variational_repeats),
      Update(player="particles", loss_fn=move_loss,
             inputs={"teacher_params": "frozen/teacher",
                     "variational_params": "players/variational/params"})))


__all__ = ["PARTICLES", "sds_loss", "sds", "vsd"]
