"""Distribution matching into one-step generators: Diff-Instruct, DMD, SiD and the fake score.

A generator x = G_theta(z) is trained so that its noised marginal p_g,t matches the teacher's
p_d,t at every t, using the difference between the teacher's denoiser D_d and the denoiser D_f of
a "fake score" network fitted to the generator's own samples. With x_t = alpha x + sigma eps, the
scores are s = (alpha D - x_t) / sigma^2, so s_f - s_d = alpha / sigma^2 (D_f - D_d): every
method below is written with x0 predictions.

Players (a `diffdistill.method.Method` each): "fake_score" (updated first, `fake_repeats` times
per step: DMD2's TTUR), "generator"; frozen input "teacher". The fake score learns by DSM on the
generator's samples, which are a stop-gradient input there:

    L_f(psi) = E_t,z,eps w(lambda) mean_D (D_f(alpha sg(G(z)) + sigma eps, t) - sg(G(z)))^2.

Generator losses (x = G(z), x_t = alpha x + sigma eps, t ~ p(t); sg = stop-gradient):

  Diff-Instruct (integral KL):   grad_theta = E w(lambda) (D_f(x_t) - D_d(x_t)) . dx/dtheta
      implemented as 0.5 mean_D (x - sg(x - g))^2 with g = sg(w (D_f - D_d)): the score networks
      take no gradient, and the loss value is 0.5 mean_D g^2 (a readable gap, zero at the optimum).
      With uniform t, w = SNR is the unweighted integral KL (Luo et al.'s w(t) = 1); the default
      'uniform' x0 weight is their sigma^2/alpha^2-weighted KL, bounded at small t.
  DMD:  g = (D_f - D_d) / mean_D |x - D_d(x_t)|   (Yin et al. 2024a's normalized gradient), plus
      regression_weight * dist(G(x_T), x_0) on offline teacher pairs (`data.pairs`).
  SiD (alpha-weighted score identity):
      L = w [ (1 - a) |D_d(x_t) - D_f(x_t)|^2 + (D_d(x_t) - D_f(x_t)) . (D_f(x_t) - x) ] / D,
      w = 1 / mean_D |x - D_d(x_t)| (stop-gradient), with the gradient through x AND through both
      networks' inputs x_t (their params are inputs, not differentiated). a = 1.2 by default.

With an exact fake score (D_f the denoiser of p_g itself) every gradient vanishes when p_g = p_d;
`tests/test_distribution_matching.py` checks that, the direction elsewhere and the two-player
fixed point on single-Gaussian data.

Numerics: non-finite score differences are counted (aux "nonfinite"), never replaced: the step
skips an update whose loss or gradient is not finite and counts it.

References:
  Luo et al., Diff-Instruct: A Universal Approach for Transferring Knowledge From Pre-trained
  Diffusion Models, NeurIPS 2023.
  Yin et al., One-step Diffusion with Distribution Matching Distillation, CVPR 2024 (DMD).
  Yin et al., Improved Distribution Matching Distillation for Fast Image Synthesis, 2024 (DMD2).
  Zhou et al., Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion
  Models for One-Step Generation, ICML 2024 (SiD).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import _common, distances, dsm
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]


# ----------------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Generator:
  """A generator whose input is noise at level sigma_init: x_init = sigma_init * z.

  sample(params, x_init, rng, **cond) -> x: the generator as it is evaluated.
  train_sample(params, x_init, rng, **cond) -> x: the sample the losses differentiate (the same
    map for a one-step generator; one backward-simulated step for a multi-step one).
  cond: the network conditioning (a class-conditional generator's `label`), passed to its
  denoiser; the losses take it from the batch (`losses._common.condition`), so a batch with
  labels trains G(z, label) against the teacher and the fake score at the same label.
  """

  sample: Callable[..., Array]
  train_sample: Callable[..., Array]
  sigma_init: float

  def noise(self, rng: Array, like: Array) -> Array:
    """x_init = sigma_init z, z ~ N(0, I), shaped and typed like `like`."""
    return self.sigma_init * jax.random.normal(rng, like.shape, like.dtype)


def one_step_generator(denoise: Apply, *, schedule: schedules_lib.Schedule,
                       t_init: float | None = None) -> Generator:
  """G(z) = D(sigma_init z, t_init) (the papers' one-step generator from the teacher's weights).

  Started from the teacher's (or its network copy's) params, G's first output is the teacher's
  E[x0 | x_t_init], the data mean at t_init = t_max: a good start for every mode at once.
  t_init defaults to schedule.t_max.
  """
  t_init = float(schedule.t_max if t_init is None else t_init)
  if not schedule.t_min <= t_init <= schedule.t_max:
    raise ValueError(f"t_init must lie in [t_min, t_max] = [{schedule.t_min}, {schedule.t_max}], "
                     f"got {t_init}.")

  def sample(params, x_init, rng=None, **cond):
    del rng
    return denoise(params, x_init, jnp.full((x_init.shape[0],), t_init, x_init.dtype), **cond)

  return Generator(sample=sample, train_sample=sample,
                   sigma_init=float(schedule.sigma(jnp.float32(t_init))))


def multi_step_generator(denoise: Apply, *, schedule: schedules_lib.Schedule,
                         times) -> Generator:
  """A k-step generator: x_{i+1} = alpha_{i+1} D(x_i, t_i) + sigma_{i+1} eps_i, output D(x_k-1).

  times: t_0 > t_1 > ... > t_{k-1}, the generator's input noise levels (DMD2 uses 4 of them).
  Training uses DMD2's backward simulation: each example draws a step i, runs the generator's
  own first i steps without gradient to reach x_i, and the loss differentiates D(x_i, t_i), so
  every step is trained on the inputs it sees when sampling.
  """
  ts = tuple(float(t) for t in times)
  if not ts or any(a <= b for a, b in zip(ts, ts[1:])):
    raise ValueError(f"times must be a non-empty decreasing sequence, got {times!r}.")
  t_arr = jnp.asarray(ts, jnp.float32)
  k = len(ts)

  def levels(params, x_init, rng, cond):
    """[k, B, ...]: the generator's input at each t_i; [k, B, ...] its outputs."""
    def body(x, i):
      x0 = denoise(params, x, jnp.full((x.shape[0],), t_arr[i], x.dtype), **cond)
      nxt = t_arr[jnp.minimum(i + 1, k - 1)]
      eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
      return schedule.alpha(nxt) * x0 + schedule.sigma(nxt) * eps, (x, x0)

    _, (xs, x0s) = jax.lax.scan(body, x_init, jnp.arange(k))
    return xs, x0s

  def sample(params, x_init, rng=None, **cond):
    rng = jax.random.key(0) if rng is None else rng
    return levels(params, x_init, rng, cond)[1][-1]

  def train_sample(params, x_init, rng, **cond):
    i_rng, s_rng = jax.random.split(rng)
    b = x_init.shape[0]
    i = jax.random.randint(i_rng, (b,), 0, k)  # [B]
    xs, _ = levels(jax.lax.stop_gradient(params), x_init, s_rng, cond)
    x_i = jax.lax.stop_gradient(xs[i, jnp.arange(b)])
    return denoise(params, x_i, t_arr[i], **cond)

  return Generator(sample=sample, train_sample=train_sample,
                   sigma_init=float(schedule.sigma(jnp.float32(ts[0]))))


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def batch_like(batch: Mapping[str, Array]) -> Array:
  """The example shape of a batch: data samples 'x' or pairs' starts 'x_T'."""
  for key in ("x", "x_T"):
    if key in batch:
      x = jnp.asarray(batch[key])
      return x.astype(jnp.promote_types(x.dtype, jnp.float32))
  raise ValueError(f"batch must hold 'x' or 'x_T' (its shape sets the generator's batch); got "
                   f"{sorted(batch)}.")


def noised(x: Array, rng: Array, *, schedule, sampler):
  """x_t = alpha x + sigma eps at t ~ sampler; returns x_t, t [B], lambda [B]."""
  t_rng, e_rng = jax.random.split(rng)
  t = sampler.sample(t_rng, (x.shape[0],), schedule=schedule, dtype=x.dtype)
  tb = schedules_lib.broadcast_to(t, x)
  x_t = schedule.alpha(tb) * x + schedule.sigma(tb) * jax.random.normal(e_rng, x.shape, x.dtype)
  return x_t, t, schedule.logsnr(t)


def _per_example(v: Array) -> Array:
  return v.reshape(v.shape[0], -1)


def mean_over_dims(v: Array) -> Array:
  return jnp.mean(_per_example(v), axis=1)  # [B]


def pushed(x: Array, g: Array) -> Array:
  """[B] terms 0.5 mean_D (x - sg(x - g))^2: value 0.5 mean_D g^2, gradient g . dx/dtheta / D."""
  return 0.5 * mean_over_dims(jnp.square(x - jax.lax.stop_gradient(x - g)))


def nonfinite_count(v: Array) -> Array:
  return jnp.sum(~jnp.all(jnp.isfinite(_per_example(v)), axis=1))


def fake_score_loss(generator: Generator, fake: Apply, *, schedule: schedules_lib.Schedule,
                    weighting: str = "uniform",
                    time_sampler: schedules_lib.TimeSampler | str = "uniform",
                    **weighting_options) -> Callable[..., tuple[Array, dict]]:
  """DSM of the fake denoiser on the generator's samples (stop-gradient on them).

  Args:
    generator: the generator (`one_step_generator`, `multi_step_generator`).
    fake: the fake score's denoiser apply(params, x, t) -> x0_hat.
    weighting: the x0 weighting w(lambda) (`losses.dsm.x0_weighting`, options passed through).
    time_sampler: the distribution of t.

  Returns:
    loss_fn(params, batch, rng, *, generator_params) -> (loss, aux); the batch sets the shape
    (its 'x' or 'x_T') and, with 'label', the labels of G's samples and of the fake score.
    aux: x0_mse (unweighted), nonfinite.
  """
  weight_fn = dsm.x0_weighting(weighting, **weighting_options)
  sampler = schedules_lib.resolve_time_sampler(time_sampler, "time_sampler")

  def loss_fn(params, batch, rng, *, generator_params):
    like, cond = batch_like(batch), _common.condition(batch)
    z_rng, g_rng, n_rng = jax.random.split(rng, 3)
    x = jax.lax.stop_gradient(generator.train_sample(generator_params, generator.noise(z_rng, like),
                                                     g_rng, **cond))
    x_t, t, lam = noised(x, n_rng, schedule=schedule, sampler=sampler)
    err = mean_over_dims(jnp.square(fake(params, x_t, t, **cond) - x))  # [B]
    terms = weight_fn(lam) * err
    return jnp.mean(terms), {"x0_mse": jnp.mean(err), "nonfinite": jnp.sum(~jnp.isfinite(terms))}

  return loss_fn


def generator_terms(generator, teacher, fake, *, schedule, sampler, score_grad: bool,
                    with_x_t: bool = False):
  """(params, batch, rng, teacher_params, fake_params) -> x, D_d(x_t), D_f(x_t), lambda (or, with
  `with_x_t`, x, D_d(x_t), D_f(x_t), x_t, t).

  score_grad=False stops the gradient at x_t (Diff-Instruct, DMD: the score networks take none);
  True lets it flow through both networks' inputs (SiD). A batch with 'label' conditions the
  generator, the teacher and the fake score on those labels.
  """

  def terms(params, batch, rng, teacher_params, fake_params):
    like, cond = batch_like(batch), _common.condition(batch)
    z_rng, g_rng, n_rng = jax.random.split(rng, 3)
    x = generator.train_sample(params, generator.noise(z_rng, like), g_rng, **cond)
    x_t, t, lam = noised(x, n_rng, schedule=schedule, sampler=sampler)
    if not score_grad:
      x_t = jax.lax.stop_gradient(x_t)
    d_real = teacher(teacher_params, x_t, t, **cond)
    d_fake = fake(fake_params, x_t, t, **cond)
    return (x, d_real, d_fake, x_t, t) if with_x_t else (x, d_real, d_fake, lam)

  return terms


# ----------------------------------------------------------------------------------------------
# Generator losses
# ----------------------------------------------------------------------------------------------


def diff_instruct_loss(generator: Generator, teacher: Apply, fake: Apply, *,
                       schedule: schedules_lib.Schedule, weighting: str = "uniform",
                       time_sampler: schedules_lib.TimeSampler | str = "uniform",
                       **weighting_options) -> Callable[..., tuple[Array, dict]]:
  """Diff-Instruct's integral-KL generator loss (module docstring).

  Returns:
    loss_fn(params, batch, rng, *, teacher_params, fake_params) -> (loss, aux). aux: gap (mean_D
    |D_f - D_d|^2, unweighted), nonfinite (examples with a non-finite score difference).
  """
  weight_fn = dsm.x0_weighting(weighting, **weighting_options)
  terms_fn = generator_terms(generator, teacher, fake, schedule=schedule,
                              sampler=schedules_lib.resolve_time_sampler(time_sampler),
                              score_grad=False)

  def loss_fn(params, batch, rng, *, teacher_params, fake_params):
    x, d_real, d_fake, lam = terms_fn(params, batch, rng, teacher_params, fake_params)
    diff = d_fake - d_real
    g = jax.lax.stop_gradient(schedules_lib.broadcast_to(weight_fn(lam), diff) * diff)
    terms = pushed(x, g)
    return jnp.mean(terms), {"gap": jnp.mean(mean_over_dims(jnp.square(diff))),
                             "nonfinite": nonfinite_count(diff)}

  return loss_fn


def dmd_loss(generator: Generator, teacher: Apply, fake: Apply, *,
             schedule: schedules_lib.Schedule,
             time_sampler: schedules_lib.TimeSampler | str = "uniform",
             regression_weight: float = 0.0, distance: str = "l2", normalizer_eps: float = 1e-6,
             pair_noise_scale: float = 1.0, **distance_options) -> Callable[..., tuple[Array, dict]]:
  """DMD's generator loss: the normalized distribution-matching gradient + pair regression.

  g = (D_f(x_t) - D_d(x_t)) / mean_D |x - D_d(x_t)| (+ normalizer_eps); with regression_weight
  > 0 the batch must be teacher pairs {'x_T', 'x'} and the loss adds
  regression_weight * mean_B dist(G(pair_noise_scale * x_T), x) (`losses.distances`; DMD uses
  LPIPS); pair_noise_scale = sigma_init / sigma(t of x_T) puts the pairs' start at G's input scale.

  Returns:
    loss_fn(params, batch, rng, *, teacher_params, fake_params) -> (loss, aux). aux: dm (the
    distribution-matching term), gap, regression (when used), nonfinite.
  """
  if regression_weight < 0:
    raise ValueError(f"regression_weight must be >= 0, got {regression_weight}.")
  dist = distances.get(distance, **distance_options)
  terms_fn = generator_terms(generator, teacher, fake, schedule=schedule,
                              sampler=schedules_lib.resolve_time_sampler(time_sampler),
                              score_grad=False)

  def loss_fn(params, batch, rng, *, teacher_params, fake_params):
    x, d_real, d_fake, _ = terms_fn(params, batch, rng, teacher_params, fake_params)
    diff = d_fake - d_real
    norm = jax.lax.stop_gradient(mean_over_dims(jnp.abs(x - d_real))) + normalizer_eps  # [B]
    g = jax.lax.stop_gradient(diff / schedules_lib.broadcast_to(norm, diff))
    dm = jnp.mean(pushed(x, g))
    aux = {"dm": dm, "gap": jnp.mean(mean_over_dims(jnp.square(diff))),
           "nonfinite": nonfinite_count(diff)}
    loss = dm
    if regression_weight > 0:
      if "x_T" not in batch or "x" not in batch:
        raise ValueError("dmd_loss with regression_weight > 0 needs teacher pairs, batch "
                         f"{{'x_T', 'x'}}; got {sorted(batch)}.")
      x_T = jnp.asarray(batch["x_T"])
      out = generator.sample(params, pair_noise_scale * x_T, jax.random.fold_in(rng, 7),
                             **_common.condition(batch))
      reg = jnp.mean(dist(out, jnp.asarray(batch["x"])))
      aux["regression"] = reg
      loss = loss + regression_weight * reg
    return loss, aux

  return loss_fn


def sid_loss(generator: Generator, teacher: Apply, fake: Apply, *,
             schedule: schedules_lib.Schedule, alpha: float = 1.2,
             time_sampler: schedules_lib.TimeSampler | str = "uniform",
             normalizer_eps: float = 1e-6) -> Callable[..., tuple[Array, dict]]:
  """SiD's alpha-weighted score-identity generator loss (module docstring).

  The gradient flows through x and through both networks' inputs x_t; only the normalizer
  w = 1 / mean_D |x - D_d(x_t)| is a stop-gradient.

  Returns:
    loss_fn(params, batch, rng, *, teacher_params, fake_params) -> (loss, aux). aux: gap, nonfinite.
  """
  terms_fn = generator_terms(generator, teacher, fake, schedule=schedule,
                              sampler=schedules_lib.resolve_time_sampler(time_sampler),
                              score_grad=True)

  def loss_fn(params, batch, rng, *, teacher_params, fake_params):
    x, d_real, d_fake, _ = terms_fn(params, batch, rng, teacher_params, fake_params)
    diff = d_real - d_fake
    w = 1.0 / (jax.lax.stop_gradient(mean_over_dims(jnp.abs(x - d_real))) + normalizer_eps)  # [B]
    per = (1.0 - alpha) * jnp.square(diff) + diff * (d_fake - x)
    terms = w * mean_over_dims(per)
    return jnp.mean(terms), {"gap": jnp.mean(mean_over_dims(jnp.square(diff))),
                             "nonfinite": nonfinite_count(diff)}

  return loss_fn


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------

GENERATOR_INPUTS = {"teacher_params": "frozen/teacher", "fake_params": "players/fake_score/params"}
FAKE_INPUTS = {"generator_params": "players/generator/params"}


def two_player(name: str, generator_loss, fake_loss, *, fake_repeats: int = 1,
               extra: tuple[Update, ...] = ()) -> Method:
  """fake_score (x fake_repeats), then any extra updates, then generator; frozen 'teacher'."""
  return Method(name=name, updates=(
      Update(player="fake_score", loss_fn=fake_loss, inputs=FAKE_INPUTS, repeats=fake_repeats),
      *extra,
      Update(player="generator", loss_fn=generator_loss, inputs=GENERATOR_INPUTS)))


def _fake(generator, fake, schedule, fake_options):
  return fake_score_loss(generator, fake, schedule=schedule, **dict(fake_options or {}))


def diff_instruct(generator: Generator, teacher: Apply, fake: Apply, *, schedule,
                  fake_repeats: int = 1, fake_options: Mapping[str, Any] | None = None,
                  **options) -> Method:
  """The Diff-Instruct method (`diff_instruct_loss` options; `fake_score_loss` fake_options)."""
  return two_player("diff_instruct",
                    diff_instruct_loss(generator, teacher, fake, schedule=schedule, **options),
                    _fake(generator, fake, schedule, fake_options), fake_repeats=fake_repeats)


def dmd(generator: Generator, teacher: Apply, fake: Apply, *, schedule, fake_repeats: int = 1,
        fake_options: Mapping[str, Any] | None = None, **options) -> Method:
  """The DMD method (`dmd_loss` options: regression_weight > 0 reads teacher pairs)."""
  return two_player("dmd", dmd_loss(generator, teacher, fake, schedule=schedule, **options),
                    _fake(generator, fake, schedule, fake_options), fake_repeats=fake_repeats)


def sid(generator: Generator, teacher: Apply, fake: Apply, *, schedule, fake_repeats: int = 1,
        fake_options: Mapping[str, Any] | None = None, **options) -> Method:
  """The SiD method (`sid_loss` options, e.g. alpha)."""
  return two_player("sid", sid_loss(generator, teacher, fake, schedule=schedule, **options),
                    _fake(generator, fake, schedule, fake_options), fake_repeats=fake_repeats)


__all__ = ["Generator", "one_step_generator", "multi_step_generator", "fake_score_loss",
           "diff_instruct_loss", "dmd_loss", "sid_loss", "two_player", "diff_instruct", "dmd",
           "sid", "GENERATOR_INPUTS", "FAKE_INPUTS", "noised", "batch_like", "pushed",
           "mean_over_dims", "nonfinite_count", "generator_terms"]
