"""The probability-flow ODE in the angle theta = arctan(sigma / alpha), integrated by diffrax.

One copy, shared by `analytic.flow_map` (the reference map) and `solvers.adaptive_sample`. It
sits beside schedules/, below both of its users, because the dependency direction is
`solvers -> schedules` and `analytic -> schedules`: neither of those two may import the other.

On the rescaled state y = x / sqrt(alpha^2 + sigma^2), with x = alpha x0 + sigma eps,

    y = cos(theta) x0 + sin(theta) eps,   dy/dtheta = cos(theta) eps_hat - sin(theta) x0_hat,
    eps_hat = (y - cos(theta) x0_hat) / sin(theta),   lambda = logsnr = 2 log(cot(theta)),

the same ODE for every schedule (the probability-flow ODE depends on the schedule only through
the log-SNR) and finite at both ends. Two ends need care in floating point:

* theta = pi/2 (alpha = 0: rectified flow at t = 1, TrigFlow at pi/2). float32(pi/2) rounds
  above pi/2, where cos is slightly negative and log(cos) is NaN: cos is clamped at 0 (lambda =
  -inf, which t_from_logsnr maps to the pure-noise end).
* theta = 0 (sigma = 0, e.g. VPLinear(t_min=0) with t_end = 0). eps_hat is 0/0 there. The ODE is
  integrated only down to THETA_MIN = sqrt(machine epsilon) and the rest of the way by one DDIM
  step in theta, y_end = cos(theta_end) D + sin(theta_end) eps_hat (one more denoiser call; at
  theta_end = 0, y_end = D = x0_hat). DDIM is exact where D is constant along the path (point
  masses) and its error is O(THETA_MIN^2) where D is smooth in sigma^2 (any mixture with
  positive variances), i.e. O(machine epsilon). A start below THETA_MIN starts at THETA_MIN
  with y unchanged: the same O(THETA_MIN^2) where eps_hat -> 0 as sigma -> 0 (data with a
  density).

References:
  Song et al., Score SDE, ICLR 2021 (probability-flow ODE); Lu & Song, sCM, 2025 (the
  trigonometric form); Kidger, On Neural Differential Equations, 2021 (diffrax).
"""

from __future__ import annotations

from typing import Callable

import diffrax
import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib

Array = jax.Array

# New denoiser calls per attempted step (first-same-as-last pairs; rejected steps cost as much
# as accepted ones): Dopri8 has 14 stages, Tsit5 and Dopri5 have 7.
NEW_EVALS_PER_STEP = {diffrax.Dopri8: 13, diffrax.Tsit5: 6, diffrax.Dopri5: 6}


def compute_dtype(dtype) -> jnp.dtype:
  """The ODE state runs in at least float32 (bfloat16 is only passed to the denoiser)."""
  return jnp.result_type(dtype, jnp.float32)


def theta_min(dtype) -> float:
  """The smallest angle the ODE is integrated to: sqrt(machine epsilon) of the compute dtype."""
  return float(jnp.finfo(dtype).eps) ** 0.5


def theta(schedule: schedules_lib.Schedule, t, dtype) -> Array:
  """theta = arctan(sigma / alpha) at t."""
  t = jnp.asarray(t, dtype)
  return jnp.arctan2(schedule.sigma(t), schedule.alpha(t))


def scale(schedule: schedules_lib.Schedule, t, dtype) -> Array:
  """sqrt(alpha^2 + sigma^2) at t."""
  t = jnp.asarray(t, dtype)
  a, s = schedule.alpha(t), schedule.sigma(t)
  return jnp.sqrt(a * a + s * s)


def _cos(th):
  return jnp.maximum(jnp.cos(th), 0.0)  # float32(pi/2) > pi/2: see the module docstring


def solve(apply: Callable, params, x: Array, *, schedule: schedules_lib.Schedule, t_start, t_end,
          solver: diffrax.AbstractSolver, rtol: float, atol: float, max_steps: int,
          dt0_fraction: float | None = None) -> tuple[Array, dict]:
  """x at t_end from x at t_start along the probability-flow ODE of `apply(params, x, t)`.

  Args:
    apply: a denoiser apply(params, x [B, ...], t [B]) -> x0_hat; called with x in x's dtype.
    params: its parameters (passed to diffrax as `args`, never closed over).
    x: the state at t_start, [B, ...].
    t_start, t_end: the two times, either order; concrete or traced.
    solver: a diffrax solver in NEW_EVALS_PER_STEP.
    rtol, atol, max_steps: the PID controller's tolerances and the step cap.
    dt0_fraction: the first step as a fraction of the theta range (None: diffrax chooses it).
  Returns:
    (x_end [B, ...] in x's dtype, {"nfe": denoiser evaluations, "num_steps": accepted steps}).
  """
  in_dtype = x.dtype
  dtype = compute_dtype(in_dtype)
  b = x.shape[0]
  lo = theta_min(dtype)
  th0, th1 = theta(schedule, t_start, dtype), theta(schedule, t_end, dtype)
  a0, a1 = jnp.maximum(th0, lo), jnp.maximum(th1, lo)  # the stretch the ODE solver covers

  def denoise_at(th, y, args):
    lam = 2.0 * (jnp.log(_cos(th)) - jnp.log(jnp.sin(th)))
    t = schedule.t_from_logsnr(lam)
    a, s = schedule.alpha(t), schedule.sigma(t)
    r = jnp.sqrt(a * a + s * s)
    x0 = apply(args, (y * r).astype(in_dtype), jnp.full((b,), t, dtype))
    return x0.astype(dtype)

  def vector_field(th, y, args):
    x0 = denoise_at(th, y, args)
    c, s = _cos(th), jnp.sin(th)
    eps = (y - c * x0) / s
    return c * eps - s * x0

  dt0 = None if dt0_fraction is None else (a1 - a0) * dt0_fraction
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), solver, t0=a0, t1=a1, dt0=dt0,
      y0=x.astype(dtype) / scale(schedule, t_start, dtype), args=params,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  y = sol.ys[-1]

  def ddim_to_end(y):
    x0 = denoise_at(a1, y, params)
    eps = (y - _cos(a1) * x0) / jnp.sin(a1)
    return jnp.cos(th1) * x0 + jnp.sin(th1) * eps

  finish = th1 < lo
  y = jax.lax.cond(finish, ddim_to_end, lambda y: y, y)
  x_end = (y * scale(schedule, t_end, dtype)).astype(in_dtype)
  nfe = (1 + NEW_EVALS_PER_STEP[type(solver)] * (sol.stats["num_accepted_steps"]
                                                 + sol.stats["num_rejected_steps"])
         + finish.astype(jnp.int32))
  return x_end, {"nfe": nfe, "num_steps": sol.stats["num_steps"]}


__all__ = ["solve", "theta", "scale", "theta_min", "compute_dtype", "NEW_EVALS_PER_STEP"]
