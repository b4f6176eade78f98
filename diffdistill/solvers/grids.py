"""Time grids for the samplers, and the schedule's values on them (host-side, float64 numpy).

A grid is a strictly decreasing array t_0 = t_start > t_1 > ... > t_N = t_end. Spacings:

    logsnr          lambda_i uniform between lambda(t_start) and lambda(t_end)      (DPM-Solver)
    karras          sigma_hat_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho,
                    sigma_hat = sigma / alpha                                       (EDM, eq. 5)
    time_uniform    t_i uniform
    time_quadratic  sqrt(t_i) uniform                                               (DPM-Solver code)

or a user-given array. Grids are computed when the sampler is traced (never inside the scan),
so `t_start`, `t_end` and user grids must be concrete numbers.

Infinite ends. Where alpha(t_start) = 0 (rectified flow or TrigFlow at their pure-noise end),
lambda(t_start) = -inf and sigma_hat = inf: the `logsnr` and `karras` grids keep t_0 = t_start
and place t_1..t_N as if the grid started at sigma_hat = SIGMA_HAT_CAP[1] = 80 (EDM's sigma_max),
i.e. the first step spans [-inf, lambda_1]. Likewise a sigma(t_end) = 0 end is capped at
sigma_hat = SIGMA_HAT_CAP[0] = 0.002 for placing the interior points.

References:
  Lu et al., DPM-Solver, NeurIPS 2022 (logSNR and time-quadratic grids).
  Karras et al., Elucidating the Design Space of Diffusion Models, NeurIPS 2022 (eq. 5).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import schedules as schedules_lib

SPACINGS = ("logsnr", "karras", "time_uniform", "time_quadratic")
SIGMA_HAT_CAP = (0.002, 80.0)


def _eval(fn, t: np.ndarray) -> np.ndarray:
  """Evaluates a schedule method on concrete times in float64 (x64 on for the call, whatever the
  global setting), also while a jit trace is open."""
  with jax.ensure_compile_time_eval(), jax.enable_x64(True):
    return np.array(fn(jnp.asarray(t, jnp.float64)), np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class HostGrid:
  """A time grid and the schedule's values on it, as float64 numpy arrays of shape [N + 1].

  lam is the half-log-SNR log(alpha / sigma) = logsnr / 2 that DPM-Solver and UniPC call lambda.
  """

  t: np.ndarray
  alpha: np.ndarray
  sigma: np.ndarray
  lam: np.ndarray

  @property
  def num_steps(self) -> int:
    return self.t.size - 1

  @property
  def h(self) -> np.ndarray:
    """lambda_{i+1} - lambda_i, [N] (inf where a step starts at alpha = 0 or ends at sigma = 0)."""
    with np.errstate(invalid="ignore"):
      return np.diff(self.lam)

  @property
  def starts_at_pure_noise(self) -> bool:
    return bool(self.alpha[0] == 0)

  @property
  def ends_at_clean_data(self) -> bool:
    return bool(self.sigma[-1] == 0)


# alpha / sigma below this is pure noise (alpha = 0, lambda = -inf): e.g. TrigFlow at t = pi/2
# has alpha = cos(pi/2) = 6e-17 in float64, whose finite lambda = -38 would waste grid points
# and make alpha-ratio formulas cancel catastrophically.
PURE_NOISE_RATIO = 1e-12


def host_grid(schedule: schedules_lib.Schedule, t) -> HostGrid:
  """The schedule's alpha, sigma and half-logSNR on the concrete grid t."""
  t = np.asarray(t, np.float64)
  alpha, sigma = _eval(schedule.alpha, t), _eval(schedule.sigma, t)
  lam = 0.5 * _eval(schedule.logsnr, t)
  pure = alpha <= PURE_NOISE_RATIO * sigma
  return HostGrid(t=t, alpha=np.where(pure, 0.0, alpha), sigma=sigma,
                  lam=np.where(pure, -np.inf, lam))


def t_from_lam(schedule: schedules_lib.Schedule, lam) -> np.ndarray:
  """Times of half-logSNR values lam (host-side)."""
  return _eval(schedule.t_from_logsnr, 2.0 * np.asarray(lam, np.float64))


def resolve_range(schedule: schedules_lib.Schedule, t_start, t_end) -> tuple[float, float]:
  """Defaults (t_max, t_min) and the check t_min <= t_end < t_start <= t_max."""
  t_start = schedule.t_max if t_start is None else t_start
  t_end = schedule.t_min if t_end is None else t_end
  for name, v in (("t_start", t_start), ("t_end", t_end)):
    if isinstance(v, jax.core.Tracer) or np.ndim(v) != 0:
      raise ValueError(f"{name} must be a concrete scalar (the grid is built before tracing the "
                       f"sampler; one grid serves the whole batch); got {v!r}.")
  t_start, t_end = float(t_start), float(t_end)
  if not t_end < t_start:
    raise ValueError(f"Need t_start > t_end (sampling runs from noise to data); got "
                     f"t_start={t_start}, t_end={t_end}.")
  tol = 1e-6 * max(1.0, abs(schedule.t_max))
  if t_start > schedule.t_max + tol or t_end < schedule.t_min - tol:
    raise ValueError(f"Need t_min <= t_end < t_start <= t_max = [{schedule.t_min}, "
                     f"{schedule.t_max}] for {schedule}; got t_start={t_start}, t_end={t_end}.")
  return t_start, t_end


def lam_range(schedule, t_start, t_end):
  lam_s, lam_e = host_grid(schedule, np.array([t_start, t_end])).lam.tolist()
  if math.isinf(lam_s):
    lam_s = min(-math.log(SIGMA_HAT_CAP[1]), lam_e - 1.0)
  if math.isinf(lam_e):
    lam_e = max(-math.log(SIGMA_HAT_CAP[0]), lam_s + 1.0)
  return lam_s, lam_e


def time_grid(schedule: schedules_lib.Schedule, num_steps: int, *, spacing="logsnr",
              t_start: float | None = None, t_end: float | None = None,
              rho: float = 7.0) -> np.ndarray:
  """The N + 1 times t_start = t_0 > ... > t_N = t_end of an N-step sampler, float64 [N + 1].

  Args:
    schedule: the forward process.
    num_steps: N >= 1.
    spacing: one of SPACINGS, or a user array of times (then `num_steps` must be len - 1 and
      t_start / t_end, if given, must match its ends).
    t_start, t_end: the range (defaults: schedule.t_max, schedule.t_min).
    rho: the Karras exponent.
  Returns:
    The grid as a float64 numpy array (host values; computed at trace time).
  """
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
  if not isinstance(spacing, str):
    return check_user_grid(schedule, spacing, num_steps=num_steps, t_start=t_start, t_end=t_end)
  if spacing not in SPACINGS:
    raise ValueError(f"Unknown spacing {spacing!r}; expected one of {list(SPACINGS)} or an array "
                     "of times.")
  t_start, t_end = resolve_range(schedule, t_start, t_end)
  n = num_steps
  u = np.linspace(0.0, 1.0, n + 1)
  if spacing == "time_uniform":
    t = t_start + u * (t_end - t_start)
  elif spacing == "time_quadratic":
    t = (math.sqrt(t_start) + u * (math.sqrt(t_end) - math.sqrt(t_start))) ** 2
  elif spacing == "logsnr":
    lam_s, lam_e = lam_range(schedule, t_start, t_end)
    t = t_from_lam(schedule, lam_s + u * (lam_e - lam_s))
  else:
    if rho <= 0:
      raise ValueError(f"rho must be > 0 for karras spacing, got {rho}.")
    lam_s, lam_e = lam_range(schedule, t_start, t_end)
    s_max, s_min = math.exp(-lam_s), math.exp(-lam_e)
    sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    t = t_from_lam(schedule, -np.log(sig))
  t[0], t[-1] = t_start, t_end
  if not np.all(np.diff(t) < 0):
    raise ValueError(f"The {spacing} grid with {n} steps on [{t_end}, {t_start}] is not strictly "
                     "decreasing at this float precision; use fewer steps or float64.")
  return t


def check_user_grid(schedule, grid, *, num_steps=None, t_start=None, t_end=None) -> np.ndarray:
  """Validates a user-given grid: 1-D, strictly decreasing, inside [t_min, t_max]."""
  if isinstance(grid, jax.core.Tracer):
    raise ValueError("A user time grid must be concrete (numpy or a list), not a traced array.")
  t = np.asarray(grid, np.float64)
  if t.ndim != 1 or t.size < 2:
    raise ValueError(f"A user time grid must be 1-D with >= 2 times, got shape {t.shape}.")
  if not np.all(np.diff(t) < 0):
    raise ValueError(f"A user time grid must be strictly decreasing (noise to data); got {t}.")
  resolve_range(schedule, t[0], t[-1])
  if num_steps is not None and t.size != num_steps + 1:
    raise ValueError(f"The user grid has {t.size - 1} steps but the solver needs {num_steps} "
                     "for the requested nfe.")
  for name, v, ref in (("t_start", t_start, t[0]), ("t_end", t_end, t[-1])):
    if v is not None and not math.isclose(float(v), ref, rel_tol=1e-6, abs_tol=1e-12):
      raise ValueError(f"{name}={v} does not match the user grid's end {ref}.")
  return t


def theta_substeps(schedule, t_s: float, t_t: float, n: int) -> np.ndarray:
  """n + 1 times from t_s to t_t uniform in the angle theta = arctan(sigma / alpha) (finite at
  alpha = 0 and at sigma = 0, unlike lambda)."""
  g = host_grid(schedule, np.array([t_s, t_t]))
  th = np.arctan2(g.sigma, g.alpha)
  th_i = th[0] + np.linspace(0.0, 1.0, n + 1) * (th[1] - th[0])
  with np.errstate(divide="ignore"):
    lam = np.log(np.cos(th_i)) - np.log(np.sin(th_i))
  t = t_from_lam(schedule, lam)
  t[0], t[-1] = t_s, t_t
  return t


__all__ = ["SPACINGS", "SIGMA_HAT_CAP", "HostGrid", "host_grid", "time_grid", "check_user_grid",
           "resolve_range", "t_from_lam", "theta_substeps", "lam_range"]
