"""Quickstart: distil the exact teacher into a few-step student, next to every training-free solver.

COMMAND:
  python -m experiments.quickstart.main [--workdir=runs/quickstart] [--config=...config.py:mixture64]
Expected runtime: about 2 minutes on 2 CPU cores (108 s measured: the student's training, and
compiling one sampler per solver and NFE). No network. See config.py for the variants and README.md for what the output shows.

The teacher is exact (`analytic.denoiser`), so the only error is the solver's: each method maps the
same noise x_T at t_max to t_min and is scored against the float64 adaptive solution of the
probability-flow ODE (`analytic.flow_map`) with `metrics.per_sample_error` (median and RMS over
samples of the per-coordinate RMS error). Wall time is the median of jitted calls after a warm-up.

A method is anything that maps (params, x_T) to samples with a known number of network calls
(`Method`). Three families fill the table:
  * solver:    every deterministic training-free solver of `solvers.SOLVERS`;
  * learned:   a solver on a time grid fitted to the teacher (`solvers.learn.learn_grid`, on
               calibration noise disjoint from x_T);
  * distilled: the students of an `experiments/distill` recipe (progressive distillation of the
               exact teacher by default: a network copy, then rounds 16 -> 8 -> 4 -> 2 -> 1), trained
               here in `workdir/distill` and sampled with their own NFE.
A new family is a function `build(config, setup) -> list[Method]` appended to `METHOD_BUILDERS`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Callable

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402

from diffdistill import _validate, analytic, metrics, schedules, solvers  # noqa: E402


def _define_flags():
  """Flags are defined only when this file runs as the program: tests import `run` from it
  beside other experiments' mains, and absl allows one definition of each flag name."""
  config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py"),
      "The quickstart config (variants: ring2d, mixture64, tiny).")
  flags.DEFINE_string("workdir", "runs/quickstart", "Where results and the figure go.")


@dataclasses.dataclass(frozen=True)
class Method:
  """One way of turning noise into samples.

  run(params, x_T) -> x at schedule.t_min, jitted; params are the teacher's (or, later, a
  generator's) and stay an explicit argument.
  """

  name: str  # e.g. "dpm_solver_pp_2m"
  family: str  # "solver" (training-free), "learned" (fitted grid) or "distilled"
  nfe: int  # network evaluations per sample
  nfe_asked: int  # the budget of the config; nfe is the nearest one the method meets exactly
  order: int | None  # theoretical order, where it has one
  run: Callable


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every method sees: the teacher, its schedule, the noise, and the exact answer."""

  schedule: schedules.Schedule
  apply: Callable  # the teacher denoiser apply(params, x, t) -> x0_hat
  params: analytic.GaussianMixture
  x_t: jax.Array  # [B, d], float32 noise at schedule.t_max
  reference: np.ndarray  # [B, d], float64: the exact flow map of x_t to schedule.t_min


def deterministic_solvers() -> list[str]:
  """Every solver of the registry that is deterministic and takes a fixed NFE."""
  return [name for name, info in solvers.SOLVERS.items()
          if not info.stochastic and name != "adaptive"]


def solver_names(config) -> list[str]:
  """config.solvers as registry names; empty: every deterministic solver.

  Names may come as a tuple or as comma lists inside it: `--config.solvers=ddim,heun` gives
  ('ddim,heun',), which is the same request as ('ddim', 'heun').
  """
  names = [n.strip() for entry in config.solvers for n in str(entry).split(",") if n.strip()]
  accepted = deterministic_solvers()
  unknown = [n for n in names if n not in accepted]
  if unknown:
    stochastic = [n for n in unknown if n in solvers.SOLVERS]
    why = f" ({stochastic} take random draws or choose their own NFE)" if stochastic else ""
    raise ValueError(f"config.solvers: {unknown} not usable here{why}; expected a comma list of "
                     f"{accepted}, or empty for all of them.")
  return list(dict.fromkeys(names)) or accepted


def validate(config) -> None:
  """Raises ValueError for any config value the run would reject, before anything is computed."""
  if config.teacher not in analytic.MIXTURES:
    raise ValueError(f"config.teacher must be one of {sorted(analytic.MIXTURES)}, got "
                     f"{config.teacher!r}.")
  schedule = schedules.get(config.schedule)
  if not isinstance(config.spacing, str) or config.spacing not in solvers.grids.SPACINGS:
    raise ValueError(f"config.spacing must be one of {list(solvers.grids.SPACINGS)}, got "
                     f"{config.spacing!r}.")
  solvers.grids.time_grid(schedule, 2, spacing=config.spacing)
  nfes = [_validate.check_int("config.nfe", n, min=1) for n in config.nfe]
  if not nfes:
    raise ValueError("config.nfe must hold at least one budget, e.g. (5, 10, 20).")
  for name in solver_names(config):
    for n in nfes:
      solvers.steps_for_nfe(name, n, allow_nearest_nfe=True)
  _validate.check_int("config.batch", config.batch, min=1)
  _validate.check_int("config.repeats", config.repeats, min=1)
  _validate.check_int("config.seed", config.seed, min=0)
  if not config.ref_tol > 0:
    raise ValueError(f"config.ref_tol must be > 0, got {config.ref_tol}.")


def solver_methods(config, setup: Setup) -> list[Method]:
  """The training-free solvers at each NFE of the config (the nearest feasible NFE if needed)."""
  out = []
  for name in solver_names(config):
    info = solvers.SOLVERS[name]
    for asked in config.nfe:
      _, nfe = solvers.steps_for_nfe(name, asked, allow_nearest_nfe=True)
      run = solvers.make_sampler(setup.apply, schedule=setup.schedule, solver=name, nfe=nfe,
                                 spacing=config.spacing)
      out.append(Method(name=name, family="solver", nfe=nfe, nfe_asked=asked, order=info.order,
                        run=run))
  return out


def learned_methods(config, setup: Setup) -> list[Method]:
  """Each of config.learned's solvers on a grid fitted to the teacher at each NFE it can meet."""
  from experiments.learned_sampling import main as learned_lib  # noqa: PLC0415
  out = []
  for name in config.learned:
    for asked in config.nfe:
      if asked < solvers.SOLVERS[name].min_steps:
        continue
      run, _ = learned_lib.learned_grid_sampler(setup.apply, setup.params, schedule=setup.schedule,
                                                solver=name, nfe=asked)
      out.append(Method(name=f"{name} + learned grid", family="learned", nfe=asked,
                        nfe_asked=asked, order=solvers.SOLVERS[name].order, run=run))
  return out


def distilled_methods(config, setup: Setup) -> list[Method]:
  """Trains the students of experiments/distill's `config.distill` variant on this teacher."""
  if not config.distill:
    return []
  from experiments.distill import config as distill_config  # noqa: PLC0415
  from experiments.distill import main as distill_main  # noqa: PLC0415
  from experiments.distill import setup as distill_setup, stages as distill_stages  # noqa: PLC0415
  dconfig = distill_config.get_config(config.distill)
  dconfig.progress = False
  dconfig.eval.copy_rows = False
  if dconfig.teacher.name != config.teacher or dconfig.teacher.schedule != config.schedule:
    raise ValueError(f"config.distill={config.distill!r} distils {dconfig.teacher.name} under "
                     f"{dconfig.teacher.schedule}, but the quickstart's teacher is "
                     f"{config.teacher} under {config.schedule}.")
  dsetup = distill_setup.make_setup(dconfig)
  plan = distill_main.build_plan(dconfig, dsetup)
  results, _ = distill_stages.run_stages(plan, dsetup, os.path.join(config.workdir, "distill"),
                                         progress=False)
  out = []
  for student in plan.students:
    run = functools.partial(jax.jit(student.run), student.params(results))
    out.append(Method(name=f"{dconfig.method} student", family="distilled", nfe=student.nfe,
                      nfe_asked=student.nfe, order=None,
                      run=lambda teacher_params, x, run=run: run(x)))
  return out


METHOD_BUILDERS = (solver_methods, learned_methods, distilled_methods)


def make_setup(config) -> Setup:
  """The teacher, float32 noise x_T ~ p_{t_max} and its exact float64 flow map to t_min."""
  schedule = schedules.get(config.schedule)
  mix = analytic.get_mixture(config.teacher)
  apply = analytic.denoiser(schedule)
  k0, k1 = jax.random.split(jax.random.PRNGKey(config.seed))
  t_max = jnp.float32(schedule.t_max)
  x0 = analytic.sample(mix, k0, config.batch, dtype=jnp.float32)
  x_t = schedule.alpha(t_max) * x0 + schedule.sigma(t_max) * jax.random.normal(k1, x0.shape)
  with jax.enable_x64(True):
    mix64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), mix)
    ref = analytic.flow_map(apply, mix64, jnp.asarray(x_t, jnp.float64), schedule=schedule,
                            t_start=schedule.t_max, t_end=schedule.t_min, rtol=config.ref_tol,
                            atol=config.ref_tol)
    ref = np.asarray(ref)
  return Setup(schedule=schedule, apply=apply, params=mix, x_t=x_t, reference=ref)


def evaluate(method: Method, setup: Setup, *, repeats: int) -> dict:
  """Error against the reference, compile time and the median wall time of a jitted call."""
  t0 = time.perf_counter()
  x = jax.block_until_ready(method.run(setup.params, setup.x_t))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(method.run(setup.params, setup.x_t))
    times.append(time.perf_counter() - t0)
  with jax.enable_x64(True):
    err = metrics.per_sample_error(jnp.asarray(x, jnp.float64), jnp.asarray(setup.reference))
  return dict(name=method.name, family=method.family, nfe=method.nfe, nfe_asked=method.nfe_asked,
              order=method.order,
              median=float(err["median"]), rms=float(err["rms"]), max=float(err["max"]),
              nan=bool(np.any(~np.isfinite(np.asarray(x)))), ms=1e3 * statistics.median(times),
              compile_s=compile_s, samples=np.asarray(x))


def run(config, workdir: str, *, progress: bool = True) -> list[dict]:
  """Builds every method, evaluates it, writes results.{json,md} and quickstart.png to workdir.

  A bad config or workdir fails before anything is computed, and the workdir is created only
  when the results are written, so a failed run leaves no empty folder behind.
  """
  validate(config)
  _validate.check_writable_dir("workdir", workdir)
  setup = make_setup(config)
  with config.unlocked():
    config.workdir = workdir
  methods = []
  for build in METHOD_BUILDERS:
    t0 = time.perf_counter()
    methods += build(config, setup)
    if progress:
      print(f"{build.__name__}: {time.perf_counter() - t0:.0f} s", flush=True)
  rows = []
  for method in tqdm.tqdm(methods, desc="methods x NFE", disable=not progress):
    rows.append(evaluate(method, setup, repeats=config.repeats))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table(rows, config))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"config": config.to_dict(),
               "rows": [{k: v for k, v in r.items() if k != "samples"} for r in rows]}, f, indent=1)
  figure(rows, setup, config, os.path.join(workdir, "quickstart.png"))
  return rows


def table(rows: list[dict], config) -> str:
  """One line per method: median / RMS error and ms per call at each NFE of the config."""
  by_name: dict[str, dict[int, dict]] = {}
  for r in rows:
    by_name.setdefault(r["name"], {})[r["nfe_asked"]] = r
  head = (f"{config.teacher} under {config.schedule}, {config.batch} samples, {config.spacing} "
          "grid. error: per-sample RMS distance to the exact flow map, median / RMS over samples; "
          "ms: median wall time of one jitted call; (NFE n): the nearest budget the method meets "
          "exactly.\n\n")
  cols = sorted({r["nfe_asked"] for r in rows})
  lines = ["| method | order | " + " | ".join(f"NFE {n}: median / RMS / ms" for n in cols) + " |",
           "|---|---:|" + "---:|" * len(cols)]
  for name, per_nfe in by_name.items():
    order = next(iter(per_nfe.values()))["order"]
    cells = []
    for n in cols:
      r = per_nfe.get(n)
      if r is None:
        cells.append("")
        continue
      cell = f"{r['median']:.2e} / {r['rms']:.2e} / {r['ms']:.1f}"
      cell += f" (NFE {r['nfe']})" if r["nfe"] != n else ""
      cells.append(cell + (" NaN!" if r["nan"] else ""))
    lines.append(f"| {name} | {order if order is not None else '-'} | " + " | ".join(cells) + " |")
  return head + "\n".join(lines) + "\n"


def _scatter_rows(rows: list[dict], config) -> list[dict]:
  """The sample panels: each of config.scatter_methods and each learned-grid method, at the NFE
  nearest config.scatter_nfe."""
  names = list(config.scatter_methods) + [r["name"] for r in rows if r["family"] == "learned"]
  out = []
  for name in dict.fromkeys(names):
    own = [r for r in rows if r["name"] == name]
    if own:
      out.append(min(own, key=lambda r: abs(r["nfe"] - config.scatter_nfe)))
  return out


def figure(rows: list[dict], setup: Setup, config, path: str) -> None:
  """Error vs NFE (the scatter methods, the learned grids and the students in colour, every other
  solver in grey); for 2-D teachers, samples at config.scatter_nfe, two rows of panels.

  Sized to be read where a README shows it (~900 px wide): one legend entry per coloured line,
  NFE ticks only at the budgets asked for.
  """
  two_d = setup.reference.shape[-1] == 2
  scatter = _scatter_rows(rows, config) if two_d else []
  panels = [("exact flow map", setup.reference)] if two_d else []
  panels += [(f"{r['name']}\nNFE {r['nfe']}, median err {r['median']:.1e}", r["samples"])
             for r in scatter]
  pcols = -(-len(panels) // 2)
  fig = plt.figure(figsize=(7.0 + 2.6 * pcols, 6.0))
  grid = fig.add_gridspec(2, 1 + pcols, width_ratios=[2.6] + [1.0] * pcols)
  ax = fig.add_subplot(grid[:, 0])
  names = list(dict.fromkeys(r["name"] for r in rows))
  highlighted = [n for n in names if n in config.scatter_methods
                 or any(r["family"] != "solver" for r in rows if r["name"] == n)]
  colours = dict(zip(highlighted, plt.get_cmap("tab10").colors))
  others = 0
  for name in names:
    pts = sorted((r["nfe"], r["median"]) for r in rows if r["name"] == name)
    if name in colours:
      ax.loglog(*zip(*pts), marker="o", ms=5, lw=2.2, color=colours[name], label=name, zorder=3)
    else:
      others += 1
      ax.loglog(*zip(*pts), lw=0.8, color="0.7", zorder=1,
                label=f"the other {sum(n not in colours for n in names)} solvers (results.md)"
                if others == 1 else None)
  ticks = sorted(set(config.nfe) | {r["nfe"] for r in rows if r["family"] == "distilled"})
  ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
  ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(n) for n in ticks]))
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.tick_params(labelsize=10)
  ax.set_xlabel("NFE (denoiser calls)", fontsize=11)
  ax.set_ylabel("median per-sample error vs the exact flow map", fontsize=11)
  ax.set_title(f"{config.teacher}, {config.schedule}, {config.spacing} grid", fontsize=12)
  ax.grid(True, which="major", alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("the other"))
  ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=9,
            loc="lower left", framealpha=0.9)
  if panels:
    lim = 1.2 * float(np.abs(setup.reference).max())
    for k, (title, x) in enumerate(panels):
      pax = fig.add_subplot(grid[k // pcols, 1 + k % pcols])
      pax.scatter(x[:2000, 0], x[:2000, 1], s=1, c="k", alpha=0.5)
      pax.set_title(title, fontsize=9.5)
      pax.set_xlim(-lim, lim)
      pax.set_ylim(-lim, lim)
      pax.set_aspect("equal")
      pax.set_xticks([])
      pax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint of the distilled student
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  start = time.perf_counter()
  rows = run(config, workdir)
  print(table(rows, config))
  print(f"{len(rows)} runs in {time.perf_counter() - start:.0f} s; results.md, results.json and "
        f"quickstart.png in {workdir}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
