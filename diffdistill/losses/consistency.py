"""Consistency models: distillation (CD), training (CT), improved training (iCT) and ECT.

A consistency function maps every point of a probability-flow trajectory to the trajectory's end
at t_min = epsilon, in data scale: f(x_t, t) = Phi_{t -> t_min}(x_t) / alpha(t_min), so that
alpha(t_min) f is the state at t_min. The boundary condition f(x, t_min) = x / alpha(t_min) holds
by construction (`consistency_function`): on the scale-free state xh = x / alpha at noise level
sh = sigma / alpha, with e = sh(t_min) and sd = sigma_data,

    f(x, t)  = c_skip(t) xh + c_out(t) F(x, t),
    c_skip   = sd^2 / ((sh - e)^2 + sd^2),      c_out = sd (sh - e) / sqrt(sd^2 + sh^2)

(Song et al. 2023, Appendix C, written for any schedule). Any denoiser D of the library is turned
into such an F through EDM's coefficients, F = (D - c_skip_edm xh) / c_out_edm, so that
f = c_skip xh + ((sh - e) / sh) (D - c_skip_edm xh): at e -> 0 f is D itself (a student
initialized from an EDM-preconditioned teacher starts as the teacher), and at t_min f = xh.

Consistency distillation (CD) and training (CT) on the N-interval grid t_0 > ... > t_N
(`solvers.grid_points.grid_time`, traced: N may change with the step without a recompile), with
n drawn per example, t = t_n, t' = t_{n+1} and one draw z ~ N(0, I):

    x_t   = alpha_t x0 + sigma_t z
    CD:   x_t' = step_teacher(x_t; t -> t')       any public single step: ddim_step, heun_step, ...
    CT:   x_t' = alpha_t' x0 + sigma_t' z          (the same z: the DDIM step of the one-sample
                                                    denoiser x0, Song et al. Thm. 2)
    L     = E lambda(t, t') dist(f_theta(x_t, t), sg f_theta-(x_t', t'))

with theta- the EMA "target" copy (decay mu, or mu(k) for CT) or theta itself (mu = 0; iCT, ECT).
The online and the target call share the dropout rng (`dropout=True`). dist is any of
`losses.distances` (l2, l1, pseudo-Huber) or a callable feature distance.

Curricula (k = step, K = total steps; `ct_num_steps`, `ct_mu`, `ict_num_steps` return the number
of intervals N(k) - 1 as an int32 scalar, so they run inside the jitted step):

    CT   N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1,   mu(k) = exp(s0 log mu0 / N(k))
    iCT  N(k) = min(s0 2^floor(k / K'), s1) + 1,  K' = floor(K / (log2 floor(s1 / s0) + 1))

iCT (Song & Dhariwal 2024) also draws n from the discretised lognormal
p(n) ~ erf((ln sh(t_n) - P_mean) / (sqrt 2 P_std)) - erf((ln sh(t_n+1) - P_mean) / (sqrt 2 P_std)),
weights lambda = 1 / (sh(t_n) - sh(t_n+1)), uses pseudo-Huber with c = 0.00054 sqrt(d), and no EMA
target (mu = 0). ECT (Geng et al. 2024) makes the pair continuous: sh(t) lognormal,
sh(t') = sh(t) (1 - d(k) n(sh)), n(sh) = 1 + 8 sigmoid(-sh), with a gap
d(k) = q^-(floor(k / K_s) + 1) (1/q in the first stage, q = 2 on CIFAR-10, 4 on ImageNet),
lambda = 1 / (sh - sh'), mu = 0, from the teacher's weights.

Multistep consistency sampling (`multistep_sample`, Song et al. Alg. 1): x0 = f(x_T, t_0), then
for each later time t_i: x = alpha_i x0 + sigma_i z_i, x0 = f(x, t_i); one f call per time.

References:
  Song, Dhariwal, Chen & Sutskever, Consistency Models, ICML 2023 (Alg. 1-3, Appendix C).
  Song & Dhariwal, Improved Techniques for Training Consistency Models, ICLR 2024.
  Geng et al., Consistency Models Made Easy (ECT), 2024.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from diffdistill import _validate, parametrization
from diffdistill import schedules as schedules_lib
from diffdistill.losses import _common, distances
from diffdistill.solvers import ddim
from diffdistill.solvers.grid_points import grid_time
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]
WEIGHTINGS = ("uniform", "inverse_delta_sigma")


# ----------------------------------------------------------------------------------------------
# The boundary-condition parametrization
# ----------------------------------------------------------------------------------------------


def _sigma_hat(schedule, t):
  t = jnp.asarray(t)
  return schedule.sigma(t) / schedule.alpha(t)


def boundary_coefficients(t: Array, *, schedule: schedules_lib.Schedule, sigma_data: float,
                          t_min: float | None = None) -> tuple[Array, Array]:
  """(c_skip, c_out) at t: sd^2 / ((sh - e)^2 + sd^2) and sd (sh - e) / sqrt(sd^2 + sh^2).

  sh = sigma(t) / alpha(t), e = sh(t_min) (default the schedule's t_min): c_skip(t_min) = 1,
  c_out(t_min) = 0 exactly, so f(x, t_min) = x / alpha(t_min).
  """
  t_min = schedule.t_min if t_min is None else t_min
  sh = _sigma_hat(schedule, t)
  e = _sigma_hat(schedule, jnp.asarray(t_min, sh.dtype))
  sd2 = sigma_data * sigma_data
  c_skip = sd2 / (jnp.square(sh - e) + sd2)
  c_out = sigma_data * (sh - e) * jax.lax.rsqrt(sd2 + sh * sh)
  return c_skip, c_out


def consistency_function(denoise: Apply, *, schedule: schedules_lib.Schedule,
                         sigma_data: float | None = None, t_min: float | None = None) -> Apply:
  """f(params, x, t, **cond) = c_skip xh + ((sh - e) / sh) (D(x, t) - c_skip_edm xh) (module doc).

  Args:
    denoise: any denoiser `apply(params, x, t, **cond) -> x0_hat`.
    schedule: its forward process.
    sigma_data: the data scale of c_skip (default `parametrization.resolve_sigma_data`).
    t_min: the boundary time epsilon (default schedule.t_min).
  Returns:
    The consistency function, same signature; f(x, t_min) = x / alpha(t_min).
  """
  sd = parametrization.resolve_sigma_data(schedule, sigma_data)
  t_min = float(schedule.t_min if t_min is None else t_min)

  def f(params, x, t, **cond):
    tb = schedules_lib.broadcast_to(jnp.asarray(t, x.dtype), x)
    alpha = schedule.alpha(tb)
    sh = schedule.sigma(tb) / alpha
    e = _sigma_hat(schedule, jnp.asarray(t_min, x.dtype))
    xh = x / alpha
    c_skip, _ = boundary_coefficients(tb, schedule=schedule, sigma_data=sd, t_min=t_min)
    c_skip_edm = sd * sd / (sh * sh + sd * sd)
    # c_out / c_out_edm = (sh - e) / sh exactly: the two share the factor sd / sqrt(sd^2 + sh^2)
    out = c_skip * xh + (sh - e) / sh * (denoise(params, x, t, **cond) - c_skip_edm * xh)
    return out.astype(x.dtype)

  return f


# ----------------------------------------------------------------------------------------------
# Curricula (traced functions of the global step)
# ----------------------------------------------------------------------------------------------


def ct_num_steps(step: Array, *, total_steps: int, s0: int = 2, s1: int = 150) -> Array:
  """CT's N(k) - 1 intervals, N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1."""
  k = jnp.asarray(step, jnp.float32)
  n = jnp.ceil(jnp.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1.0) + 1.0
  return jnp.clip(n - 1.0, 1.0, s1).astype(jnp.int32)


def ct_mu(*, total_steps: int, mu0: float = 0.9, s0: int = 2, s1: int = 150) -> Callable:
  """CT's EMA decay of the target as a function of the step: mu(k) = exp(s0 log mu0 / N(k))."""
  if not 0.0 <= mu0 < 1.0:
    raise ValueError(f"mu0 must lie in [0, 1), got {mu0}.")

  if mu0 == 0.0:
    return lambda step: jnp.zeros((), jnp.float32)

  def mu(step):
    n_points = ct_num_steps(step, total_steps=total_steps, s0=s0, s1=s1) + 1
    return jnp.exp(s0 * math.log(mu0) / n_points.astype(jnp.float32))

  return mu


def ict_num_steps(step: Array, *, total_steps: int, s0: int = 10, s1: int = 1280) -> Array:
  """iCT's N(k) - 1 intervals: min(s0 2^floor(k / K'), s1), K' = floor(K / (log2(s1/s0) + 1))."""
  k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
  doublings = jnp.asarray(step, jnp.int32) // k_prime
  n = s0 * jnp.left_shift(jnp.int32(1), jnp.minimum(doublings, 30))
  return jnp.minimum(n, s1).astype(jnp.int32)


def ect_gap(step: Array, *, stage_steps: int, q: float = 2.0) -> Array:
  """ECT's relative gap d(k) = q^-(floor(k / K_s) + 1): 1/q in the first stage, then divided by
  q every stage (Geng et al.'s 1/q^a with a = ceil(k / K_s); their code's 1/q^(stage + 1))."""
  stage = jnp.floor(jnp.asarray(step, jnp.float32) / stage_steps)
  return jnp.power(jnp.float32(q), -(stage + 1.0))


# ----------------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------------


def _check_weighting(weighting):
  if weighting not in WEIGHTINGS:
    raise ValueError(f"Unknown weighting {weighting!r}; expected one of {WEIGHTINGS}.")
  return weighting


def _pair_loss(student, schedule, dist, weighting, dropout):
  """The shared tail: lambda(t, t') dist(f_theta(x_t, t), sg f_target(x_t', t')), per example."""

  def terms(params, target_params, x_t, t, x_tp, tp, rng, cond):
    extra = {"dropout_rng": rng} if dropout else {}
    online = student(params, x_t, t, **cond, **extra)
    target = jax.lax.stop_gradient(student(target_params, x_tp, tp, **cond, **extra))
    d = dist(online, target)  # [B]
    if weighting == "inverse_delta_sigma":
      w = 1.0 / (_sigma_hat(schedule, t) - _sigma_hat(schedule, tp))
    else:
      w = jnp.ones_like(d)
    return w * d, online, target

  return terms


def _aux(terms, online, target, n):
  return {"l2": jnp.mean(distances.l2(online, target)), "num_intervals": n.astype(jnp.float32),
          "nonfinite": jnp.sum(~jnp.isfinite(terms))}


def _sample_intervals(rng, b, n, *, lognormal, max_intervals, grid):
  """n_i ~ U{0..N-1}, or iCT's discretised lognormal over the N intervals of `grid`."""
  if lognormal is None:
    return jax.random.randint(rng, (b,), 0, n)
  p_mean, p_std = lognormal
  j = jnp.arange(max_intervals)
  lo = jnp.log(grid(j + 1, n))  # ln sh at the low (clean) end of interval j
  hi = jnp.log(grid(j, n))
  cdf = lambda v: erf((v - p_mean) / (math.sqrt(2.0) * p_std))  # noqa: E731
  mass = jnp.cumsum(jnp.where(j < n, jnp.maximum(cdf(hi) - cdf(lo), 0.0), 0.0))
  # inverse-CDF draw: O(b log N), where a Gumbel-max categorical draws b x N noise (30 ms a step
  # at b = 512, N = 1281 on 2 CPU cores: most of an iCT step on a small network)
  u = jax.random.uniform(rng, (b,), mass.dtype) * mass[-1]
  return jnp.minimum(jnp.searchsorted(mass, u, side="right"), n - 1)


def _make_grid(schedule, spacing, t_start, t_end, dtype, *, sigma_hat=False):
  def grid(i, n):
    t = grid_time(schedule, i, n, spacing=spacing, t_start=t_start, t_end=t_end, dtype=dtype)
    return _sigma_hat(schedule, t) if sigma_hat else t
  return grid


def cd_loss(student: Apply, teacher: Apply, *, schedule: schedules_lib.Schedule,
            solver_step: Callable = ddim.ddim_step, num_steps: int = 18, spacing: str = "karras",
            distance: str | Callable = "l2", weighting: str = "uniform",
            t_start: float | None = None, t_end: float | None = None, dropout: bool = False,
            **distance_options) -> Callable[..., tuple[Array, dict]]:
  """Consistency distillation (module docstring).

  Args:
    student: the consistency function f(params, x, t, **cond) (`consistency_function`).
    teacher: the teacher denoiser apply(params, x, t, **cond).
    schedule: the forward process of both.
    solver_step: a public single step `step(denoise, x, t_s, t_t, *, schedule)` (DDIM, Heun, ...).
    num_steps: N >= 1, the grid's intervals (the paper's N - 1; N = 18 points for CIFAR-10).
    spacing: the grid (grids.SPACINGS; 'karras' is the paper's).
    distance: 'l2', 'l1', 'pseudo_huber' or a callable fn(x, y) -> [B]; distance_options go to it.
    weighting: 'uniform' or 'inverse_delta_sigma' (1 / (sh_t - sh_t')).
    t_start, t_end: the grid's range (default the schedule's; t_end is the boundary epsilon).
    dropout: pass one shared `dropout_rng` to the online and the target call.

  Returns:
    loss_fn(params, batch, rng, *, teacher_params, target_params) -> (loss, aux); batch =
    {"x": [B, ...] (, "label")}. target_params: the EMA copy, or the student's own params
    (mu = 0; only `params` is differentiated). aux: l2, num_intervals, nonfinite.
  """
  if not callable(solver_step):
    raise ValueError(f"solver_step must be a single-step function step(denoise, x, t_s, t_t, *, "
                     f"schedule), e.g. solvers.ddim_step or solvers.heun_step; got {solver_step!r}.")
  _validate.check_int("num_steps", num_steps, min=1)
  dist = distances.get(distance, **distance_options)
  _check_weighting(weighting)
  pair = _pair_loss(student, schedule, dist, weighting, dropout)

  def loss_fn(params: Any, batch: Mapping[str, Array], rng: Array, *, teacher_params: Any,
              target_params: Any) -> tuple[Array, dict]:
    x0 = _common.data(batch)
    b = x0.shape[0]
    i_rng, z_rng, d_rng = jax.random.split(rng, 3)
    grid = _make_grid(schedule, spacing, t_start, t_end, x0.dtype)
    n = jnp.int32(num_steps)
    i = jax.random.randint(i_rng, (b,), 0, n)
    t, tp = grid(i, n), grid(i + 1, n)
    x_t = _common.noised(schedule, x0, t, jax.random.normal(z_rng, x0.shape, x0.dtype))
    cond = _common.condition(batch)
    teach = lambda x, tt: teacher(teacher_params, x, tt, **cond)  # noqa: E731
    x_tp = jax.lax.stop_gradient(solver_step(teach, x_t, t, tp, schedule=schedule))
    terms, online, target = pair(params, target_params, x_t, t, x_tp, tp, d_rng, cond)
    return jnp.mean(terms), _aux(terms, online, target, n)

  return loss_fn


def ct_loss(student: Apply, *, schedule: schedules_lib.Schedule, num_steps: Callable | int,
            spacing: str = "karras", distance: str | Callable = "l2", weighting: str = "uniform",
            lognormal: tuple[float, float] | None = None, max_intervals: int | None = None,
            t_start: float | None = None, t_end: float | None = None, dropout: bool = False,
            **distance_options) -> Callable[..., tuple[Array, dict]]:
  """Consistency training (CT; iCT with its options) (module docstring).

  Args:
    student: the consistency function f(params, x, t, **cond).
    schedule: the forward process.
    num_steps: N(k) - 1 as a function of the traced step (`ct_num_steps`, `ict_num_steps`
      through functools.partial), or a fixed int.
    spacing, distance, weighting, t_start, t_end, dropout, distance_options: as for `cd_loss`.
    lognormal: (P_mean, P_std) of iCT's discretised lognormal interval draw (None: uniform).
    max_intervals: the largest N(k) - 1 (the size of the lognormal's table; needed with lognormal).

  Returns:
    loss_fn(params, batch, rng, *, target_params, step) -> (loss, aux). aux: l2, num_intervals
    (N(k) - 1 at this step), nonfinite.
  """
  dist = distances.get(distance, **distance_options)
  _check_weighting(weighting)
  if lognormal is not None and not max_intervals:
    raise ValueError("ct_loss: lognormal interval sampling needs max_intervals (the curriculum's "
                     "largest N - 1, e.g. s1 = 1280 for iCT).")
  n_fn = num_steps if callable(num_steps) else (lambda step: jnp.int32(num_steps))
  pair = _pair_loss(student, schedule, dist, weighting, dropout)

  def loss_fn(params: Any, batch: Mapping[str, Array], rng: Array, *, target_params: Any,
              step: Array) -> tuple[Array, dict]:
    x0 = _common.data(batch)
    b = x0.shape[0]
    i_rng, z_rng, d_rng = jax.random.split(rng, 3)
    n = jnp.asarray(n_fn(step), jnp.int32)
    grid = _make_grid(schedule, spacing, t_start, t_end, x0.dtype)
    sh_grid = _make_grid(schedule, spacing, t_start, t_end, x0.dtype, sigma_hat=True)
    i = _sample_intervals(i_rng, b, n, lognormal=lognormal, max_intervals=max_intervals,
                          grid=sh_grid)
    t, tp = grid(i, n), grid(i + 1, n)
    z = jax.random.normal(z_rng, x0.shape, x0.dtype)
    x_t, x_tp = _common.noised(schedule, x0, t, z), _common.noised(schedule, x0, tp, z)
    cond = _common.condition(batch)
    terms, online, target = pair(params, target_params, x_t, t, x_tp, tp, d_rng, cond)
    return jnp.mean(terms), _aux(terms, online, target, n)

  return loss_fn


def ect_loss(student: Apply, *, schedule: schedules_lib.Schedule, stage_steps: int,
             q: float = 2.0, p_mean: float = -1.1, p_std: float = 2.0,
             distance: str | Callable = "l2",
             dropout: bool = False, **distance_options) -> Callable[..., tuple[Array, dict]]:
  """ECT (module docstring): continuous (t, t'), the gap divided by `q` every `stage_steps`
  (`ect_gap`), mu = 0.

  Returns:
    loss_fn(params, batch, rng, *, step) -> (loss, aux); the target is sg(f_params).
  """
  if not q > 1:
    raise ValueError(f"q (ECT's gap divisor per stage) must be > 1, got {q}.")
  dist = distances.get(distance, **distance_options)
  pair = _pair_loss(student, schedule, dist, "inverse_delta_sigma", dropout)
  sh_lo = float(_sigma_hat(schedule, jnp.asarray(schedule.t_min, jnp.float32)))
  sh_hi = float(_sigma_hat(schedule, jnp.asarray(schedule.t_max, jnp.float32)))

  def loss_fn(params, batch, rng, *, step):
    x0 = _common.data(batch)
    b = x0.shape[0]
    s_rng, z_rng, d_rng = jax.random.split(rng, 3)
    # sh lognormal, kept inside the schedule's range (t(sh) through logsnr = -2 ln sh)
    sh = jnp.clip(jnp.exp(p_mean + p_std * jax.random.normal(s_rng, (b,), x0.dtype)),
                  sh_lo * (1.0 + 1e-3), sh_hi)
    shp = jnp.maximum(sh * (1.0 - ect_gap(step, stage_steps=stage_steps, q=q)
                            * (1.0 + 8.0 * jax.nn.sigmoid(-sh))), sh_lo)
    t = jnp.clip(schedule.t_from_logsnr(-2.0 * jnp.log(sh)), schedule.t_min, schedule.t_max)
    tp = jnp.clip(schedule.t_from_logsnr(-2.0 * jnp.log(shp)), schedule.t_min, schedule.t_max)
    z = jax.random.normal(z_rng, x0.shape, x0.dtype)
    x_t, x_tp = _common.noised(schedule, x0, t, z), _common.noised(schedule, x0, tp, z)
    cond = _common.condition(batch)
    terms, online, target = pair(params, jax.lax.stop_gradient(params), x_t, t, x_tp, tp, d_rng,
                                 cond)
    aux = _aux(terms, online, target, jnp.int32(0))
    aux.pop("num_intervals")
    return jnp.mean(terms), {**aux, "gap": ect_gap(step, stage_steps=stage_steps, q=q)}

  return loss_fn


# ----------------------------------------------------------------------------------------------
# Methods and sampling
# ----------------------------------------------------------------------------------------------


def _target_source(ema: bool) -> str:
  return "players/student/ema/target" if ema else "players/student/params"


def consistency_distillation(student: Apply, teacher: Apply, *, ema_target: bool = True,
                             **options) -> Method:
  """CD as a method: frozen `teacher`; target the student's EMA "target" copy, or (ema_target=
  False, mu = 0) its own params. The player needs Player.create(ema={"target": mu})."""
  return Method(name="cd", updates=(Update(
      player="student", loss_fn=cd_loss(student, teacher, **options),
      inputs={"teacher_params": "frozen/teacher", "target_params": _target_source(ema_target)}),))


def consistency_training(student: Apply, *, ema_target: bool = True, name: str = "ct",
                         **options) -> Method:
  """CT / iCT as a method: no frozen input; the step drives N(k) (and mu(k) through the EMA)."""
  return Method(name=name, updates=(Update(
      player="student", loss_fn=ct_loss(student, **options),
      inputs={"target_params": _target_source(ema_target), "step": "step"}),))


def easy_consistency_tuning(student: Apply, **options) -> Method:
  """ECT as a method (mu = 0: no target input; the step drives the gap)."""
  return Method(name="ect", updates=(Update(
      player="student", loss_fn=ect_loss(student, **options), inputs={"step": "step"}),))


def multistep_sample(f: Apply, params: Any, x: Array, *, schedule: schedules_lib.Schedule,
                     times: Sequence[float], rng: Array, t_end: float | None = None,
                     **cond) -> Array:
  """Multistep consistency sampling: x0 = f(x, t_0); x = alpha_i x0 + sigma_i z_i, x0 = f(x, t_i).

  Args:
    f: the consistency function (data scale: alpha(t_end) f is the state at t_end).
    params: its params.
    x: the start state at times[0], [B, ...].
    schedule: the forward process.
    times: the len(times) = NFE times, times[0] the start, decreasing.
    rng: the key of the re-noising draws.
    t_end: the time of the returned state (default schedule.t_min): alpha(t_end) x0.
  Returns:
    alpha(t_end) x0, [B, ...]: exactly len(times) calls of f.
  """
  times = [float(t) for t in times]
  if not times or any(b >= a for a, b in zip(times, times[1:])):
    raise ValueError(f"times must be a non-empty decreasing sequence, got {times}.")
  t_end = float(schedule.t_min if t_end is None else t_end)
  b = x.shape[0]
  x0 = f(params, x, jnp.full((b,), times[0], x.dtype), **cond)
  for i, t in enumerate(times[1:]):
    z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    tt = jnp.asarray(t, x.dtype)
    x0 = f(params, schedule.alpha(tt) * x0 + schedule.sigma(tt) * z, jnp.full((b,), t, x.dtype),
           **cond)
  return (schedule.alpha(jnp.asarray(t_end, x.dtype)) * x0).astype(x.dtype)


__all__ = ["WEIGHTINGS", "boundary_coefficients", "consistency_function", "ct_num_steps", "ct_mu",
           "ict_num_steps", "ect_gap", "cd_loss", "ct_loss", "ect_loss",
           "consistency_distillation", "consistency_training", "easy_consistency_tuning",
           "multistep_sample"]
