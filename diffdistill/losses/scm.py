"""Continuous-time consistency models on TrigFlow: sCT and sCD (Lu & Song 2025).

TrigFlow: x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2] (`schedules.TrigFlow`).
The network F_theta predicts the velocity in units of sd, dx_t/dt = sd F, and the consistency
function is

    f_theta(x_t, t) = cos(t) x_t - sin(t) sd F_theta(x_t, t),

which is exactly the library's 'flow'-kind denoiser on TrigFlow (u = sd F is the flow output,
x0 = cos(t) x - sin(t) u), so f(x, 0) = x holds without an epsilon. The student here is the raw
flow network `flow_apply(params, x, t, **cond) -> u = sd F` (t enters the network as is: the
tangent below differentiates in t). With the PF-ODE velocity dx_t/dt (sCT: cos(t) z - sin(t) x0;
sCD: the teacher's, (cos(t) x_t - D_teacher(x_t, t)) / sin(t)), and theta- = sg(theta):

    (u-, cos t sin t du-/dt) = jvp(u_theta-, (x_t, t), (cos t sin t dx_t/dt, cos t sin t))
    g  = -cos^2(t) (sd F- - dx_t/dt) - r(k) (cos t sin t x_t + cos t sin t sd dF-/dt)
       = cos(t) df-/dt  (at r = 1)                     (the total derivative along the PF-ODE)
    g <- g / (||g|| + c)                                tangent normalization, c = 0.1
    L  = e^{w_phi(t)} / D ||F_theta - F- - g||^2 - w_phi(t)

With classifier-free guidance (sCD only, `guidance=(w_min, w_max)`), each example draws a scale
w ~ U(w_min, w_max) and the teacher's velocity is that of the guided denoiser
D_w = D(x | null) + w (D(x | c) - D(x | null)) (Ho & Salimans 2022): the student distils the
guided PF-ODE. With w_min < w_max the student is also conditioned on w (its network takes the
extra input `w`, zero-initialized by nets' extra_cond), so one student serves every scale; with
w_min = w_max it distils that one scale and takes no w.

r(k) = min(1, k / H) is the tangent warm-up and w_phi the learned log-variance head (adaptive
weighting; its optimum is e^{-w} = E ||F - F- - g||^2 / D at t). The gradient in theta at
theta = theta- is -2 e^w / D <dF_theta, g>: it moves f_theta against df/dt, and vanishes exactly
when f is constant along every trajectory. t is drawn as tan(t) = e^tau / sd, tau ~ N(P_mean,
P_std^2). The tangent is a forward-mode `jax.jvp` through the network (no finite differences).

The log-variance head (`logvar_init`, `logvar_apply`) is a linear function of fixed Fourier
features of ln tan(t); it lives beside the network in the student's params,
{"net": net params, "logvar": head params}, so it is updated by the same optimizer.

Precision. The jvp is exact forward-mode differentiation, so float32 loses only the rounding of
one extra forward pass; finite differences in float32 lose half the digits (h ~ sqrt(eps)).
Where float32 is not enough: near t -> pi/2 (cos t -> 0) and t -> 0 (sin t -> 0) the factors
cos t sin t underflow the tangent's relative precision and sCD's teacher velocity
(cos t x - D) / sin t divides a difference of nearly equal numbers by sin t ~ 0.004; see
docs/consistency.md for the measured errors.

References:
  Lu & Song, Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models, ICLR 2025
  (Alg. 1; Sec. 4: tangent normalization, warm-up, adaptive weighting).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.losses import _common
from diffdistill.method import Method, Update

Array = jax.Array
Apply = Callable[..., Array]


def logvar_init(num_features: int = 16) -> dict[str, Array]:
  """Zero head: w_phi(t) = 0 (unit weights) at the start."""
  return {"w": jnp.zeros((num_features,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def logvar_apply(phi: Mapping[str, Array], t: Array) -> Array:
  """w_phi(t) = <w, [cos(k c), sin(k c)]_k> + b with c = ln tan(t) / 4, k = 1..F/2. [B]."""
  half = phi["w"].shape[0] // 2
  c = 0.25 * jnp.log(jnp.tan(t))[:, None]
  k = jnp.arange(1, half + 1, dtype=t.dtype)[None]
  feats = jnp.concatenate([jnp.cos(k * c), jnp.sin(k * c)], axis=1)
  return feats @ phi["w"].astype(t.dtype) + phi["b"].astype(t.dtype)


def teacher_velocity(teacher: Apply, teacher_params: Any, x: Array, t: Array, *,
                     schedule: schedules_lib.TrigFlow, **cond) -> Array:
  """dx_t/dt of a denoiser teacher on TrigFlow: (cos t x - D(x, t)) / sin t."""
  tb = schedules_lib.broadcast_to(t, x)
  return (jnp.cos(tb) * x - teacher(teacher_params, x, t, **cond)) / jnp.sin(tb)


def total_derivative(flow_apply: Apply, params: Any, x: Array, t: Array, dxdt: Array,
                     **cond) -> tuple[Array, Array]:
  """(u, cos t sin t du/dt) along dx/dt by one `jax.jvp` (u = flow_apply(params, x, t))."""
  cs = jnp.cos(t) * jnp.sin(t)  # [B]
  fn = lambda xx, tt: flow_apply(params, xx, tt, **cond)  # noqa: E731
  return jax.jvp(fn, (x, t), (schedules_lib.broadcast_to(cs, x) * dxdt, cs))


def scm_loss(flow_apply: Apply, teacher: Apply | None = None, *,
             schedule: schedules_lib.TrigFlow, p_mean: float = -1.0, p_std: float = 1.4,
             tangent_normalization: float | None = 0.1, warmup_steps: int = 10_000,
             adaptive_weighting: bool = True,
             guidance: tuple[float, float] | None = None) -> Callable[..., tuple[Array, dict]]:
  """sCT (teacher None) or sCD (module docstring).

  Args:
    flow_apply: the student's raw flow network u(params, x, t, **cond) = sd F (TrigFlow t input).
    teacher: sCD's teacher denoiser apply(params, x, t, **cond) on the same TrigFlow (None: sCT).
    schedule: a TrigFlow schedule (its sigma_data is sd).
    p_mean, p_std: the normal of tau = ln(sd tan t) (the paper's -1.0 and 1.4 (sCD) or 1.6 (sCT)).
    tangent_normalization: c of g / (||g|| + c) (None: off).
    warmup_steps: H of r(k) = min(1, k / H) (0: r = 1 from the start).
    adaptive_weighting: learn w_phi; params are then {"net": ..., "logvar": logvar_init()}.
    guidance: sCD with classifier-free guidance, (w_min, w_max): the teacher is called as
      teacher(params, x, t, label=..., w=w [B]) and must apply the guidance itself
      (`analytic.GuidedDenoiser`, or `parametrization.guided(apply, w, null_cond=...)` for a
      network); batches must hold 'label'. With w_min < w_max the student gets w=w too.

  Returns:
    loss_fn(params, batch, rng, *, step[, teacher_params]) -> (loss, aux); aux: l2 (the
    unweighted ||F - F- - g||^2 / D), tangent_norm (mean ||g|| before normalization), warmup,
    nonfinite.
  """
  if not isinstance(schedule, schedules_lib.TrigFlow):
    raise ValueError(f"scm_loss needs a TrigFlow schedule, got {schedule}.")
  if tangent_normalization is not None and tangent_normalization <= 0:
    raise ValueError(f"tangent_normalization must be > 0 or None, got {tangent_normalization}.")
  if guidance is not None:
    if teacher is None:
      raise ValueError("guidance needs a teacher: classifier-free guidance is for sCD, not sCT.")
    w_min, w_max = (float(v) for v in guidance)
    if not w_min <= w_max:
      raise ValueError(f"guidance must be (w_min, w_max) with w_min <= w_max, got {guidance}.")
  sd = float(schedule.sigma_data)

  def loss_fn(params, batch, rng, *, step, teacher_params=None):
    if "x" not in batch:
      raise ValueError(f"batch must hold 'x' (data samples); got keys {sorted(batch)}.")
    if (teacher is None) != (teacher_params is None):
      raise ValueError("sCD needs teacher_params (and a teacher); sCT takes neither.")
    x0 = jnp.asarray(batch["x"])
    x0 = x0.astype(jnp.promote_types(x0.dtype, jnp.float32))
    b = x0.shape[0]
    net = params["net"] if adaptive_weighting else params
    cond = _common.condition(batch)
    t_rng, z_rng, w_rng = jax.random.split(rng, 3)
    teacher_cond = cond
    if guidance is not None:
      if "label" not in batch:
        raise ValueError(f"guidance needs labelled batches ('label'); got keys {sorted(batch)}.")
      w = jax.random.uniform(w_rng, (b,), x0.dtype, w_min, w_max)
      teacher_cond = {**cond, "w": w}
      if w_min < w_max:  # one student for every scale: it sees w
        cond = teacher_cond
    tau = p_mean + p_std * jax.random.normal(t_rng, (b,), x0.dtype)
    t = jnp.clip(jnp.arctan(jnp.exp(tau) / sd), schedule.t_min, schedule.t_max)
    tb = schedules_lib.broadcast_to(t, x0)
    z = sd * jax.random.normal(z_rng, x0.shape, x0.dtype)
    x_t = jnp.cos(tb) * x0 + jnp.sin(tb) * z
    if teacher is None:
      dxdt = jnp.cos(tb) * z - jnp.sin(tb) * x0
    else:
      dxdt = jax.lax.stop_gradient(teacher_velocity(teacher, teacher_params, x_t, t,
                                                    schedule=schedule, **teacher_cond))
    # one jvp: its primal is the online u_theta (differentiated), its tangent is of theta- = sg
    u, du = total_derivative(flow_apply, net, x_t, t, dxdt, **cond)
    du = jax.lax.stop_gradient(du)
    u_minus = jax.lax.stop_gradient(u)
    r = jnp.minimum(1.0, step / warmup_steps) if warmup_steps else jnp.float32(1.0)
    cos, sin = jnp.cos(tb), jnp.sin(tb)
    g = -cos * cos * (u_minus - dxdt) - r * (cos * sin * x_t + du)
    norm = jnp.sqrt(jnp.sum(jnp.square(g).reshape(b, -1), axis=1))  # [B]
    if tangent_normalization is not None:
      g = g / schedules_lib.broadcast_to(norm + tangent_normalization, g)
    err = jnp.mean(jnp.square((u - u_minus) / sd - g).reshape(b, -1), axis=1)  # [B]
    if adaptive_weighting:
      w = logvar_apply(params["logvar"], t)
      terms = jnp.exp(w) * err - w
    else:
      terms = err
    aux = {"l2": jnp.mean(err), "tangent_norm": jnp.mean(norm), "warmup": jnp.asarray(r),
           "nonfinite": jnp.sum(~jnp.isfinite(terms))}
    return jnp.mean(terms), aux

  return loss_fn


def scm(flow_apply: Apply, teacher: Apply | None = None, **options) -> Method:
  """sCT / sCD as a method: inputs `step` (warm-up) and, for sCD, frozen `teacher`."""
  inputs = {"step": "step"}
  if teacher is not None:
    inputs["teacher_params"] = "frozen/teacher"
  return Method(name="scd" if teacher is not None else "sct", updates=(Update(
      player="student", loss_fn=scm_loss(flow_apply, teacher, **options), inputs=inputs),))


def consistency_function(flow_apply: Apply) -> Apply:
  """f(params, x, t) = cos(t) x - sin(t) u(params, x, t): the sCM sampler's function (data scale
  at t = 0). `params` are the network's (without the log-variance head)."""

  def f(params, x, t, **cond):
    tb = schedules_lib.broadcast_to(jnp.asarray(t, x.dtype), x)
    return (jnp.cos(tb) * x - jnp.sin(tb) * flow_apply(params, x, t, **cond)).astype(x.dtype)

  return f



__all__ = ["logvar_init", "logvar_apply", "teacher_velocity", "total_derivative", "scm_loss", "scm",
           "consistency_function"]
