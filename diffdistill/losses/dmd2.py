"""DMD2: two-time-scale distribution matching with a GAN head on the fake score's features.

DMD2 (Yin et al. 2024b) drops DMD's regression loss and keeps its distribution-matching gradient
(`distribution_matching.dmd_loss`), with three changes:

  TTUR      k fake-score updates per generator update (`Update(repeats=k)`, k = 5 by default), so
            the fake score tracks the moving generator without the pairs DMD needed;
  GAN head  a classifier h(F_f(x_t, t)) on the features F_f of the FAKE score network (not the
            teacher's: the teacher's features never see generated samples, and wiring the head to
            them is the public bug the issue names), trained as its own player "discriminator":

                L_D = E softplus(-h(F_f(alpha x_real + sigma eps, t)))
                      + E softplus(h(F_f(alpha sg(G(z)) + sigma eps, t))),

            while the generator adds gan_weight * E softplus(-h(F_f(alpha G(z) + sigma eps, t)))
            (non-saturating), its gradient flowing through the fake network's input into G(z);
            the fake network's and the head's params are inputs there, never differentiated;
  backward simulation  for a multi-step generator (`multi_step_generator`): the generator is
            trained on inputs produced by its own earlier steps.

Here the head is a separate player over features the fake score learns by DSM alone; DMD2 also
back-propagates the classifier loss into the fake network's encoder (a shared trunk across two
players, which this engine's one-loss-per-player updates do not express).

References:
  Yin et al., Improved Distribution Matching Distillation for Fast Image Synthesis, 2024 (DMD2).
  Goodfellow et al., Generative Adversarial Nets, 2014 (the non-saturating generator loss).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import _common, distribution_matching as dm
from diffdistill.method import Method, Update

Array = jax.Array
Features = Callable[..., Array]  # features(fake_params, x_t, t, **cond) -> [B, F]


def linear_head(params: Mapping[str, Array], features: Array) -> Array:
  """h(F) = F . w + b, [B]: the classifier on the fake network's features."""
  return features.reshape(features.shape[0], -1) @ params["w"] + params["b"]


def init_linear_head(num_features: int) -> dict[str, Array]:
  """A zero head: both logits start at 0 (the discriminator starts undecided)."""
  return {"w": jnp.zeros((num_features,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def discriminator_loss(generator: dm.Generator, features: Features, *,
                       schedule: schedules_lib.Schedule, head: Callable = linear_head,
                       time_sampler: schedules_lib.TimeSampler | str = "uniform"):
  """L_D of the module docstring.

  Returns:
    loss_fn(params, batch, rng, *, generator_params, fake_params) -> (loss, aux), batch = {'x':
    [B, ...] data samples}. aux: real_logit, fake_logit (means), accuracy, nonfinite.
  """
  sampler = schedules_lib.resolve_time_sampler(time_sampler, "time_sampler")

  def loss_fn(params, batch, rng, *, generator_params, fake_params):
    if "x" not in batch:
      raise ValueError(f"discriminator_loss needs data samples batch['x']; got {sorted(batch)}.")
    real, cond = jnp.asarray(batch["x"]).astype(jnp.float32), _common.condition(batch)
    z_rng, g_rng, r_rng, f_rng = jax.random.split(rng, 4)
    fake = jax.lax.stop_gradient(generator.train_sample(
        generator_params, generator.noise(z_rng, real), g_rng, **cond))
    logits = []
    for x, key in ((real, r_rng), (fake, f_rng)):
      x_t, t, _ = dm.noised(x, key, schedule=schedule, sampler=sampler)
      logits.append(head(params, features(fake_params, x_t, t, **cond)))
    l_real, l_fake = logits
    terms = jax.nn.softplus(-l_real) + jax.nn.softplus(l_fake)  # [B]
    accuracy = 0.5 * (jnp.mean(l_real > 0) + jnp.mean(l_fake < 0))
    return jnp.mean(terms), {"real_logit": jnp.mean(l_real), "fake_logit": jnp.mean(l_fake),
                             "accuracy": accuracy, "nonfinite": jnp.sum(~jnp.isfinite(terms))}

  return loss_fn


def generator_loss(generator: dm.Generator, teacher: Callable, fake: Callable, *,
                   schedule: schedules_lib.Schedule, features: Features | None = None,
                   head: Callable = linear_head, gan_weight: float = 0.0,
                   time_sampler: schedules_lib.TimeSampler | str = "uniform", **dmd_options):
  """DMD's distribution-matching loss + gan_weight * the non-saturating GAN loss.

  Returns:
    loss_fn(params, batch, rng, *, teacher_params, fake_params[, discriminator_params]) ->
    (loss, aux); aux: dmd_loss's, plus gan (the GAN term) when gan_weight > 0.
  """
  if gan_weight < 0:
    raise ValueError(f"gan_weight must be >= 0, got {gan_weight}.")
  if gan_weight > 0 and features is None:
    raise ValueError("gan_weight > 0 needs features(fake_params, x_t, t), the fake network's "
                     "features the GAN head reads.")
  base = dm.dmd_loss(generator, teacher, fake, schedule=schedule, time_sampler=time_sampler,
                     **dmd_options)
  if gan_weight == 0:
    return base
  sampler = schedules_lib.resolve_time_sampler(time_sampler, "time_sampler")

  def loss_fn(params, batch, rng, *, teacher_params, fake_params, discriminator_params):
    loss, aux = base(params, batch, rng, teacher_params=teacher_params, fake_params=fake_params)
    like, cond = dm.batch_like(batch), _common.condition(batch)
    z_rng, g_rng, n_rng = jax.random.split(jax.random.fold_in(rng, 11), 3)
    x = generator.train_sample(params, generator.noise(z_rng, like), g_rng, **cond)
    x_t, t, _ = dm.noised(x, n_rng, schedule=schedule, sampler=sampler)
    logit = head(discriminator_params, features(fake_params, x_t, t, **cond))
    gan = jnp.mean(jax.nn.softplus(-logit))
    aux = {**aux, "gan": gan}
    return loss + gan_weight * gan, aux

  return loss_fn


def dmd2(generator: dm.Generator, teacher: Callable, fake: Callable, *,
         schedule: schedules_lib.Schedule, fake_repeats: int = 5,
         features: Features | None = None, head: Callable = linear_head, gan_weight: float = 0.0,
         fake_options: Mapping[str, Any] | None = None, **options) -> Method:
  """The DMD2 method: fake_score x fake_repeats, discriminator (when gan_weight > 0), generator.

  Players: "generator", "fake_score", and "discriminator" (the head's params) with a GAN head;
  frozen input "teacher".
  """
  fake_loss = dm.fake_score_loss(generator, fake, schedule=schedule, **dict(fake_options or {}))
  gen_loss = generator_loss(generator, teacher, fake, schedule=schedule, features=features,
                            head=head, gan_weight=gan_weight, **options)
  if gan_weight == 0:
    return dm.two_player("dmd2", gen_loss, fake_loss, fake_repeats=fake_repeats)
  return with_discriminator("dmd2", generator, gen_loss, fake_loss, features, schedule=schedule,
                            head=head, fake_repeats=fake_repeats,
                            time_sampler=options.get("time_sampler", "uniform"))


def with_discriminator(name: str, generator: dm.Generator, gen_loss, fake_loss,
                       features: Features, *, schedule: schedules_lib.Schedule,
                       head: Callable = linear_head, fake_repeats: int = 1,
                       time_sampler: schedules_lib.TimeSampler | str = "uniform") -> Method:
  """fake_score (x fake_repeats), "discriminator" (`discriminator_loss` of a head on
  features(fake_params, x_t, t)), then the generator, which reads discriminator_params too."""
  disc = Update(player="discriminator",
                loss_fn=discriminator_loss(generator, features, schedule=schedule, head=head,
                                           time_sampler=time_sampler),
                inputs={"generator_params": "players/generator/params",
                        "fake_params": "players/fake_score/params"})
  return Method(name=name, updates=(
      Update(player="fake_score", loss_fn=fake_loss, inputs=dm.FAKE_INPUTS, repeats=fake_repeats),
      disc,
      Update(player="generator", loss_fn=gen_loss,
             inputs={**dm.GENERATOR_INPUTS,
                     "discriminator_params": "players/discriminator/params"})))


__all__ = ["linear_head", "init_linear_head", "discriminator_loss", "generator_loss", "dmd2",
           "with_discriminator"]
