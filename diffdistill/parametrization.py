"""Network output parametrizations and their exact conversions to the data prediction x0.

With x = alpha x0 + sigma eps (alpha' = d alpha/dt, sigma' = d sigma/dt), a network of kind

    x0     predicts  x0
    eps    predicts  eps                      x0 = (x - sigma eps) / alpha
    v      predicts  v = alpha eps - sigma x0  x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)
    flow   predicts  u = alpha' x0 + sigma' eps
                                               x0 = (sigma u - sigma' x) / (sigma alpha' - sigma' alpha)
    score  predicts  s = grad log p_t = -eps / sigma
                                               x0 = (x + sigma^2 s) / alpha
    edm    predicts  F with  x0 = c_skip xh + c_out F(c_in xh, c_noise)

where the EDM preconditioning (Karras et al. 2022, Table 1) acts on the scale-free state
xh = x / alpha at noise level sh = sigma / alpha, so it works with every schedule:
c_skip = sd^2 / (sh^2 + sd^2), c_out = sh sd / sqrt(sh^2 + sd^2), c_in = 1 / sqrt(sh^2 + sd^2),
c_noise = log(sh) / 4 (sd = sigma_data).

All formulas are valid for any schedule, variance-preserving or not. `from_x0` gives the
training target of each kind, so `to_x0(from_x0(x0, x, t), x, t) == x0` up to rounding.

References:
  Ho et al., DDPM, 2020 (eps); Salimans & Ho, Progressive Distillation, ICLR 2022 (v);
  Lipman et al., Flow Matching, ICLR 2023 and Liu et al., Rectified Flow, ICLR 2023 (flow);
  Song et al., Score SDE, ICLR 2021 (score); Karras et al., EDM, NeurIPS 2022 (edm);
  Ho & Salimans, Classifier-Free Diffusion Guidance, 2022 (guided);
  Kingma et al., Variational Diffusion Models, NeurIPS 2021, Sec. 4 (rescheduled: a model is a
  function of the logSNR, so one trained on one schedule serves every other).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import _validate, schedules as schedules_lib

Array = jax.Array
KINDS = ("x0", "eps", "v", "flow", "score", "edm")
DEFAULT_SIGMA_DATA = 0.5  # EDM's value for images scaled to [-1, 1].


def check_kind(kind: str) -> str:
  """Raises a ValueError naming the accepted kinds if `kind` is not one of them."""
  if kind not in KINDS:
    raise ValueError(f"Unknown parametrization kind {kind!r}; expected one of {list(KINDS)}.")
  return kind


def resolve_sigma_data(schedule: schedules_lib.Schedule, sigma_data: float | None) -> float:
  """sigma_data as given, else the schedule's own (EDM, TrigFlow), else EDM's default 0.5."""
  schedule = schedules_lib.resolve(schedule)
  if sigma_data is None:
    sigma_data = getattr(schedule, "sigma_data", DEFAULT_SIGMA_DATA)
  if sigma_data <= 0:
    raise ValueError(f"sigma_data must be > 0, got {sigma_data}.")
  return float(sigma_data)


def edm_coefficients(sigma_hat: Array, sigma_data: float) -> tuple[Array, Array, Array, Array]:
  """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning at noise level sigma_hat = sigma/alpha."""
  sd2 = sigma_data * sigma_data
  denom = sigma_hat * sigma_hat + sd2
  c_skip = sd2 / denom
  c_out = sigma_hat * sigma_data * jax.lax.rsqrt(denom)
  c_in = jax.lax.rsqrt(denom)
  c_noise = 0.25 * jnp.log(sigma_hat)
  return c_skip, c_out, c_in, c_noise


def _coeffs(x, t, schedule):
  tb = schedules_lib.broadcast_to(t, x)
  return schedule.alpha(tb), schedule.sigma(tb), tb


_DIVIDE_BY_ALPHA = ("eps", "score", "edm")  # x0 = (...) / alpha: undefined where alpha = 0


def to_x0(out: Array, x: Array, t: Array, *, kind: str, schedule: schedules_lib.Schedule,
          sigma_data: float | None = None) -> Array:
  """Converts a network output of `kind` at (x, t) to the data prediction x0 (formulas above).

  Args:
    out: the network output, shape [B, ...] like x.
    x: the noisy state x_t, [B, ...].
    t: times, [B] or scalar.
    kind: one of KINDS.
    schedule: the forward process (or its registry name).
    sigma_data: EDM's data scale, used by kind 'edm' only (default: resolve_sigma_data).
  Returns:
    x0_hat, [B, ...], the dtype of x. Kinds 'eps', 'score' and 'edm' divide by alpha: where
    alpha(t) = 0 (a flow or TrigFlow schedule's noise end) a concrete t is a ValueError; a traced
    one gives inf/NaN there (keep t < t_max, or use 'x0', 'v' or 'flow').
  """
  check_kind(kind)
  schedule = schedules_lib.resolve(schedule)
  alpha, sigma, tb = _coeffs(x, t, schedule)
  if kind in _DIVIDE_BY_ALPHA and _validate.is_concrete(alpha) and np.any(np.asarray(alpha) == 0):
    t_bad = np.asarray(tb)[np.asarray(alpha) == 0].reshape(-1)[0]
    raise ValueError(f"kind={kind!r} cannot give x0 where alpha(t) = 0 (t = {t_bad} is the "
                     f"pure-noise end of {type(schedule).__name__}: x_t holds no data there); use "
                     f"kind 'x0', 'v' or 'flow', or times with alpha(t) > 0.")
  if kind == "x0":
    x0 = out
  elif kind == "eps":
    x0 = (x - sigma * out) / alpha
  elif kind == "v":
    x0 = (alpha * x - sigma * out) / (alpha * alpha + sigma * sigma)
  elif kind == "flow":
    da, ds = schedule.d_alpha(tb), schedule.d_sigma(tb)
    x0 = (sigma * out - ds * x) / (sigma * da - ds * alpha)
  elif kind == "score":
    x0 = (x + sigma * sigma * out) / alpha
  else:  # edm
    c_skip, c_out, _, _ = edm_coefficients(sigma / alpha, resolve_sigma_data(schedule, sigma_data))
    x0 = c_skip * (x / alpha) + c_out * out
  return x0.astype(x.dtype)


def from_x0(x0: Array, x: Array, t: Array, *, kind: str, schedule: schedules_lib.Schedule,
            sigma_data: float | None = None) -> Array:
  """The output a network of `kind` should produce at (x, t) when the clean data is x0.

  This is the regression target of denoising score matching in that parametrization;
  eps is recovered as (x - alpha x0) / sigma.
  """
  check_kind(kind)
  schedule = schedules_lib.resolve(schedule)
  alpha, sigma, tb = _coeffs(x, t, schedule)
  if kind == "x0":
    return x0
  if kind == "edm":
    c_skip, c_out, _, _ = edm_coefficients(sigma / alpha, resolve_sigma_data(schedule, sigma_data))
    return ((x0 - c_skip * (x / alpha)) / c_out).astype(x.dtype)
  eps = (x - alpha * x0) / sigma
  if kind == "eps":
    out = eps
  elif kind == "v":
    out = alpha * eps - sigma * x0
  elif kind == "flow":
    out = schedule.d_alpha(tb) * x0 + schedule.d_sigma(tb) * eps
  else:  # score
    out = -eps / sigma
  return out.astype(x.dtype)


def net_inputs(x: Array, t: Array, *, kind: str, schedule: schedules_lib.Schedule,
               sigma_data: float | None = None) -> tuple[Array, Array]:
  """What the raw network sees: (c_in x/alpha, c_noise) for 'edm', (x, t) for the other kinds."""
  check_kind(kind)
  if kind != "edm":
    return x, t
  schedule = schedules_lib.resolve(schedule)
  alpha, sigma, _ = _coeffs(x, t, schedule)
  sigma_hat = sigma / alpha
  _, _, c_in, _ = edm_coefficients(sigma_hat, resolve_sigma_data(schedule, sigma_data))
  # c_noise = log(sigma_hat) / 4 = -lambda / 8, taken from logsnr for its end-point accuracy.
  c_noise = -0.125 * schedule.logsnr(jnp.asarray(t))
  return (c_in * (x / alpha)).astype(x.dtype), c_noise


Apply = Callable[..., Array]


def as_denoiser(apply: Apply, *, kind: str, schedule: schedules_lib.Schedule,
                sigma_data: float | None = None) -> Apply:
  """Turns a raw network `apply(params, x, t, **cond)` of `kind` into a denoiser -> x0.

  The returned function has the same signature and returns x0_hat with x's shape and dtype.
  Options are resolved here, before any tracing.
  """
  check_kind(kind)
  schedule = schedules_lib.resolve(schedule)
  sd = resolve_sigma_data(schedule, sigma_data) if kind == "edm" else None

  def denoise(params, x, t, **cond):
    x_in, t_in = net_inputs(x, t, kind=kind, schedule=schedule, sigma_data=sd)
    out = apply(params, x_in, t_in, **cond)
    if out.shape != x.shape:
      raise ValueError(f"Network output shape {out.shape} does not match x's shape {x.shape}.")
    return to_x0(out, x, t, kind=kind, schedule=schedule, sigma_data=sd)

  return denoise


def guided(apply: Apply, w: float, *, null_cond: Mapping[str, Any]) -> Apply:
  """Classifier-free guidance on a denoiser: D_w = D(x | null) + w (D(x | cond) - D(x | null)).

  w = 1 is the plain conditional denoiser, w = 0 the unconditional one, w > 1 guides
  (Ho & Salimans 2022 write the same rule with w_theirs = w - 1). The conditional and
  null evaluations run as one batch of 2B, so a network is called once.

  Args:
    apply: a denoiser `apply(params, x, t, **cond)`.
    w: the guidance scale (a Python float or a traced scalar), or one per example [B].
    null_cond: for every conditioning keyword, its null value (e.g. {"label": num_classes}),
      broadcastable to that keyword's [B, ...] array.
  """

  def guided_apply(params, x, t, **cond):
    if set(cond) != set(null_cond):
      raise ValueError(f"guided: conditioning keywords {sorted(cond)} must match null_cond's "
                       f"{sorted(null_cond)}.")
    b = x.shape[0]
    t_b = jnp.broadcast_to(jnp.asarray(t), (b,))
    both = {k: jnp.concatenate([jnp.asarray(v),
                                jnp.broadcast_to(jnp.asarray(null_cond[k], jnp.asarray(v).dtype),
                                                 jnp.shape(v))])
            for k, v in cond.items()}
    d = apply(params, jnp.concatenate([x, x]), jnp.concatenate([t_b, t_b]), **both)
    d_cond, d_null = d[:b], d[b:]
    scale = jnp.asarray(w)
    if scale.ndim:  # per example: [B] -> [B, 1, ...]
      scale = scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim))
    return (d_null + scale * (d_cond - d_null)).astype(x.dtype)

  return guided_apply


def rescheduled(denoise: Apply, *, source: "schedules_lib.Schedule | str",
                target: "schedules_lib.Schedule | str") -> Apply:
  """A denoiser of schedule `source` as a denoiser of schedule `target`.

  x0 = E[x0 | x_t] depends on x_t only through the noise level: the target's state at t,
  x = alpha_T(t) x0 + sigma_T(t) eps, is the source's state at the time s of the same logSNR
  scaled by alpha_S(s) / alpha_T(t) = sigma_S(s) / sigma_T(t), so

      D_T(x, t) = D_S(k x, s),  s = t_S(lambda_T(t)),  k = (alpha_S + sigma_S)(s) / (alpha_T + sigma_T)(t)

  (the ratio of sums equals both ratios and stays finite where alpha_T or sigma_T is 0). Where the
  target's logSNR leaves the source's range [logsnr_min, logsnr_max] (a rectified flow's t = 1 is
  lambda = -inf; an EDM teacher stops at sigma_max), s is clipped to the source's end, the
  nearest noise level it knows. There the two ratios differ, and k is the one of the component
  that dominates: sigma_S / sigma_T below the range (the noise keeps the source's scale; the
  signal, at most e^(lambda/2) of it, is off) and alpha_S / alpha_T above it (the data keep
  their scale; the leftover noise is below the source's smallest). Derivatives in t are not
  finite where the target's logSNR is infinite (rectified flow's t = 1); derivatives in params
  and x are.

  Args:
    denoise: `denoise(params, x, t, **cond) -> x0_hat` on `source` (e.g. a trained teacher's).
    source: the schedule `denoise` was trained on.
    target: the schedule the returned denoiser takes its t in.
  Returns:
    `denoise_target(params, x, t, **cond) -> x0_hat` (t a scalar or [B]).
  """
  source = schedules_lib.resolve(source, argname="source")
  target = schedules_lib.resolve(target, argname="target")
  lo, hi = source.logsnr_min, source.logsnr_max

  def denoise_target(params, x, t, **cond):
    t = jnp.asarray(t, jnp.result_type(x.dtype, jnp.float32))  # a bfloat16 x keeps a float32 t
    lam = target.logsnr(t)
    lam = jnp.where(jnp.isnan(lam), -jnp.inf, lam)  # TrigFlow at float32 pi/2: tan < 0
    s = jnp.clip(source.t_from_logsnr(jnp.clip(lam, lo, hi)), source.t_min, source.t_max)
    a_t, s_t = target.alpha(t), target.sigma(t)
    below, above = lam < lo, lam > hi
    k = jnp.where(below, source.sigma(s) / jnp.where(below, s_t, 1.0),
                  jnp.where(above, source.alpha(s) / jnp.where(above, a_t, 1.0),
                            (source.alpha(s) + source.sigma(s)) / (a_t + s_t)))
    k = k.reshape(k.shape + (1,) * (x.ndim - k.ndim)) if k.ndim else k
    return denoise(params, (k * x).astype(x.dtype), s, **cond)

  return denoise_target


def rescheduled_net(apply: Apply, *, kind: str, source: "schedules_lib.Schedule | str",
                    target: "schedules_lib.Schedule | str", target_kind: str) -> Apply:
  """A network of output `kind` on `source` as a network of output `target_kind` on `target`.

  The raw output a `target_kind` network on `target` gives is a function of its denoiser
  (`from_x0`), and that denoiser is the source's through the exact change of schedule
  (`rescheduled`); so a network trained on one forward process serves, with the same weights, as
  the start of a student on another (e.g. an EDM teacher's U-Net as a TrigFlow flow for sCD, or a
  VP DiT as a rectified flow). Training then moves the weights behind the fixed change of
  variables. `apply` takes what `as_denoiser` feeds a network of `kind` (for 'edm': c_in x and
  c_noise); the result takes (x, t) itself, so `target_kind` is any kind but 'edm'.

  Returns:
    `apply_target(params, x, t, **cond) -> out` (t a scalar or [B]).
  """
  check_kind(kind)
  if check_kind(target_kind) == "edm":
    raise ValueError("rescheduled_net: target_kind='edm' is not supported (an 'edm' network takes "
                     "(c_in x, c_noise), not (x, t)); use x0, eps, v, flow or score.")
  target = schedules_lib.resolve(target, argname="target")
  denoise = rescheduled(as_denoiser(apply, kind=kind, schedule=source), source=source,
                        target=target)

  def apply_target(params, x, t, **cond):
    return from_x0(denoise(params, x, t, **cond), x, t, kind=target_kind, schedule=target)

  return apply_target


__all__ = ["KINDS", "check_kind", "resolve_sigma_data", "edm_coefficients", "to_x0", "from_x0",
           "net_inputs", "as_denoiser", "guided", "rescheduled", "rescheduled_net"]
