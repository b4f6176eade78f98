"""Learned sampling: time grids and per-step coefficients fitted to the teacher's own ODE solution.

Given calibration noise x_T^(m) (a few hundred draws) and the teacher's high-accuracy solution
x*^(m) of the same draws (adaptive Tsit5, tight tolerances), `learn_grid` minimizes, by Adam
through the whole jitted sampler (`traceable.sample_on_times`),

    L(theta) = (1/M) sum_m || Phi_theta(x_T^(m)) - x*^(m) ||_2 / sqrt(d)            (LD3's objective
                                                                                  with the L2 metric)

over the interior times of the solver's grid. The grid is a softmax of free logits over the
increments of a monotone coordinate phi of t (the half-logSNR lambda where both ends are finite,
else theta = arctan(sigma / alpha)), with a floor:

    phi_i = phi_0 + (phi_N - phi_0) sum_{k<i} w_k,   w = f / N + (1 - f) softmax(logits),

so every step keeps at least a fraction f (`min_step`) of the uniform step: the grid is strictly
monotone with its two ends fixed, and no step can collapse, for any logits. The returned grid is
the best iterate's, recomputed on the host in float64, and always passes
`grids.check_user_grid` (`sample(..., spacing=grid)` takes it as it is).

`learn_coefficients` fits, jointly with the grid, additive corrections to a multistep solver's
predictor weights (S4S / BNS spirit): b_ij -> b_ij + s_i delta_ij on the slots the base solver
uses at step i, with sum_j delta_ij = 0 so that the update stays exact for a constant
denoiser (the consistency condition every solver of the family satisfies), s_i = |b_i^DDIM|.
The result runs from its saved file as `sample(..., solver="learned:<path>", nfe=N)`.

Saved files (JSON) carry the teacher's name, the solver, NFE, solver options and repr(schedule);
loading one for another solver, NFE or schedule is a ValueError.

References:
  Tong et al., Learning to Discretize Denoising Diffusion ODEs (LD3), 2024 (the objective).
  Sabour, Fidler & Kreis, Align Your Steps, ICML 2024 (learned schedules).
  Frankel et al., S4S: Solving for a Diffusion Model Solver, 2025; Shaul et al., Bespoke
  Non-Stationary Solvers, 2024 (learned coefficients).
See docs/learned_sampling.md for why this objective.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffdistill import schedules as schedules_lib
from diffdistill.solvers import adaptive
from diffdistill.solvers import grids
from diffdistill.solvers import multistep
from diffdistill.solvers import table
from diffdistill.solvers import traceable

Array = jax.Array
COORDINATES = ("logsnr", "theta")


@dataclasses.dataclass(frozen=True)
class Coordinate:
  """The monotone coordinate phi(t) the grid is parametrized in, with its fixed ends."""

  name: str
  phi_start: float
  phi_end: float

  def t_of_phi(self, schedule, phi, xp):
    """t(phi) in xp (jnp in the trace, numpy through grids.t_from_lam on the host)."""
    lam = phi if self.name == "logsnr" else xp.log(xp.cos(phi)) - xp.log(xp.sin(phi))
    if xp is np:
      return grids.t_from_lam(schedule, lam)
    return schedule.t_from_logsnr(2.0 * lam)

  def phi_of_t(self, schedule, t) -> np.ndarray:
    g = grids.host_grid(schedule, np.asarray(t, np.float64))
    return g.lam if self.name == "logsnr" else np.arctan2(g.sigma, g.alpha)


def make_coordinate(schedule, t_start, t_end, coordinate=None) -> Coordinate:
  """lambda where both ends have finite logSNR (unless asked otherwise), else theta."""
  g = grids.host_grid(schedule, np.array([t_start, t_end], np.float64))
  finite = bool(np.all(np.isfinite(g.lam)))
  if coordinate is None:
    coordinate = "logsnr" if finite else "theta"
  if coordinate not in COORDINATES:
    raise ValueError(f"coordinate must be one of {list(COORDINATES)}, got {coordinate!r}.")
  if coordinate == "logsnr" and not finite:
    raise ValueError("coordinate='logsnr' needs finite logSNR at both ends; use 'theta'.")
  phi = g.lam if coordinate == "logsnr" else np.arctan2(g.sigma, g.alpha)
  return Coordinate(coordinate, float(phi[0]), float(phi[1]))


def fractions(logits, min_step: float, xp):
  """w = f / N + (1 - f) softmax(logits): positive increments summing to 1, each >= f / N."""
  n = logits.shape[-1]
  z = logits - xp.max(logits)
  e = xp.exp(z)
  return min_step / n + (1.0 - min_step) * e / xp.sum(e)


def interior_phi(logits, coord: Coordinate, min_step: float, xp):
  """phi_1..phi_{N-1} of the grid with these logits."""
  cum = xp.cumsum(fractions(logits, min_step, xp))[:-1]
  return coord.phi_start + (coord.phi_end - coord.phi_start) * cum


def logits_of_grid(t, coord: Coordinate, schedule, min_step: float) -> np.ndarray:
  """Logits whose grid is t (the inverse of `fractions`, up to a constant)."""
  phi = coord.phi_of_t(schedule, t)
  phi[0], phi[-1] = coord.phi_start, coord.phi_end
  w = np.diff(phi) / (coord.phi_end - coord.phi_start)
  n = w.size
  soft = (w - min_step / n) / (1.0 - min_step)
  return np.log(np.maximum(soft, 1e-12))


def host_grid_of_logits(logits, coord, schedule, min_step, t_start, t_end) -> np.ndarray:
  """The float64 grid of the logits, ends exact; validated as a user grid."""
  phi = interior_phi(np.asarray(logits, np.float64), coord, min_step, np)
  t = np.concatenate([[t_start], np.asarray(coord.t_of_phi(schedule, phi, np), np.float64), [t_end]])
  return grids.check_user_grid(schedule, t)


@dataclasses.dataclass(frozen=True)
class Fit:
  """What a fit returns: the grid (float64 [N + 1]), the coefficient corrections ([N, K] or None),
  and the loss history (the objective at each iteration, before its update)."""

  t: np.ndarray
  delta: np.ndarray | None
  history: np.ndarray
  init_loss: float
  best_loss: float
  coordinate: str


def reference_solution(denoise, x_T, *, schedule, t_start=None, t_end=None, rtol=1e-6,
                       atol=1e-6) -> Array:
  """The teacher's own high-accuracy solution of the calibration draws (adaptive Tsit5)."""
  x, _ = adaptive.adaptive_sample(denoise, x_T, schedule=schedule, t_start=t_start, t_end=t_end,
                                  rtol=rtol, atol=atol, max_steps=16384)
  return x


def per_sample_distance(x, ref):
  """e_m = ||x_m - ref_m||_2 / sqrt(d), [M] (the quantity `metrics.per_sample_error` summarizes);
  the 1e-24 keeps the gradient of the square root finite at e = 0."""
  x, ref = x.reshape(x.shape[0], -1), ref.reshape(ref.shape[0], -1)
  return jnp.sqrt(jnp.mean((x - ref) ** 2, axis=1) + 1e-24)


def _steps(solver, nfe, options):
  steps, _ = table.steps_for(table.SOLVERS[solver], nfe, **options)
  return steps


def coefficient_mask(plan: multistep.Plan) -> np.ndarray:
  """1 where the base solver's predictor row i uses history slot j, for rows that use >= 2 slots
  (a one-slot row cannot move under the zero-sum constraint); from a host plan's pattern."""
  mask = (np.asarray(plan.b) != 0).astype(np.float64)
  mask[mask.sum(axis=1) < 2] = 0.0
  return mask


def apply_delta(plan: multistep.Plan, delta, mask, xp) -> multistep.Plan:
  """b_ij + s_i (delta_ij - mean over the row's used slots), s_i = |b_i^DDIM| = |sum_j b_ij|."""
  used = np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
  d = mask * (delta - xp.sum(mask * delta, axis=1, keepdims=True) / used)
  scale = xp.abs(xp.sum(plan.b, axis=1, keepdims=True))
  return dataclasses.replace(plan, b=plan.b + scale * d)


def fit(denoise: Callable[[Array, Array], Array], x_T: Array, *, schedule: schedules_lib.Schedule,
        solver: str, nfe: int, target: Array | None = None, learn_coefficients: bool = False,
        t_start: float | None = None, t_end: float | None = None, init="logsnr",
        coordinate: str | None = None, min_step: float = 0.05, iterations: int = 150,
        learning_rate: float = 0.05, coefficient_learning_rate: float = 0.02,
        reference_tol: float = 1e-6, **options) -> Fit:
  """Fits the grid (and optionally the coefficient corrections) of `solver` at `nfe` calls.

  Args:
    denoise: the teacher, `denoise(x, t) -> x0_hat` with params bound.
    x_T: [M, ...] calibration noise at t_start.
    schedule, solver, nfe: as in `sample`; solver must be in traceable.TRACEABLE.
    target: [M, ...] the teacher's solution of x_T (default: `reference_solution`).
    learn_coefficients: also fit the predictor corrections delta.
    init: the starting grid: a spacing name or an array of times.
    coordinate: "logsnr" or "theta" (default: logsnr where both ends are finite).
    min_step: f, the smallest step as a fraction of the uniform one in that coordinate.
    iterations, learning_rate, coefficient_learning_rate: Adam on the logits / on delta.
    reference_tol: rtol = atol of the adaptive reference when target is None.
    **options: the solver's options (SOLVERS[solver].options).
  """
  traceable.check_traceable(solver)
  if not 0.0 < min_step < 1.0:
    raise ValueError(f"min_step must lie in (0, 1), got {min_step}.")
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
    raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}.")
  n = _steps(solver, nfe, options)
  t_start, t_end = grids.resolve_range(schedule, t_start, t_end)
  coord = make_coordinate(schedule, t_start, t_end, coordinate)
  ends = traceable.end_flags(schedule, t_start, t_end)
  t0 = grids.time_grid(schedule, n, spacing=init, t_start=t_start, t_end=t_end)
  x_T = jnp.asarray(x_T)
  if target is None:
    target = reference_solution(denoise, x_T, schedule=schedule, t_start=t_start, t_end=t_end,
                                rtol=reference_tol, atol=reference_tol)
  target = jnp.asarray(target, x_T.dtype)
  if target.shape != x_T.shape:
    raise ValueError(f"target must have x_T's shape {x_T.shape}, got {target.shape}.")
  cdt = multistep.compute_dtype(x_T.dtype)
  mask = coefficient_mask(traceable.TRACEABLE[solver].host(grids.host_grid(schedule, t0), **options))
  params = {"logits": jnp.asarray(logits_of_grid(t0, coord, schedule, min_step), cdt),
            "delta": jnp.zeros(mask.shape, cdt)}

  def loss_fn(p):
    phi = interior_phi(p["logits"], coord, min_step, jnp)
    t_in = coord.t_of_phi(schedule, phi, jnp)
    t = jnp.concatenate([jnp.array([t_start], cdt), t_in.astype(cdt), jnp.array([t_end], cdt)])
    g = traceable.trace_grid(schedule, t, ends=ends)
    plan = traceable.traced_plan(solver, g, **options)
    if learn_coefficients:
      plan = apply_delta(plan, p["delta"], mask, jnp)
    x = multistep.run(denoise, x_T, plan, in_dtype=x_T.dtype)
    return jnp.mean(per_sample_distance(x.astype(cdt), target.astype(cdt)))

  opt = optax.multi_transform(
      {"logits": optax.adam(learning_rate),
       "delta": optax.adam(coefficient_learning_rate) if learn_coefficients else optax.set_to_zero()},
      {"logits": "logits", "delta": "delta"})
  opt = optax.apply_if_finite(opt, max_consecutive_errors=iterations + 1)
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    loss, grad = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(grad, s, p)
    return optax.apply_updates(p, updates), s, loss

  history, best, best_loss = [], params, math.inf
  for _ in range(iterations):
    new, state, loss = step(params, state)
    loss = float(loss)
    history.append(loss)
    if math.isfinite(loss) and loss < best_loss:  # the loss is that of `params`, before the update
      best, best_loss = params, loss
    params = new
  if not history:
    best_loss = float(jax.jit(loss_fn)(params))
  init_loss = history[0] if history else best_loss
  t = host_grid_of_logits(np.asarray(best["logits"], np.float64), coord, schedule, min_step,
                          t_start, t_end)
  delta = None
  if learn_coefficients:
    delta = np.asarray(best["delta"], np.float64)
  return Fit(t=t, delta=delta, history=np.asarray(history), init_loss=init_loss,
             best_loss=best_loss, coordinate=coord.name)


def learn_grid(denoise: Callable[[Array, Array], Array], x_T: Array, *,
               schedule: schedules_lib.Schedule, solver: str, nfe: int, **options) -> np.ndarray:
  """The time grid ([N + 1], float64, strictly decreasing, ends t_start / t_end) of `solver` at
  exactly `nfe` calls, fitted to the teacher's solution of the calibration noise x_T.

  `sample(denoise, x, schedule=schedule, solver=solver, nfe=nfe, spacing=grid)` takes it as it
  is. Options: those of `fit` (target, init, coordinate, min_step, iterations, learning_rate,
  t_start, t_end, reference_tol) and the solver's own.
  """
  return fit(denoise, x_T, schedule=schedule, solver=solver, nfe=nfe, **options).t


# ---------------------------------------------------------------------------------------------
# Learned coefficients as a solver, and saved files.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Learned:
  """A saved learned grid (delta None) or learned solver (grid + predictor corrections)."""

  teacher: str
  solver: str
  nfe: int
  schedule: str  # repr of the schedule
  t: np.ndarray
  delta: np.ndarray | None = None
  options: dict = dataclasses.field(default_factory=dict)
  info: dict = dataclasses.field(default_factory=dict)

  def check(self, *, solver=None, nfe=None, schedule=None, kind=None) -> "Learned":
    """ValueError unless the file was fitted for this solver, NFE and schedule."""
    asked = {"solver": solver, "nfe": nfe, "schedule": None if schedule is None else repr(schedule)}
    for name, want in asked.items():
      have = getattr(self, name)
      if want is not None and want != have:
        raise ValueError(f"This learned file was fitted for {name}={have!r} (teacher "
                         f"{self.teacher!r}, solver {self.solver!r}, nfe {self.nfe}); it cannot be "
                         f"used with {name}={want!r}. Fit one for that {name}.")
    if kind == "coefficients" and self.delta is None:
      raise ValueError("This file holds a learned grid only; solver='learned:<path>' needs "
                       "learned coefficients (learn.fit(..., learn_coefficients=True)).")
    return self


def save(path: str, learned: Learned) -> None:
  """Writes `learned` as JSON (float64 values written with repr precision)."""
  out = {"format": "diffdistill.learned/1", "teacher": learned.teacher, "solver": learned.solver,
         "nfe": int(learned.nfe), "schedule": learned.schedule, "options": learned.options,
         "t": [float(v) for v in learned.t], "info": learned.info}
  if learned.delta is not None:
    out["delta"] = np.asarray(learned.delta, np.float64).tolist()
  with open(path, "w") as f:
    json.dump(out, f, indent=1)


def load(path: str, *, solver: str | None = None, nfe: int | None = None,
         schedule: schedules_lib.Schedule | None = None) -> Learned:
  """Reads a file written by `save`; ValueError if it was fitted for another solver, NFE or
  schedule (the arguments given)."""
  with open(path) as f:
    raw = json.load(f)
  if raw.get("format") != "diffdistill.learned/1":
    raise ValueError(f"{path} is not a diffdistill learned-sampling file.")
  learned = Learned(teacher=raw["teacher"], solver=raw["solver"], nfe=int(raw["nfe"]),
                    schedule=raw["schedule"], t=np.asarray(raw["t"], np.float64),
                    delta=None if "delta" not in raw else np.asarray(raw["delta"], np.float64),
                    options=raw.get("options", {}), info=raw.get("info", {}))
  return learned.check(solver=solver, nfe=nfe, schedule=schedule)


def load_grid(path: str, *, solver: str, nfe: int, schedule: schedules_lib.Schedule) -> np.ndarray:
  """The saved grid, for `sample(..., solver=solver, nfe=nfe, spacing=grid)`; ValueError if it was
  fitted for another solver, NFE or schedule."""
  return load(path, solver=solver, nfe=nfe, schedule=schedule).t


def sample_kwargs(path: str) -> dict:
  """`sample(denoise, x_T, schedule=..., **sample_kwargs(path))` for a learned-coefficient file."""
  learned = load(path).check(kind="coefficients")
  return {"solver": "learned:" + path, "nfe": learned.nfe}


def run_learned(denoise, x, grid, *, schedule, rng, in_dtype, coefficients=None):
  """solver="learned:<path>": the base solver's host plan on the saved grid plus the saved corrections."""
  del rng
  if coefficients is None:
    raise ValueError("run_learned needs coefficients=<a learned file or Learned>.")
  learned = coefficients if isinstance(coefficients, Learned) else load(coefficients)
  learned.check(schedule=schedule, kind="coefficients")
  if grid.num_steps != learned.t.size - 1 or not np.allclose(grid.t, learned.t, rtol=1e-9, atol=0):
    raise ValueError(f"The learned {learned.solver} coefficients were fitted on their own grid of "
                     f"{learned.t.size - 1} steps (nfe {learned.nfe}); got a grid of "
                     f"{grid.num_steps} steps.")
  entry = traceable.check_traceable(learned.solver)
  plan = entry.host(grid, **learned.options)
  mask = coefficient_mask(plan)
  if learned.delta.shape != mask.shape:
    raise ValueError(f"The saved corrections have shape {learned.delta.shape}; {learned.solver} "
                     f"with {grid.num_steps} steps needs {mask.shape}.")
  plan = apply_delta(plan, learned.delta, mask, np)
  return multistep.run(denoise, x, plan, in_dtype=in_dtype)


__all__ = ["learn_grid", "fit", "Fit", "Learned", "save", "load", "load_grid", "sample_kwargs",
           "run_learned", "coefficient_mask", "apply_delta", "reference_solution", "per_sample_distance", "COORDINATES"]
