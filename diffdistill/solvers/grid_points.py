"""Traceable time grids: the i-th of N + 1 grid times as a jax function of integer arrays (i, N).

`grids.time_grid` builds a whole grid on the host in float64, for `sample`. Distillation needs the
same points inside a jitted loss: progressive distillation halves N each round, consistency
training grows N(k) by a curriculum, and every example draws its own grid index. With

    t = grid_time(schedule, i, n, spacing="logsnr")         # i, n: int arrays, any shape

halving N is a new argument value, not a new trace, and `grid_time(s, i, n)` equals
`time_grid(s, n)[i]` (to the rounding of the dtype; float64 under `jax.enable_x64`) for every
spacing of `grids.SPACINGS`, including the pure-noise and clean-data ends (same capping rule).

References:
  Salimans & Ho, Progressive Distillation, ICLR 2022 (rounds N -> N/2);
  Song et al., Consistency Models, ICML 2023 (the N(k) curriculum of CT).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib
from diffdistill.solvers import grids

Array = jax.Array


def grid_time(schedule: schedules_lib.Schedule, i, n, *, spacing: str = "logsnr",
              t_start: float | None = None, t_end: float | None = None, rho: float = 7.0,
              dtype=None) -> Array:
  """t_i of the N-step grid of `spacing` from t_start to t_end (traceable in i and n).

  Args:
    schedule: the forward process (static).
    i: integer array of grid indices in [0, n] (0 is t_start, n is t_end).
    n: integer array (broadcastable with i) of step counts N >= 1.
    spacing: one of grids.SPACINGS (static).
    t_start, t_end: concrete range (defaults schedule.t_max, schedule.t_min).
    rho: the Karras exponent.
    dtype: the float dtype of the result (default: float32, float64 under x64).
  Returns:
    times of i's broadcast shape with n.
  """
  if spacing not in grids.SPACINGS:
    raise ValueError(f"Unknown spacing {spacing!r}; a traceable grid takes one of "
                     f"{list(grids.SPACINGS)}.")
  if spacing == "karras" and rho <= 0:
    raise ValueError(f"rho must be > 0 for karras spacing, got {rho}.")
  t_start, t_end = grids.resolve_range(schedule, t_start, t_end)
  dtype = dtype or jnp.result_type(float)
  i = jnp.asarray(i)
  n = jnp.asarray(n)
  u = i.astype(dtype) / n.astype(dtype)
  if spacing == "time_uniform":
    t = t_start + u * (t_end - t_start)
  elif spacing == "time_quadratic":
    t = (math.sqrt(t_start) + u * (math.sqrt(t_end) - math.sqrt(t_start))) ** 2
  else:
    lam_s, lam_e = grids.lam_range(schedule, t_start, t_end)  # (the same capping)
    if spacing == "logsnr":
      lam = lam_s + u * (lam_e - lam_s)
    else:
      a, b = math.exp(-lam_s / rho), math.exp(-lam_e / rho)  # sigma_hat^(1/rho) at both ends
      lam = -rho * jnp.log(a + u * (b - a))
    t = schedule.t_from_logsnr(2.0 * lam).astype(dtype)
  # the ends are exact, as on the host grid (they may sit at alpha = 0 or sigma = 0)
  t = jnp.where(i == 0, jnp.asarray(t_start, dtype), t)
  return jnp.where(i == n, jnp.asarray(t_end, dtype), t).astype(dtype)


__all__ = ["grid_time"]
