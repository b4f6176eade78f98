"""An adaptive-step solver of the probability-flow ODE (diffrax) that reports the NFE it used.

The ODE is integrated in the angle theta = arctan(sigma / alpha) on y = x / sqrt(alpha^2 + sigma^2):

    y = cos(theta) x0 + sin(theta) eps,   dy/dtheta = cos(theta) eps_hat - sin(theta) D,

finite at both ends (also where alpha = 0) and the same ODE for every schedule (it depends on
the schedule only through the log-SNR). The vector field and its ends are those of
`analytic.flow_map` (one copy, diffdistill/_pf_ode.py): a float32 start at theta = pi/2 is
clamped, and an end at sigma = 0 is reached by one exact-limit DDIM step (one more call,
counted). Tsit5 (5th order, FSAL: 6 new calls per attempted step plus 1 at the start) with a PID
step-size controller on rtol / atol; the initial step is (theta_end - theta_start) / 16, so no
extra calls go to step-size selection.

References:
  Tsitouras, Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying
  assumption, Comput. Math. Appl. 2011.  Kidger, On Neural Differential Equations, 2021 (diffrax).
  Lu & Song, sCM, 2025 (the trigonometric form).
"""

from __future__ import annotations

import diffrax
import jax

from diffdistill import _pf_ode
from diffdistill import schedules as schedules_lib
from diffdistill.solvers import grids

Array = jax.Array
METHODS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}


def adaptive_sample(denoise, x_T: Array, *, schedule: schedules_lib.Schedule, t_start=None,
                    t_end=None, rtol: float = 1e-4, atol: float = 1e-4, method: str = "tsit5",
                    max_steps: int = 4096) -> tuple[Array, Array]:
  """Integrates the PF-ODE from t_start to t_end adaptively. Returns (x_end [B, ...], nfe [])."""
  if method not in METHODS:
    raise ValueError(f"Unknown adaptive method {method!r}; expected one of {sorted(METHODS)}.")
  if not (rtol > 0 and atol > 0):
    raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}.")
  t_start, t_end = grids.resolve_range(schedule, t_start, t_end)
  x, stats = _pf_ode.solve(lambda _, x, t: denoise(x, t), None, x_T, schedule=schedule,
                           t_start=t_start, t_end=t_end, solver=METHODS[method](), rtol=rtol,
                           atol=atol, max_steps=max_steps, dt0_fraction=1.0 / 16)
  return x, stats["nfe"]


__all__ = ["adaptive_sample", "METHODS"]
