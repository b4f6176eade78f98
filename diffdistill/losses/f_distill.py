"""f-distill: distribution matching with a general f-divergence (Xu, Nie & Vahdat 2025).

For D_f(p || q) = E_q f(p / q) between the teacher's noised marginal p_t and the generator's q_t,
the generator gradient is DMD's score difference weighted by a function of the density ratio
r = p_t(x_t) / q_t(x_t):

    grad_theta D_f = E h(r(x_t)) (s_q(x_t) - s_p(x_t)) . dx_t/dtheta,    h(r) = r^2 f''(r),

so with s_q - s_p = alpha / sigma^2 (D_f - D_d) and DMD's normalizer (Yin et al. 2024a),

    g = h(r) (D_fake(x_t) - D_teacher(x_t)) / mean_D |x - D_teacher(x_t)|.

Reverse KL, f = -log r, has h = 1: the gradient is DMD's exactly. Less mode-seeking divergences
weight up the samples where the teacher has more mass than the generator:

    divergence   f(r)                              h(r) = r^2 f''(r)
    reverse_kl   -log r                            1
    forward_kl   r log r                           r
    js           r log r - (1 + r) log((1 + r)/2)  r / (1 + r)
    hellinger    (sqrt(r) - 1)^2                   sqrt(r) / 2
    jeffreys     (r - 1) log r                     r + 1
    pearson      (r - 1)^2                         2 r^2

The ratio comes from a discriminator: DMD2's linear head on the fake score's features, trained
by the logistic loss (`dmd2.discriminator_loss`), whose optimal logit is log p_t / q_t; h is
computed from that logit (in log space, clipped to `max_log_ratio`). With `normalize`, h is divided
by its batch mean, the paper's guard against a few large weights steering the step (the weights
then average to 1, as reverse KL's do).

References:
  Xu, Nie & Vahdat, One-step Diffusion Models with f-Divergence Distribution Matching, 2025.
  Yin et al., One-step Diffusion with Distribution Matching Distillation, CVPR 2024 (DMD).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import _common
from diffdistill.losses import distribution_matching as dm
from diffdistill.losses import dmd2
from diffdistill.method import Method

Array = jax.Array

# h(r) = r^2 f''(r) of each divergence, as a function of log r
WEIGHTS: dict[str, Callable[[Array], Array]] = {
    "reverse_kl": jnp.ones_like,
    "forward_kl": jnp.exp,
    "js": jax.nn.sigmoid,
    "hellinger": lambda l: 0.5 * jnp.exp(0.5 * l),
    "jeffreys": lambda l: jnp.exp(l) + 1.0,
    "pearson": lambda l: 2.0 * jnp.exp(2.0 * l),
}


def weight(log_ratio: Array, *, divergence: str) -> Array:
  """h(r) of `divergence` at r = exp(log_ratio) (module docstring)."""
  if divergence not in WEIGHTS:
    raise ValueError(f"divergence must be one of {sorted(WEIGHTS)}, got {divergence!r}.")
  return WEIGHTS[divergence](log_ratio)


def generator_loss(generator: dm.Generator, teacher: Callable, fake: Callable, *,
                   schedule: schedules_lib.Schedule, divergence: str = "js",
                   log_ratio: Callable | None = None, normalize: bool = True,
                   max_log_ratio: float = 10.0, normalizer_eps: float = 1e-6,
                   time_sampler: schedules_lib.TimeSampler | str = "uniform"):
  """The f-divergence generator loss (module docstring).

  Args:
    log_ratio: log_ratio(discriminator_params, fake_params, x_t, t, **cond) -> [B], the estimate of
      log p_t(x_t) / q_t(x_t) (e.g. a head on the fake score's features); unused (may be None)
      for reverse_kl.
    normalize: divide h by its batch mean.

  Returns:
    loss_fn(params, batch, rng, *, teacher_params, fake_params[, discriminator_params]) -> (loss,
    aux): aux dm (the value), gap, weight_max (the largest normalized weight), nonfinite.
  """
  weight(jnp.zeros(()), divergence=divergence)  # a bad name fails here
  needs_ratio = divergence != "reverse_kl"
  if needs_ratio and log_ratio is None:
    raise ValueError(f"divergence={divergence!r} weights by the density ratio: give log_ratio "
                     "(a discriminator's logit); only reverse_kl needs none.")
  terms_fn = dm.generator_terms(generator, teacher, fake, schedule=schedule,
                                sampler=schedules_lib.resolve_time_sampler(time_sampler),
                                score_grad=False, with_x_t=True)

  def loss_fn(params, batch, rng, *, teacher_params, fake_params, discriminator_params=None):
    x, d_real, d_fake, x_t, t = terms_fn(params, batch, rng, teacher_params, fake_params)
    diff = d_fake - d_real
    if needs_ratio:
      l = jnp.clip(log_ratio(discriminator_params, fake_params, x_t, t,
                             **_common.condition(batch)), -max_log_ratio, max_log_ratio)
      h = weight(jax.lax.stop_gradient(l), divergence=divergence)  # [B]
      if normalize:
        h = h / jnp.mean(h)
    else:
      h = jnp.ones((x.shape[0],), x.dtype)
    norm = jax.lax.stop_gradient(dm.mean_over_dims(jnp.abs(x - d_real))) + normalizer_eps
    g = jax.lax.stop_gradient(schedules_lib.broadcast_to(h / norm, diff) * diff)
    value = jnp.mean(dm.pushed(x, g))
    return value, {"dm": value, "gap": jnp.mean(dm.mean_over_dims(jnp.square(diff))),
                   "weight_max": jnp.max(h), "nonfinite": dm.nonfinite_count(diff)}

  return loss_fn


def f_distill(generator: dm.Generator, teacher: Callable, fake: Callable, *,
              schedule: schedules_lib.Schedule, divergence: str = "js", fake_repeats: int = 1,
              features: Callable | None = None, head: Callable = dmd2.linear_head,
              fake_options: Mapping[str, Any] | None = None, **options) -> Method:
  """f-distill as a method: fake_score (x fake_repeats), discriminator (estimating log p_t/q_t
  from `features(fake_params, x_t, t)` through `head`; not for reverse_kl), generator.

  Players: "generator", "fake_score", "discriminator" (the head's params, e.g.
  `dmd2.init_linear_head(F)`); frozen input "teacher".
  """
  fake_loss = dm.fake_score_loss(generator, fake, schedule=schedule, **dict(fake_options or {}))
  time_sampler = options.get("time_sampler", "uniform")
  if divergence == "reverse_kl":
    gen = generator_loss(generator, teacher, fake, schedule=schedule, divergence=divergence,
                         **options)
    return dm.two_player("fdistill", gen, fake_loss, fake_repeats=fake_repeats)
  if features is None:
    raise ValueError(f"divergence={divergence!r} needs features(fake_params, x_t, t), the fake "
                     "network's features the discriminator's head reads.")

  def log_ratio(disc_params, fake_params, x_t, t, **cond):
    return head(disc_params, features(fake_params, x_t, t, **cond))

  gen = generator_loss(generator, teacher, fake, schedule=schedule, divergence=divergence,
                       log_ratio=log_ratio, **options)
  return dmd2.with_discriminator("fdistill", generator, gen, fake_loss, features,
                                 schedule=schedule, head=head, fake_repeats=fake_repeats,
                                 time_sampler=time_sampler)


__all__ = ["WEIGHTS", "weight", "generator_loss", "f_distill"]
