"""Consistency trajectory models (CTM): an anytime-to-anytime jump G(x_t, t, s) of the PF ODE.

The paper writes G in EDM/VE form (t = sigma): G(x_t, t, s) = (s/t) x_t + (1 - s/t) g(x_t, t, s).
On any schedule of the library it is written, as `losses.consistency` writes f, on the scale-free
state xh = x / alpha at the VE time sh = sigma / alpha, and returned in the scale of time s:

    Gh(xh_t, t, s) = (sh_s / sh_t) xh_t + (1 - sh_s / sh_t) g(x_t, t, s)
    G(x_t, t, s)   = alpha_s Gh = (sigma_s / sigma_t) x_t + alpha_s (1 - sh_s / sh_t) g(x_t, t, s)

(`trajectory_function`). g is a denoiser of the library conditioned on s through the network's
extra conditioning (`extra_cond=("s",)`, zero-initialized): a student initialized from its teacher
has g(x, t, s) = D(x, t), so G starts as the teacher's DDIM step t -> s. G(x, t, t) = x holds
exactly for any params (both coefficients are exactly 1 and 0), and g(x, t, t) is a denoiser.

Training on the N-interval grid t_0 > ... > t_N = t_end ("time 0", the boundary epsilon), with
i ~ U{0..N-1} (t = t_i), j ~ U{i+1..N} (s = t_j), k ~ U{i+1..min(j, i+M)} (u = t_k; M =
max_solver_steps, default N), x_t = alpha_t x0 + sigma_t z:

    x_u      = Solver(x_t; t -> u)        the teacher's public single step (Heun by default) applied
                                          on each grid interval t_i -> ... -> t_k
    x_target = G_sg(G_sg(x_u, u, s), s, t_end)                      (u = s: G_sg(x_u, s, s) = x_u)
    x_est    = G_sg(G_theta(x_t, t, s), s, t_end)
    L_CTM    = dist(x_est, x_target)                                 (the paper's d at time 0)
    L_DSM    = w(lambda_t) mean_D (g_theta(x_t, t, t) - x0)^2
    L        = E [L_CTM + lambda_DSM L_DSM]

sg is the stop-gradient "target" params (the EMA, decay mu, or theta itself with mu = 0): their
values are frozen but gradients flow through the x-argument of the outer G_sg(., s, t_end) into
G_theta. dist is any of `losses.distances` (l2, l1, pseudo-Huber) or a callable feature distance
(the paper's LPIPS plugs in there). The DSM term reuses the CTM draw's (x_t, t), with an x0
weighting of `losses.dsm` (default truncated SNR).

The GAN term (gan_weight = lambda_GAN > 0; Kim et al. Eq. 7) adds a discriminator player d_eta
that tells data x0 from the student's time-0 estimates x_est (the same x_est as L_CTM):

    L_D      = E softplus(-d_eta(x0)) + E softplus(d_eta(sg(x_est)))        (the discriminator)
    L_GAN    = E softplus(-d_eta(x_est))                                    (the student, non-saturating)
    L        = E [L_CTM + lambda_DSM L_DSM] + lambda_GAN [k >= gan_start] L_GAN

d_eta(x) = head_eta(features(feature_params, x_tau, tau)): a trainable head (`dmd2.linear_head`)
on a FROZEN feature network's features of x noised to a random tau (the paper uses a frozen
pretrained feature network with trainable heads; here any network of the library, e.g. the
teacher's network copy, with `features` such as experiments/distill's `trunk_features`). The
features never come from the student: the student's own features would let it move the
discriminator's input space. The paper's adaptive lambda_GAN (the ratio of the two losses'
gradient norms at the last layer) is not implemented: lambda_GAN is a constant switched on at
step `gan_start`.

gamma-sampling (Kim et al. Alg. 2, `gamma_sample`) on times t_0 > ... > t_{K-1} and t_K = t_end,
exactly K calls of G: for n = 0..K-1, with sh~ = max(sqrt(1 - gamma^2) sh_{n+1}, sh(t_end)),

    x~      = G(x_n, t_n, t~)                     (the last step: G(x_{K-1}, t_{K-1}, t_end))
    x_{n+1} = alpha_{n+1} (x~ / alpha(t~) + gamma sh_{n+1} z_n)

gamma = 0 is the deterministic chain of jumps t_n -> t_{n+1}; gamma = 1 is multistep consistency
sampling with f = G(., ., t_end) / alpha(t_end) (`consistency.multistep_sample`, same noise keys).

References:
  Kim, Lai, Liao, Murata, Takida, Uesaka, He, Mitsufuji & Ermon, Consistency Trajectory Models:
  Learning Probability Flow ODE Trajectory of Diffusion, ICLR 2024 (Eq. 3-7, Alg. 1-2).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import _common, distances
from diffdistill.losses import distribution_matching as dm_lib
from diffdistill.losses import dmd2 as dmd2_lib
from diffdistill.losses import dsm as dsm_lib
from diffdistill.solvers import heun
from diffdistill.solvers.grid_points import grid_time
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]


def trajectory_function(denoise: Apply, *, schedule: schedules_lib.Schedule) -> Apply:
  """G(params, x, t, s, **cond) = (sigma_s/sigma_t) x + alpha_s (1 - sh_s/sh_t) g(x, t, s=s).

  Args:
    denoise: g, a denoiser conditioned on the target time: `denoise(params, x, t, *, s, **cond)`.
    schedule: its forward process.
  Returns:
    G with t, s of shape [B] (or scalars): the state at time s of the trajectory through x at t.
  """

  def G(params, x, t, s, **cond):
    tb = schedules_lib.broadcast_to(jnp.asarray(t, x.dtype), x)
    sb = schedules_lib.broadcast_to(jnp.asarray(s, x.dtype), x)
    a_t, sig_t = schedule.alpha(tb), schedule.sigma(tb)
    a_s, sig_s = schedule.alpha(sb), schedule.sigma(sb)
    ratio = (sig_s / a_s) / (sig_t / a_t)  # sh_s / sh_t: exactly 1 at s = t
    s_b = jnp.broadcast_to(jnp.asarray(s, x.dtype), x.shape[:1])
    g = denoise(params, x, t, s=s_b, **cond)
    return (sig_s / sig_t * x + a_s * (1.0 - ratio) * g).astype(x.dtype)

  return G


def ctm_terms(G: Apply, params: Any, target_params: Any, x_t: Array, t: Array, s: Array,
              x_u: Array, u: Array, *, t_end: Array, dist: Callable, **cond) -> tuple[Array, Array,
                                                                                    Array]:
  """Per-example dist(G_sg(G_theta(x_t, t, s), s, t_end), G_sg(G_sg(x_u, u, s), s, t_end)), [B].

  target_params are stop-gradiented here (the values of the EMA or of theta itself); the online
  estimate is still differentiated through the outer map's x-argument. Returns (terms, x_est,
  x_target).
  """
  tp = jax.lax.stop_gradient(target_params)
  x_target = jax.lax.stop_gradient(G(tp, G(tp, x_u, u, s, **cond), s, t_end, **cond))
  x_est = G(tp, G(params, x_t, t, s, **cond), s, t_end, **cond)
  return dist(x_est, x_target), x_est, x_target


def ctm_loss(denoise: Apply, teacher: Apply, *, schedule: schedules_lib.Schedule,
             solver_step: Callable = heun.heun_step, num_steps: int = 18,
             spacing: str = "karras", max_solver_steps: int | None = None,
             distance: str | Callable = "l2", dsm_weight: float = 1.0,
             dsm_weighting: str = "truncated_snr", gan_weight: float = 0.0,
             features: Callable | None = None, head: Callable = dmd2_lib.linear_head,
             gan_start: int = 0, gan_time_sampler: schedules_lib.TimeSampler | str = "uniform",
             t_start: float | None = None, t_end: float | None = None, dropout: bool = False,
             **distance_options) -> Callable[..., tuple[Array, dict]]:
  """CTM's soft consistency loss with its DSM term (module docstring).

  Args:
    denoise: g(params, x, t, *, s, **cond), the s-conditioned student denoiser.
    teacher: the teacher denoiser apply(params, x, t, **cond).
    schedule: the forward process of both.
    solver_step: a public single step `step(denoise, x, t_s, t_t, *, schedule)` (Heun, DDIM, ...),
      applied once per grid interval between t and u.
    num_steps: N, the grid's intervals (the paper's N = 18 points on CIFAR-10 is N = 17 here).
    spacing: the grid (grids.SPACINGS; 'karras' is the paper's).
    max_solver_steps: the most teacher steps from t to u (the official code's num_heun_step;
      None: up to s). It is also the fixed trip count of the teacher loop.
    distance: 'l2', 'l1', 'pseudo_huber' or a callable fn(x, y) -> [B]; distance_options go to it.
    dsm_weight: lambda_DSM (0 drops the term and its network call).
    dsm_weighting: the DSM term's x0 weighting (`losses.dsm.WEIGHTINGS`).
    gan_weight: lambda_GAN (0: no GAN term, no discriminator).
    features: with gan_weight > 0, features(feature_params, x_tau, tau) -> [B, F] of the frozen
      feature network the discriminator's head reads.
    head: the discriminator head(discriminator_params, features) -> logits [B].
    gan_start: the GAN term is off before this step (the paper warms up without it).
    gan_time_sampler: the noise level tau the discriminator sees samples at.
    t_start, t_end: the grid's range (default the schedule's; t_end is "time 0").
    dropout: pass one shared `dropout_rng` to every student call.

  Returns:
    loss_fn(params, batch, rng, *, teacher_params, target_params) -> (loss, aux); aux: ctm, dsm,
    l2 (x_est vs x_target), nonfinite. With gan_weight > 0 it also takes discriminator_params,
    feature_params and step, and aux holds gan (L_GAN, before its weight).
  """
  if gan_weight < 0:
    raise ValueError(f"gan_weight must be >= 0, got {gan_weight}.")
  if gan_weight > 0 and features is None:
    raise ValueError("gan_weight > 0 needs features(feature_params, x_t, t): the frozen feature "
                     "network the discriminator's head reads.")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if max_solver_steps is not None and not 1 <= max_solver_steps:
    raise ValueError(f"max_solver_steps must be None or >= 1, got {max_solver_steps}.")
  if dsm_weight < 0:
    raise ValueError(f"dsm_weight must be >= 0, got {dsm_weight}.")
  dist = distances.get(distance, **distance_options)
  weight_fn = dsm_lib.x0_weighting(dsm_weighting)
  G = trajectory_function(denoise, schedule=schedule)
  loops = num_steps if max_solver_steps is None else min(max_solver_steps, num_steps)

  def draw(x0, i_rng, j_rng, z_rng):
    """The CTM draw shared by the loss and the discriminator: i ~ U{0..N-1}, j ~ U{i+1..N} on
    the N-interval grid, x_t at t = t_i. Returns (N, grid(idx) -> time, i, j, x_t)."""
    b = x0.shape[0]
    n = jnp.int32(num_steps)
    grid = lambda idx: grid_time(schedule, idx, n, spacing=spacing, t_start=t_start,  # noqa: E731
                                 t_end=t_end, dtype=x0.dtype)
    i = jax.random.randint(i_rng, (b,), 0, n)
    j = jax.random.randint(j_rng, (b,), i + 1, n + 1)
    x_t = _common.noised(schedule, x0, grid(i), jax.random.normal(z_rng, x0.shape, x0.dtype))
    return n, grid, i, j, x_t

  def loss_fn(params: Any, batch: Mapping[str, Array], rng: Array, *, teacher_params: Any,
              target_params: Any, **gan_inputs) -> tuple[Array, dict]:
    if set(gan_inputs) != ({"discriminator_params", "feature_params", "step"} if gan_weight else set()):
      raise ValueError("ctm_loss takes discriminator_params, feature_params and step exactly when "
                       f"gan_weight > 0 (gan_weight = {gan_weight}); got {sorted(gan_inputs)}.")
    x0 = _common.data(batch)
    b = x0.shape[0]
    i_rng, j_rng, k_rng, z_rng, d_rng = jax.random.split(rng, 5)
    n, grid, i, j, x_t = draw(x0, i_rng, j_rng, z_rng)
    k = jax.random.randint(k_rng, (b,), i + 1, jnp.minimum(j, i + loops) + 1)
    t, s, u, t0 = grid(i), grid(j), grid(k), grid(jnp.full((b,), n))
    cond = _common.condition(batch)
    extra = {"dropout_rng": d_rng} if dropout else {}
    teach = lambda x, tt: teacher(teacher_params, x, tt, **cond)  # noqa: E731

    def solver(m, x):
      # every example takes `loops` steps; those past u (m >= k - i) keep their state
      a = jnp.minimum(i + m, n - 1)
      y = solver_step(teach, x, grid(a), grid(a + 1), schedule=schedule)
      return jnp.where(schedules_lib.broadcast_to(i + m < k, x), y, x)

    x_u = jax.lax.stop_gradient(jax.lax.fori_loop(0, loops, solver, x_t))
    terms, x_est, x_target = ctm_terms(G, params, target_params, x_t, t, s, x_u, u, t_end=t0,
                                       dist=dist, **cond, **extra)
    if dsm_weight:
      g = denoise(params, x_t, t, s=t, **cond, **extra)
      dsm_terms = weight_fn(schedule.logsnr(t)) * distances.l2(g, x0)
    else:
      dsm_terms = jnp.zeros_like(terms)
    total = terms + dsm_weight * dsm_terms
    aux = {"ctm": jnp.mean(terms), "dsm": jnp.mean(dsm_terms),
           "l2": jnp.mean(distances.l2(x_est, x_target))}
    if gan_weight:
      logit = discriminator_logits(gan_inputs["discriminator_params"], gan_inputs["feature_params"],
                                   x_est, jax.random.fold_in(rng, 7))
      gan_terms = jax.nn.softplus(-logit)  # [B]
      on = (jnp.asarray(gan_inputs["step"]) >= gan_start).astype(total.dtype)
      total = total + on * gan_weight * gan_terms
      aux["gan"] = jnp.mean(gan_terms)
    aux["nonfinite"] = jnp.sum(~jnp.isfinite(total))
    return jnp.mean(total), aux

  def discriminator_logits(disc_params, feature_params, x, rng):
    x_tau, tau, _ = dm_noised(x, rng)
    return head(disc_params, features(feature_params, x_tau, tau))

  sampler = schedules_lib.resolve_time_sampler(gan_time_sampler, "gan_time_sampler")

  def dm_noised(x, rng):
    return dm_lib.noised(x, rng, schedule=schedule, sampler=sampler)

  def estimate(params, target_params, batch, rng):
    """x_est of a fresh CTM draw (the same (t, s) law as the loss; no teacher call)."""
    x0 = _common.data(batch)
    n, grid, i, j, x_t = draw(x0, *jax.random.split(rng, 3))
    t, s, t0 = grid(i), grid(j), grid(jnp.full((x0.shape[0],), n))
    cond = _common.condition(batch)
    tp = jax.lax.stop_gradient(target_params)
    return x0, G(tp, G(params, x_t, t, s, **cond), s, t0, **cond)

  def disc_loss_fn(params: Any, batch: Mapping[str, Array], rng: Array, *, student_params: Any,
                   target_params: Any, feature_params: Any) -> tuple[Array, dict]:
    """L_D: data against the student's time-0 estimates (stop-gradient), both through the frozen
    features; aux: real_logit, fake_logit (means), accuracy, nonfinite."""
    e_rng, r_rng, f_rng = jax.random.split(rng, 3)
    x0, x_est = estimate(student_params, target_params, batch, e_rng)
    l_real = discriminator_logits(params, feature_params, x0, r_rng)
    l_fake = discriminator_logits(params, feature_params, jax.lax.stop_gradient(x_est), f_rng)
    terms = jax.nn.softplus(-l_real) + jax.nn.softplus(l_fake)
    return jnp.mean(terms), {"real_logit": jnp.mean(l_real), "fake_logit": jnp.mean(l_fake),
                             "accuracy": 0.5 * (jnp.mean(l_real > 0) + jnp.mean(l_fake < 0)),
                             "nonfinite": jnp.sum(~jnp.isfinite(terms))}

  loss_fn.discriminator_loss = disc_loss_fn
  return loss_fn


def consistency_trajectory_model(denoise: Apply, teacher: Apply, *, ema_target: bool = True,
                                 **options) -> Method:
  """CTM as a method: frozen `teacher`; target the student's EMA "target" copy (Player.create(
  ema={"target": mu})), or (ema_target=False) its own params. With gan_weight > 0 (and
  `features`): a "discriminator" player (init e.g. `dmd2.init_linear_head(F)`) updates first, and
  frozen "features" holds the feature network's params."""
  target = "players/student/ema/target" if ema_target else "players/student/params"
  loss_fn = ctm_loss(denoise, teacher, **options)
  inputs = {"teacher_params": "frozen/teacher", "target_params": target}
  if not options.get("gan_weight"):
    return Method(name="ctm", updates=(Update(player="student", loss_fn=loss_fn, inputs=inputs),))
  # with the GAN term: a "discriminator" player (the head's params) updates first, on the
  # student's current estimates; frozen "features" holds the feature network's params
  return Method(name="ctm", updates=(
      Update(player="discriminator", loss_fn=loss_fn.discriminator_loss,
             inputs={"student_params": "players/student/params", "target_params": target,
                     "feature_params": "frozen/features"}),
      Update(player="student", loss_fn=loss_fn,
             inputs={**inputs, "discriminator_params": "players/discriminator/params",
                     "feature_params": "frozen/features", "step": "step"})))


def gamma_sample(G: Apply, params: Any, x: Array, *, schedule: schedules_lib.Schedule,
                 times: Sequence[float], gamma: float, rng: Array | None = None,
                 t_end: float | None = None, **cond) -> Array:
  """CTM's gamma-sampling (module docstring): len(times) calls of G, ending at t_end.

  Args:
    G: the trajectory function (`trajectory_function`).
    params: its params.
    x: the start state at times[0], [B, ...].
    schedule: the forward process.
    times: the NFE = len(times) decreasing times where G is called, times[0] the start.
    gamma: in [0, 1]; 0 deterministic jumps, 1 multistep consistency sampling.
    rng: the key of the re-noising draws (needed when gamma > 0 and NFE > 1).
    t_end: the time of the returned state (default schedule.t_min).
  Returns:
    the state at t_end, [B, ...].
  """
  times = [float(t) for t in times]
  t_end = float(schedule.t_min if t_end is None else t_end)
  if not times or any(b >= a for a, b in zip(times, times[1:])) or times[-1] <= t_end:
    raise ValueError(f"times must be a non-empty decreasing sequence above t_end={t_end}, got "
                     f"{times}.")
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"gamma must lie in [0, 1], got {gamma}.")
  if gamma > 0 and len(times) > 1 and rng is None:
    raise ValueError("gamma_sample: gamma > 0 with more than one step needs rng.")
  if gamma == 0.0:  # deterministic jumps t_0 -> t_1 -> ... -> t_end: the flow-map pushforward
    return _common.pushforward(G, params, x, times=[*times, t_end], **cond)
  b = x.shape[0]

  def sh(tt):  # host floats: the times are concrete, also when the sampler is traced under jit
    with jax.ensure_compile_time_eval():
      return float(schedule.sigma(jnp.asarray(tt)) / schedule.alpha(jnp.asarray(tt)))

  full = lambda tt: jnp.full((b,), tt, x.dtype)  # noqa: E731
  for n, (t, t_next) in enumerate(zip(times, times[1:])):
    if gamma == 1.0 or math.sqrt(1.0 - gamma * gamma) * sh(t_next) <= sh(t_end):
      t_tilde = t_end
    else:  # the time where sh = sqrt(1 - gamma^2) sh_{n+1}: logsnr = -2 ln sh
      lam = -2.0 * math.log(math.sqrt(1.0 - gamma * gamma) * sh(t_next))
      with jax.ensure_compile_time_eval():
        t_tilde = float(schedule.t_from_logsnr(jnp.asarray(lam)))
    x_tilde = G(params, x, full(t), full(t_tilde), **cond)
    tn, tt = jnp.asarray(t_next, x.dtype), jnp.asarray(t_tilde, x.dtype)
    z = jax.random.normal(jax.random.fold_in(rng, n), x.shape, x.dtype)
    x = schedule.alpha(tn) / schedule.alpha(tt) * x_tilde + gamma * schedule.sigma(tn) * z
  return G(params, x, full(times[-1]), full(t_end), **cond)


__all__ = ["trajectory_function", "ctm_terms", "ctm_loss", "consistency_trajectory_model",
           "gamma_sample"]
