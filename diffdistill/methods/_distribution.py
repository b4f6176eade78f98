"""What the distribution-matching modules share: the `dm` section, the generator, its sampler, and
the two-player stage (three with DMD2's GAN head).

For an analytic teacher the plan has two stages:

  copy  a network fitted to the exact denoiser (`_common.copy_stage`): the teacher has no
        weights, and both the generator and the fake score start from this copy;
  dm    the game: "fake_score" (x dm.fake_repeats) then "generator", frozen input "teacher" (the
        exact denoiser's params, not the copy).

The generator is G(z) = D_copy(sigma_init z, t_init) (`losses.distribution_matching.
one_step_generator`), t_init where sigma/alpha = dm.sigma_init (SiD's 2.5: at t_max the denoiser
ignores its input, alpha(t_max) ~ 0.007 on VP-linear, so a generator started there outputs the
data mean). Its student maps the evaluation's x_start (the teacher's marginal at t_max), rescaled
to sigma_init, with that one call, so its coupling error against the exact flow map is not
meaningful (G is not trained to follow the ODE): read the distribution columns. With
`dm.generator_steps = k > 1` the generator is DMD2's k-step one (input times t_init (k - i) / k,
trained by backward simulation) and its student has NFE k. Every log_every steps the generator's
metrics also hold `sliced_w2`, the sliced W2 between a fresh batch of G's samples and the batch of
exact samples (64 directions; its floor at this batch size is not zero).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffdistill import metrics, nets
from diffdistill.losses import distribution_matching as dm
from diffdistill.losses import _common as _losses_common
from diffdistill.losses import dmd2 as dmd2_lib
from diffdistill.method import Method
from diffdistill.methods import _common, plan as plan_lib


def section(**overrides) -> dict:
  """The `dm` config section's defaults, with a method's own values."""
  return {"dm": dict(
      dict(num_steps=2000, fake_repeats=1, generator_lr=1e-4, fake_lr=2e-4, weighting="uniform",
           fake_weighting="uniform", time_sampler="uniform", regression_weight=0.0, sid_alpha=1.2,
           gan_weight=0.0, schedule="constant", init_from_copy=True, sigma_init=2.5,
           generator_steps=1,  # > 1: a k-step generator (DMD2's backward simulation)
           particle_lr=3e-2),  # SDS / VSD: the particles' Adam step (cosine decay)
      **overrides)}


SETTINGS = {"eval.teacher_nfes": (10, 20, 50)}  # what a one-step generator is up against
# the U-Net teacher is the start; ~1 s per game step on 2 cores
DIGITS = {"dm.num_steps": 600, "eval.teacher_nfes": (10,),
          "eval.solvers": ("dpm_solver_pp_2m", "heun")}
TINY = {"dm.num_steps": 20, "eval.teacher_nfes": (10,)}


def with_sliced_w2(method: Method, generator: dm.Generator, *, every: int,
                   player: str = "generator", num_projections: int = 64) -> Method:
  """The generator's aux gains `sliced_w2` (G's fresh samples vs batch['x']) on the steps that
  the loop logs (state.step + 1 divisible by `every`), 0 on the others (no cost there)."""

  def wrap(loss_fn):
    def loss(params, batch, rng, *, step, **inputs):
      value, aux = loss_fn(params, batch, rng, **inputs)
      if "x" in batch:
        def sw2():
          ref = jnp.asarray(batch["x"], jnp.float32)
          x = generator.sample(jax.lax.stop_gradient(params),
                               generator.noise(jax.random.fold_in(rng, 99), ref),
                               jax.random.fold_in(rng, 98), **_losses_common.condition(batch))
          return metrics.sliced_wasserstein(x, ref, num_projections=num_projections)
        aux = {**aux, "sliced_w2": jax.lax.cond((step + 1) % every == 0, sw2,
                                                 lambda: jnp.zeros((), jnp.float32))}
      return value, aux
    return loss

  updates = tuple(dataclasses.replace(u, loss_fn=wrap(u.loss_fn), inputs={**u.inputs, "step": "step"})
                  if u.player == player else u for u in method.updates)
  return dataclasses.replace(method, updates=updates)


def optim(config, learning_rate: float) -> ml_collections.ConfigDict:
  """config.optim at `learning_rate` with dm.schedule and no warm-up (both players start from
  the copy: no warm-up of a random net)."""
  c = ml_collections.ConfigDict(config.optim.to_dict())
  c.learning_rate = learning_rate
  c.schedule = config.dm.schedule
  c.warmup_steps = 0
  return c


def make_generator(net, *, sigma_init: float = 2.5, generator_steps: int = 1) -> dm.Generator:
  """G of the denoiser `net`: one step at t_init (sigma/alpha = sigma_init), or DMD2's k steps."""
  t_init = float(net.schedule.t_from_logsnr(jnp.float32(-2.0 * np.log(sigma_init))))
  if isinstance(generator_steps, bool) or not isinstance(generator_steps, int) or generator_steps < 1:
    raise ValueError(f"dm.generator_steps must be an integer >= 1, got {generator_steps!r}.")
  if generator_steps == 1:
    return dm.one_step_generator(net.denoise, schedule=net.schedule, t_init=t_init)
  k = generator_steps
  return dm.multi_step_generator(net.denoise, schedule=net.schedule,
                                 times=[t_init * (k - i) / k for i in range(k)])


def generator_sampler(name: str, net, *, t_start: float, sigma_init: float = 2.5,
                      generator_steps: int = 1):
  """The generator as a sampler of x_T at t_start (rescaled to sigma_init): nfe = its steps."""
  generator = make_generator(net, sigma_init=sigma_init, generator_steps=generator_steps)
  to_init = generator.sigma_init / float(net.schedule.sigma(jnp.float32(t_start)))

  def sample(params, x, *, nfe, rng=None, **cond):
    plan_lib.check_nfe(f"{name} (dm.generator_steps={generator_steps})", nfe, (generator_steps,))
    return generator.sample(params, to_init * x, rng, **cond)

  return sample


def build_game(config, setup, name: str, make_method, *, pairs: bool = False, gan: bool = False):
  """The copy (where needed) and the game stage of generator `name`.

  make_method(generator, net, to_init, common_kw) -> Method; `pairs`: the data are teacher
  pairs (DMD's regression); gan_dim > 0 adds a "discriminator" player (a linear head on
  features of that size).
  """
  c = config.dm
  _common.check_positive(c, "dm", ("num_steps", "fake_repeats"))
  teacher = setup.teacher
  net = _common.student_net(config, setup)
  stages: list[plan_lib.Stage] = []
  if c.init_from_copy:
    init = _common.initial_params(setup, stages, net)
  else:  # the ablation: both players from one random init, no copy (docs/distribution_matching.md)
    init = lambda r: net.init(jax.random.key(config.seed + 3))  # noqa: E731
  generator = make_generator(net, sigma_init=c.sigma_init, generator_steps=c.generator_steps)
  to_init = generator.sigma_init / float(net.schedule.sigma(jnp.float32(setup.t_start)))
  fake_options = dict(weighting=c.fake_weighting, time_sampler=c.time_sampler)
  common_kw = dict(schedule=net.schedule, fake_repeats=c.fake_repeats, fake_options=fake_options)
  method = with_sliced_w2(make_method(generator, net, to_init, common_kw), generator,
                          every=config.log_every)

  def players(r):
    out = {"generator": plan_lib.make_player(optim(config, c.generator_lr), init(r),
                                             num_steps=c.num_steps, ema={"eval": config.eval_ema}),
           "fake_score": plan_lib.make_player(optim(config, c.fake_lr), init(r),
                                              num_steps=c.num_steps)}
    if gan:
      out["discriminator"] = plan_lib.make_player(
          optim(config, c.fake_lr), dmd2_lib.init_linear_head(nets.trunk_features(net)[1]),
          num_steps=c.num_steps)
    return out

  data = (_common.pairs_data(config, setup) if pairs
          else (lambda r, d: setup.data(config.seed + 2)))
  stages.append(plan_lib.Stage(name="dm", method=method, num_steps=c.num_steps, players=players,
                               frozen=lambda r: {"teacher": teacher.params}, data=data))
  sample = generator_sampler(name, net, t_start=setup.t_start, sigma_init=c.sigma_init,
                             generator_steps=c.generator_steps)
  student = plan_lib.Student(name=f"{name} generator", nfe=c.generator_steps,
                             params=lambda r: r["dm"]["generator"], sample=sample)
  return plan_lib.Plan(stages=stages, students=[student])




def build_particles(config, setup, name: str, make_method, *, variational: bool):
  """SDS / VSD (Poole et al. 2023; Wang et al. 2023): eval.num_samples free particles, started
  at N(0, I), moved by the exact teacher's score; VSD's variational denoiser starts from the
  network copy and is fitted by DSM to the particles. The particles are the samples (NFE 0).

  make_method(net) -> Method.
  """
  c = config.dm
  _common.check_positive(c, "dm", ("num_steps", "fake_repeats"))
  from diffdistill.losses import score_distillation  # noqa: PLC0415
  teacher = setup.teacher
  net = _common.student_net(config, setup)
  stages: list[plan_lib.Stage] = []
  n = config.eval.num_samples
  start = jax.random.normal(jax.random.key(config.seed + 5), (n, *teacher.example_shape))
  particle_optim = optim(config, c.particle_lr)
  particle_optim.schedule = "cosine"  # the particles settle: their step size decays (to end_factor)
  init = _common.initial_params(setup, stages, net) if variational else None
  method = with_sliced_w2(make_method(net), score_distillation.PARTICLES, every=config.log_every,
                          player="particles")

  def players(r):
    out = {"particles": plan_lib.make_player(particle_optim, start, num_steps=c.num_steps)}
    if init is not None:
      out["variational"] = plan_lib.make_player(optim(config, c.fake_lr), init(r),
                                                num_steps=c.num_steps)
    return out

  stages.append(plan_lib.Stage(name="dm", method=method, num_steps=c.num_steps, players=players,
                               frozen=lambda r: {"teacher": teacher.params},
                               data=lambda r, d: setup.data(config.seed + 2)))
  student = plan_lib.Student(name=f"{name} particles", nfe=0,
                             params=lambda r: r["dm"]["particles"], sample=particles)
  return plan_lib.Plan(stages=stages, students=[student])


def particles(params, x, *, nfe, rng=None, **cond):
  """The 'sampler' of SDS / VSD: the particles themselves (nfe 0; x_T is not used)."""
  del x, rng, cond
  plan_lib.check_nfe("particles", nfe, (0,))
  return params


__all__ = ["section", "SETTINGS", "DIGITS", "TINY", "with_sliced_w2", "optim", "make_generator",
           "generator_sampler", "build_game", "build_particles", "particles"]
