"""Inductive moment matching (IMM; Zhou, Ermon & Song 2025): a flow map f(x_t; s, t) trained in
one stage by matching, group by group, the distribution of its (t -> s) jumps to that of its own
(r -> s) jumps from a slightly later time r in [s, t).

The flow map (the paper's "simple" parametrization, the same as CTM's trajectory function
`losses.ctm.trajectory_function`): a denoiser g(x_t, t, s) conditioned on the target time, and
one DDIM step from t to s towards it,

    f(x_t; s, t) = (sigma_s / sigma_t) x_t + c_out(s, t) g,   c_out(s, t) = alpha_s (1 - eta_s / eta_t)

(eta = sigma / alpha), so that f(x_s; s, s) = x_s exactly. One loss term takes a group of M
examples x^1..x^M that share (s, r, t) and their noises eps^i:

    t ~ the time sampler,  s ~ U(t_end, t),  r = max(s, eta^-1(eta_t - (eta_max - eta_min) / 2^k))
    x_t^i = alpha_t x^i + sigma_t eps^i,     x_r^i = alpha_r x^i + sigma_r eps^i
        (x_r^i is the DDIM interpolant between x^i and x_t^i: the same noise)
    y^i = f_theta(x_t^i; s, t),   ytil^i = f_sg(theta-)(x_r^i; s, r)
    L   = w(s, t) MMD^2_k({y^i}, {ytil^i})

with the Laplace kernel k(a, b) = exp(-max(||a - b||_2, eps) / (|c_out(s, t)| D)) (D: the data
dimension) and the weighting w(s, t) = 1/2 sigmoid(b - lambda_t) (-d lambda_t / dt)
alpha_t^a / (alpha_t^2 + sigma_t^2) (lambda: the logSNR). theta- is theta under a stop-gradient
(the paper's choice; an EMA copy can replace it).

The estimator. The paper's objective for two particles (its Eq. with x_t, x_t') is
k(y, y') + k(ytil, ytil') - k(y, ytil') - k(y', ytil): pairs of *different* particles only. Its
M-particle form here, `estimator="u"` (default), averages every distinct pair (i != j) of the
M x M kernel matrices: the unbiased MMD^2, whose expectation is the population MMD^2 between
the two jump distributions, so the exact flow map is a stationary point in expectation
(tests/test_imm.py). `estimator="v"` averages all M^2 pairs including i = j:

    V = ((M - 1) / M) U + (2 / M) mean_i (1 - k(y^i, ytil^i)),

the U statistic plus a pull of each particle towards its own target (a consistency model's loss
with the Laplace kernel's distance, ~||y - ytil|| / length when close: the paper's M = 1 limit),
of weight 2 / (M - 1) relative to U. It biases the minimiser by O(1/M) and ties each particle's
t -> s jump to its own r -> s jump along the same (x, eps), which keeps one call's mode weights
on gmm64 (docs/consistency.md, IMM).

Sampling (pushforward): x <- f(x; t_{i+1}, t_i) along t_start = t_0 > ... > t_n = t_end.

References:
  Zhou, Ermon & Song, Inductive Moment Matching, ICML 2025 (Sec. 4-5: the loss, r(s, t) by a
  constant decrement in eta, the Laplace kernel with 1/|c_out|, the weighting, M = 4 particles,
  its ablation of k; Alg. 1-2).
  Gretton et al., A Kernel Two-Sample Test, JMLR 2012 (the unbiased MMD^2 estimator).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import _common, ctm as ctm_lib
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]
ESTIMATORS = ("u", "v")


def eta(schedule: schedules_lib.Schedule, t: Array) -> Array:
  """sigma(t) / alpha(t), increasing in t."""
  return schedule.sigma(t) / schedule.alpha(t)


def c_out(schedule: schedules_lib.Schedule, s: Array, t: Array) -> Array:
  """alpha_s (1 - eta_s / eta_t): the weight of the denoiser in f(x_t; s, t) (0 at s = t)."""
  return schedule.alpha(s) * (1.0 - eta(schedule, s) / eta(schedule, t))


def eta_decrement(schedule: schedules_lib.Schedule, *, k: float, t_min: float,
                  t_max: float) -> float:
  """(eta(t_max) - eta(t_min)) / 2^k, the step of r(s, t) in eta (a host float)."""
  with jax.ensure_compile_time_eval():
    e_max, e_min = (float(eta(schedule, jnp.float32(u))) for u in (t_max, t_min))
  if not math.isfinite(e_max):
    raise ValueError(f"r(s, t) needs a finite sigma/alpha at t_max={t_max} (the schedule's "
                     f"{type(schedule).__name__} reaches alpha = 0 there): train with t_max below "
                     "it (e.g. RectifiedFlow(t_max=0.994), the paper's choice).")
  return (e_max - e_min) / 2.0 ** k


def r_of(schedule: schedules_lib.Schedule, s: Array, t: Array, *, k: float, t_min: float,
         t_max: float) -> Array:
  """r(s, t) = max(s, eta^-1(eta_t - (eta(t_max) - eta(t_min)) / 2^k)): a constant decrement in
  eta, clipped at s (and at t_min where eta_t is within the decrement of eta(t_min))."""
  gap = eta_decrement(schedule, k=k, t_min=t_min, t_max=t_max)
  e = eta(schedule, t) - gap
  ok = e > eta(schedule, jnp.full_like(t, t_min))
  lam = -2.0 * jnp.log(jnp.where(ok, e, 1.0))
  r = jnp.where(ok, schedule.t_from_logsnr(lam), t_min)
  return jnp.clip(jnp.maximum(r, s), s, t).astype(jnp.result_type(t))


def weighting(schedule: schedules_lib.Schedule, t: Array, *, a: float = 2.0,
              b: float = 4.0) -> Array:
  """w(t) = 1/2 sigmoid(b - lambda_t) (-d lambda_t / dt) alpha_t^a / (alpha_t^2 + sigma_t^2)."""
  al, sg = schedule.alpha(t), schedule.sigma(t)
  return (0.5 * jax.nn.sigmoid(b - schedule.logsnr(t)) * (-schedule.d_logsnr(t))
          * al ** a / (al ** 2 + sg ** 2))


def grouped_mmd2(y: Array, y_tgt: Array, scale: Array, *, estimator: str = "u",
                 eps: float = 1e-8) -> Array:
  """MMD^2 between {y[g, i]}_i and {y_tgt[g, i]}_i for every group g, [G].

  y, y_tgt: [G, M, ...]; scale: [G], the kernel k(a, b) = exp(-scale_g max(||a - b||_2, eps)).
  estimator: "u" (distinct pairs i != j in every term) or "v" (all M^2 pairs); module docstring.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
  g, m = y.shape[:2]
  if estimator == "u" and m < 2:
    raise ValueError(f"the 'u' estimator needs groups of at least 2 examples, got {m}.")
  a, b = y.reshape(g, m, -1), y_tgt.reshape(g, m, -1)
  sc = jnp.reshape(scale, (g, 1, 1))

  def gram(p, q):  # [G, M, M]; the clip keeps the gradient of the distance finite at 0
    sq = jnp.sum(jnp.square(p[:, :, None, :] - q[:, None, :, :]), axis=-1)
    return jnp.exp(-sc * jnp.sqrt(jnp.maximum(sq, eps * eps)))

  kyy, ktt, kyt = gram(a, a), gram(b, b), gram(a, b)
  if estimator == "v":
    return kyy.mean((1, 2)) + ktt.mean((1, 2)) - 2.0 * kyt.mean((1, 2))
  off = 1.0 - jnp.eye(m, dtype=kyy.dtype)
  n = m * (m - 1)
  return ((kyy * off).sum((1, 2)) + (ktt * off).sum((1, 2)) - 2.0 * (kyt * off).sum((1, 2))) / n


def imm_loss(flow_map: Apply, *, schedule: schedules_lib.Schedule, group_size: int = 4,
             k: float = 12.0, t_start: float | None = None, t_end: float | None = None,
             time_sampler: "schedules_lib.TimeSampler | str" = "uniform",
             estimator: str = "u", weight_a: float = 2.0, weight_b: float = 4.0,
             weighting_on: bool = True, kernel_eps: float = 1e-8, kernel_scale: float = 1.0
             ) -> Callable[..., tuple[Array, dict]]:
  """The IMM loss (module docstring).

  Args:
    flow_map: f(params, x, t, s, **cond) -> the state at time s (`flow_map_of`).
    schedule: the forward process.
    group_size: M, the particles per group; the batch is B / M groups of consecutive examples
      (the method declares it: `Update.group_size`).
    k: the decrement exponent of r(s, t): a step of (eta_max - eta_min) / 2^k (default 12; the
      paper ablates it on images; small k trains faster and coarser).
    t_start, t_end: the time range (defaults: the schedule's); t in [t_end, t_start].
    time_sampler: the distribution of t (clipped to the range).
    estimator: "u" or "v" (module docstring).
    weight_a, weight_b: a, b of w(s, t); weighting_on False uses w = 1.
    kernel_eps: the eps of the Laplace kernel's distance.
    kernel_scale: multiplies the kernel's inverse length 1 / (|c_out| D) (1: the paper's; the
      length D |c_out| is wide for low-dimensional data: on a 64-D mixture it exceeds the
      distance between modes ~10x, see docs/consistency.md).

  Returns:
    loss_fn(params, batch, rng[, *, target_params]) -> (loss, aux); aux: mmd2 (unweighted, mean
    over groups), weight (mean w), gap (mean (t - r) / (t - s)), nonfinite.
  """
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}.")
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
  if estimator == "u" and group_size < 2:
    raise ValueError("group_size must be >= 2 with estimator='u' (pairs of distinct particles).")
  if not k > 0:
    raise ValueError(f"k must be > 0, got {k}.")
  if not kernel_scale > 0:
    raise ValueError(f"kernel_scale must be > 0, got {kernel_scale}.")
  sampler = schedules_lib.resolve_time_sampler(time_sampler)
  t_hi = float(schedule.t_max if t_start is None else t_start)
  t_lo = float(schedule.t_min if t_end is None else t_end)
  if not t_lo < t_hi:
    raise ValueError(f"t_end ({t_lo}) must be below t_start ({t_hi}).")
  eta_decrement(schedule, k=k, t_min=t_lo, t_max=t_hi)  # a finite eta range, named early
  m = group_size

  def loss_fn(params: Any, batch, rng: Array, *, target_params: Any = None):
    x = _common.data(batch)
    b = x.shape[0]
    if b % m:
      raise ValueError(f"batch_size={b} is not a multiple of group_size={m}.")
    ng = b // m
    cond = _common.condition(batch)
    t_rng, s_rng, e_rng = jax.random.split(rng, 3)
    t = jnp.clip(sampler.sample(t_rng, (ng,), schedule=schedule, dtype=x.dtype), t_lo, t_hi)
    s = t_lo + jax.random.uniform(s_rng, (ng,), x.dtype) * (t - t_lo)
    r = r_of(schedule, s, t, k=k, t_min=t_lo, t_max=t_hi)
    per = lambda v: jnp.repeat(v, m)  # noqa: E731  group times -> example times [B]
    eps = jax.random.normal(e_rng, x.shape, x.dtype)
    x_t = _common.noised(schedule, x, per(t), eps)
    x_r = _common.noised(schedule, x, per(r), eps)
    y = flow_map(params, x_t, per(t), per(s), **cond)
    tgt_params = jax.lax.stop_gradient(params if target_params is None else target_params)
    y_tgt = jax.lax.stop_gradient(flow_map(tgt_params, x_r, per(r), per(s), **cond))
    d = x[0].size
    scale = kernel_scale / (jnp.abs(c_out(schedule, s, t)) * d)
    mmd = grouped_mmd2(y.reshape(ng, m, *x.shape[1:]), y_tgt.reshape(ng, m, *x.shape[1:]),
                       scale, estimator=estimator, eps=kernel_eps)
    w = (jax.lax.stop_gradient(weighting(schedule, t, a=weight_a, b=weight_b))
         if weighting_on else jnp.ones_like(t))
    terms = w * mmd
    aux = {"mmd2": jnp.mean(mmd), "weight": jnp.mean(w),
           "gap": jnp.mean((t - r) / jnp.maximum(t - s, 1e-12)),
           "nonfinite": jnp.sum(~jnp.isfinite(terms))}
    return jnp.mean(terms), aux

  return loss_fn


def flow_map_of(denoise: Apply, *, schedule: schedules_lib.Schedule) -> Apply:
  """f(params, x, t, s, **cond) = DDIM from t to s towards denoise(params, x, t, s=s) (the
  paper's simple parametrization; `losses.ctm.trajectory_function`)."""
  return ctm_lib.trajectory_function(denoise, schedule=schedule)


def imm(flow_map: Apply, *, group_size: int = 4, ema_target: bool = False, **options) -> Method:
  """IMM as a method: one update of the student on groups of `group_size` examples (kept whole
  by gradient accumulation); the target is the student under a stop-gradient, or its EMA copy
  "target" with `ema_target`. Options: `imm_loss`'s."""
  loss = imm_loss(flow_map, group_size=group_size, **options)
  inputs = {"target_params": "players/student/ema/target"} if ema_target else {}
  return Method(name="imm", updates=(Update(player="student", loss_fn=loss, inputs=inputs,
                                            group_size=group_size),))


# the few-step sampler x <- f(x; t_{i+1}, t_i) along decreasing times (shared by every flow map)
pushforward_sample = _common.pushforward


__all__ = ["ESTIMATORS", "eta", "c_out", "eta_decrement", "r_of", "weighting", "grouped_mmd2", "imm_loss",
           "flow_map_of", "imm", "pushforward_sample"]
