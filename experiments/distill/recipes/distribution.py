"""Distribution-matching recipes: Diff-Instruct, DMD, DMD2, SiD into one-step generators.

Each `build_*(config, setup) -> Plan` has two stages for an analytic teacher:

  copy  a network fitted to the exact denoiser (`trajectory.copy_stage`): the teacher has no
        weights, and both the generator and the fake score start from this copy;
  dm    the two-player game (three with DMD2's GAN head): "fake_score" (x config.dm.fake_repeats)
        then "generator", frozen input "teacher" (the exact denoiser's params, not the copy).

The generator is G(z) = D_copy(sigma(t_max) z, t_max) (`one_step_generator`); its student maps
the evaluation's x_start (the teacher's marginal at t_max) with that one call, so its coupling
error against the exact flow map is not meaningful (G is not trained to follow the ODE): read the
distribution columns (sliced W2 with its floor, MMD^2, mode-weight TV). With
`dm.generator_steps = k > 1` the generator is DMD2's k-step one (`multi_step_generator`, input
times t_init (k - i) / k, trained by backward simulation) and its student has NFE k. Every log_every steps
the generator's metrics also hold `sliced_w2`, the sliced W2 between a fresh batch of G's samples
and the batch of exact samples (`metrics.sliced_wasserstein`, 64 directions; its floor at this
batch size is not zero).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffdistill import metrics
from diffdistill.losses import distribution_matching as dm
from diffdistill.losses import dmd2 as dmd2_lib
from diffdistill.losses import score_distillation
from diffdistill.train.method import Method
from experiments.distill import common
from experiments.distill.recipes import trajectory


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
                               jax.random.fold_in(rng, 98))
          return metrics.sliced_wasserstein(x, ref, num_projections=num_projections)
        aux = {**aux, "sliced_w2": jax.lax.cond((step + 1) % every == 0, sw2,
                                                 lambda: jnp.zeros((), jnp.float32))}
      return value, aux
    return loss

  updates = tuple(dataclasses.replace(u, loss_fn=wrap(u.loss_fn), inputs={**u.inputs, "step": "step"})
                  if u.player == player else u for u in method.updates)
  return dataclasses.replace(method, updates=updates)


def _optim(config, learning_rate: float) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.optim.to_dict())  # the copy stage's, at the dm lr
  c.learning_rate = learning_rate
  c.schedule = config.dm.schedule
  c.warmup_steps = 0  # both players start from the copy: no warm-up of a random net
  return c


def _build(config, setup, method_name: str) -> common.Plan:
  c = config.dm
  teacher = setup.teacher
  net = trajectory.student_net(config, setup)
  stages: list[common.Stage] = []
  if c.init_from_copy:
    init = trajectory.initial_params(setup, stages, net)
  else:  # the ablation: both players from one random init, no copy (docs/distribution_matching.md)
    init = lambda r: net.init(jax.random.key(config.seed + 3))  # noqa: E731
  # t_init where sigma/alpha = dm.sigma_init (SiD's 2.5): at t_max the denoiser ignores its input
  # (alpha(t_max) ~ 0.007 on VP-linear), so a generator started there outputs the data mean.
  t_init = float(net.schedule.t_from_logsnr(jnp.float32(-2.0 * np.log(c.sigma_init))))
  if c.generator_steps == 1:
    generator = dm.one_step_generator(net.denoise, schedule=net.schedule, t_init=t_init)
  elif c.generator_steps > 1:  # DMD2's k-step generator (backward simulation), times uniform in t
    k = c.generator_steps
    generator = dm.multi_step_generator(net.denoise, schedule=net.schedule,
                                        times=[t_init * (k - i) / k for i in range(k)])
  else:
    raise ValueError(f"dm.generator_steps must be >= 1, got {c.generator_steps}.")
  sigma_start = float(net.schedule.sigma(jnp.float32(setup.t_start)))
  to_init = generator.sigma_init / sigma_start  # x_start (the teacher's marginal) -> x_init
  fake_options = dict(weighting=c.fake_weighting, time_sampler=c.time_sampler)
  common_kw = dict(schedule=net.schedule, fake_repeats=c.fake_repeats, fake_options=fake_options)
  gan = method_name == "dmd2" and c.gan_weight > 0
  if method_name == "diff_instruct":
    method = dm.diff_instruct(generator, teacher.apply, net.denoise, weighting=c.weighting,
                              time_sampler=c.time_sampler, **common_kw)
  elif method_name == "dmd":
    method = dm.dmd(generator, teacher.apply, net.denoise, time_sampler=c.time_sampler,
                    regression_weight=c.regression_weight, pair_noise_scale=to_init, **common_kw)
  elif method_name == "sid":
    method = dm.sid(generator, teacher.apply, net.denoise, alpha=c.sid_alpha,
                    time_sampler=c.time_sampler, **common_kw)
  elif method_name == "dmd2":
    method = dmd2_lib.dmd2(generator, teacher.apply, net.denoise, time_sampler=c.time_sampler,
                           features=common.trunk_features(net)[0] if gan else None, gan_weight=c.gan_weight,
                           **common_kw)
  else:
    raise ValueError(f"Unknown distribution-matching method {method_name!r}.")
  method = with_sliced_w2(method, generator, every=config.log_every)

  def players(r):
    out = {"generator": common.make_player(_optim(config, c.generator_lr), init(r),
                                           num_steps=c.num_steps, ema={"eval": config.eval_ema}),
           "fake_score": common.make_player(_optim(config, c.fake_lr), init(r),
                                            num_steps=c.num_steps)}
    if gan:
      out["discriminator"] = common.make_player(
          _optim(config, c.fake_lr), dmd2_lib.init_linear_head(common.trunk_features(net)[1]),
          num_steps=c.num_steps)
    return out

  if method_name == "dmd" and c.regression_weight > 0:
    data = lambda r, d: trajectory.teacher_pairs(  # noqa: E731
        config, setup, "pairs", trajectory._teacher_pair_sampler(config, setup),  # noqa: SLF001
        os.path.dirname(d))
  else:
    data = lambda r, d: setup.data(config.seed + 2)  # noqa: E731
  stages.append(common.Stage(name="dm", method=method, num_steps=c.num_steps, players=players,
                             frozen=lambda r: {"teacher": teacher.params}, data=data))
  student = common.Student(name=f"{method_name} generator", nfe=c.generator_steps,
                           params=lambda r: r["dm"]["generator"],
                           run=lambda params, x: generator.sample(params, to_init * x))
  return common.Plan(stages=stages, students=[student])


def _build_particles(config, setup, method_name: str) -> common.Plan:
  """SDS / VSD (Poole et al. 2023; Wang et al. 2023): eval.num_samples free particles, started
  at N(0, I), moved by the exact teacher's score; VSD's variational denoiser starts from the
  network copy and is fitted by DSM to the particles. The particles are the samples (NFE 0)."""
  c = config.dm
  teacher = setup.teacher
  net = trajectory.student_net(config, setup)
  stages: list[common.Stage] = []
  n = config.eval.num_samples
  start = jax.random.normal(jax.random.key(config.seed + 5), (n, *teacher.example_shape))
  particle_optim = _optim(config, c.particle_lr)
  particle_optim.schedule = "cosine"  # the particles settle: their step size decays (to end_factor)
  if method_name == "sds":
    method = score_distillation.sds(teacher.apply, schedule=net.schedule, time_sampler=c.time_sampler)
    init = None
  else:
    init = trajectory.initial_params(setup, stages, net)
    method = score_distillation.vsd(teacher.apply, net.denoise, schedule=net.schedule,
                                    time_sampler=c.time_sampler, variational_repeats=c.fake_repeats)
  method = with_sliced_w2(method, score_distillation.PARTICLES, every=config.log_every,
                          player="particles")

  def players(r):
    out = {"particles": common.make_player(particle_optim, start, num_steps=c.num_steps)}
    if init is not None:
      out["variational"] = common.make_player(_optim(config, c.fake_lr), init(r),
                                              num_steps=c.num_steps)
    return out

  stages.append(common.Stage(name="dm", method=method, num_steps=c.num_steps, players=players,
                             frozen=lambda r: {"teacher": teacher.params},
                             data=lambda r, d: setup.data(config.seed + 2)))
  student = common.Student(name=f"{method_name} particles", nfe=0,
                           params=lambda r: r["dm"]["particles"], run=lambda params, x: params)
  return common.Plan(stages=stages, students=[student])


RECIPES = {name: (lambda config, setup, name=name: _build(config, setup, name))
           for name in ("diff_instruct", "dmd", "dmd2", "sid")}
RECIPES.update({name: (lambda config, setup, name=name: _build_particles(config, setup, name))
                for name in ("sds", "vsd")})

__all__ = ["RECIPES", "with_sliced_w2"]
