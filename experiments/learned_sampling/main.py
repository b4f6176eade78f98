"""Learned grids and coefficients against the best training-free solver and spacing.

COMMAND: see config.py. For each teacher (an analytic mixture; the fit uses only its denoiser):
calibration noise and disjoint test noise at t_max, both solved by the teacher's adaptive
reference; every (solver, spacing) of the config at each NFE; the learned grid (and learned
coefficients) of `config.learned_solver` fitted on the calibration draws and scored on both
sets. Error: per-sample RMS distance to the reference (`learn.per_sample_distance`), median and
mean over samples. Writes results.json, results.md and grids.png into the workdir.

`learned_grid_sampler` is the hook for experiments/quickstart: it fits a grid for one solver and
NFE on fresh calibration noise and returns a jitted `run(params, x_T)`.
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from diffdistill import analytic, schedules, solvers  # noqa: E402
from diffdistill.solvers import grids, learn  # noqa: E402


def _define_flags():
  """Only when run as the program (tests import this module beside other mains)."""
  config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py"),
      "The learned_sampling config (variants: gmm64, quick, ring2d, tiny).")
  flags.DEFINE_string("workdir", "runs/learned_sampling", "Where results and the figure go.")


def teacher(name: str):
  """'mixture64' or 'mixture64:1' (the seed of a mixture that takes one)."""
  base, _, seed = name.partition(":")
  return analytic.get_mixture(base, **({"seed": int(seed)} if seed else {}))


def noise(schedule, n, dim, key):
  return jax.random.normal(key, (n, dim)) * schedule.sigma(jnp.float32(schedule.t_max))


def learned_grid_sampler(apply, params, *, schedule, solver, nfe, num_calibration=256, seed=1234,
                         **fit_options):
  """Fits a grid for `solver` at `nfe` on `num_calibration` fresh draws (seed disjoint from the
  caller's noise) and returns (run(params, x_T) jitted, grid). For the quickstart's Method."""
  dim = params.dim
  x_cal = noise(schedule, num_calibration, dim, jax.random.PRNGKey(seed))
  grid = learn.learn_grid(functools.partial(apply, params), x_cal, schedule=schedule,
                          solver=solver, nfe=nfe, **fit_options)
  run = solvers.make_sampler(apply, schedule=schedule, solver=solver, nfe=nfe, spacing=grid)
  return run, grid


def _errors(x, ref):
  e = np.asarray(learn.per_sample_distance(jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)))
  return {"median": float(np.median(e)), "mean": float(np.mean(e))}


def run_teacher(config, name, workdir):
  """All rows for one teacher."""
  schedule = schedules.get(config.schedule)
  mix = teacher(name)
  denoise = functools.partial(analytic.denoiser(schedule), mix)
  k_cal, k_test = jax.random.split(jax.random.PRNGKey(config.seed))
  x_cal = noise(schedule, config.num_calibration, mix.dim, k_cal)
  x_test = noise(schedule, config.num_test, mix.dim, k_test)
  ref = lambda x: learn.reference_solution(denoise, x, schedule=schedule,
                                           rtol=config.reference_tol, atol=config.reference_tol)
  ref_cal, ref_test = ref(x_cal), ref(x_test)
  rows, learned_grids = [], {}
  for nfe in sorted(set(config.nfe) | set(config.match_nfe)):
    for solver in config.solvers:
      if nfe < solvers.SOLVERS[solver].min_steps:
        continue
      for spacing in config.spacings:
        x = solvers.sample(denoise, x_test, schedule=schedule, solver=solver, nfe=nfe,
                           spacing=spacing)
        rows.append(dict(teacher=name, method=f"{solver}/{spacing}", kind="standard", nfe=nfe,
                         test=_errors(x, ref_test)))
    if nfe not in config.nfe:
      continue
    kw = dict(schedule=schedule, solver=config.learned_solver, nfe=nfe)
    fit_kw = dict(iterations=config.iterations, learning_rate=config.learning_rate,
                  target=ref_cal, **kw)
    variants = [("grid", False)] + ([("grid+coefficients", True)] if config.learn_coefficients else [])
    for label, coef in variants:
      start = time.perf_counter()
      fit = learn.fit(denoise, x_cal, learn_coefficients=coef,
                      coefficient_learning_rate=config.coefficient_learning_rate, **fit_kw)
      seconds = time.perf_counter() - start
      saved = learn.Learned(teacher=name, solver=config.learned_solver, nfe=nfe,
                            schedule=repr(schedule), t=fit.t, delta=fit.delta,
                            info={"calibration_loss": fit.best_loss, "fit_seconds": seconds})
      path = os.path.join(workdir, f"{name.replace(':', '_seed')}_{config.learned_solver}_"
                          f"{label.replace('+', '_')}_nfe{nfe}.json")
      learn.save(path, saved)
      if coef:
        run = lambda x: solvers.sample(denoise, x, schedule=schedule, **learn.sample_kwargs(path))
      else:
        run = lambda x: solvers.sample(denoise, x, spacing=fit.t, **kw)
        learned_grids[nfe] = fit.t
      rows.append(dict(teacher=name, method=f"{config.learned_solver}/learned {label}",
                       kind="learned", nfe=nfe, test=_errors(run(x_test), ref_test),
                       calibration=_errors(run(x_cal), ref_cal), fit_seconds=seconds,
                       file=os.path.basename(path)))
  return rows, learned_grids, schedule


def summarize(rows, config):
  """Per teacher and NFE: the best standard (solver/spacing) and each learned variant; the NFE
  the best standard needs to match learned at 10."""
  out = {}
  for name in config.teachers:
    own = [r for r in rows if r["teacher"] == name]
    best = {}
    for r in own:
      if r["kind"] == "standard" and (r["nfe"] not in best or
                                      r["test"]["median"] < best[r["nfe"]]["test"]["median"]):
        best[r["nfe"]] = r
    summary = {"best_standard": {n: {"method": r["method"], **r["test"]} for n, r in sorted(best.items())}}
    for r in own:
      if r["kind"] == "learned":
        summary.setdefault(r["method"], {})[r["nfe"]] = {
            "test": r["test"], "calibration": r["calibration"], "fit_seconds": r["fit_seconds"]}
    for method in [m for m in summary if m != "best_standard"]:
      if 10 in summary[method]:
        target = summary[method][10]["test"]["median"]
        match = [n for n, r in sorted(best.items()) if r["test"]["median"] <= target]
        summary[method]["standard_nfe_to_match_at_10"] = match[0] if match else (
            f"> {max(best)}")
    out[name] = summary
  return out


def table(summary, config) -> str:
  lines = []
  for name, s in summary.items():
    lines.append(f"\n### {name} ({config.schedule}); median per-sample error on held-out noise "
                 "(calibration in brackets)\n")
    methods = [m for m in s if m != "best_standard"]
    lines.append("| NFE | best standard (solver/spacing) | " + " | ".join(methods) + " |")
    lines.append("|---:|---|" + "---|" * len(methods))
    for n in config.nfe:
      b = s["best_standard"][n]
      cells = [f"{s[m][n]['test']['median']:.2e} ({s[m][n]['calibration']['median']:.2e})"
               for m in methods]
      lines.append(f"| {n} | {b['median']:.2e} ({b['method']}) | " + " | ".join(cells) + " |")
    for m in methods:
      if "standard_nfe_to_match_at_10" in s[m]:
        lines.append(f"\n{m} at NFE 10 is matched by the best standard solver at NFE "
                     f"{s[m]['standard_nfe_to_match_at_10']}.")
  return "\n".join(lines) + "\n"


def figure(learned_grids, schedule, config, path):
  """logSNR of each grid point against its index, learned vs standard, one panel per NFE."""
  nfes = sorted(learned_grids)
  fig, axes = plt.subplots(1, len(nfes), figsize=(3.2 * len(nfes), 3.2), squeeze=False)
  for ax, n in zip(axes[0], nfes):
    steps = solvers.steps_for_nfe(config.learned_solver, n)[0]
    for spacing in config.spacings:
      t = grids.time_grid(schedule, steps, spacing=spacing)
      ax.plot(grids.host_grid(schedule, t).lam, marker=".", lw=1, label=spacing)
    ax.plot(grids.host_grid(schedule, learned_grids[n]).lam, marker="o", lw=2, c="k",
            label="learned")
    ax.set_title(f"NFE {n}")
    ax.set_xlabel("step i")
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel("lambda = log(alpha / sigma)")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  rows, figure_grids, schedule = [], None, None
  for name in config.teachers:
    r, g, schedule = run_teacher(config, name, workdir)
    rows += r
    figure_grids = figure_grids or g
  summary = summarize(rows, config)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table(summary, config))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"config": config.to_dict(), "summary": summary, "rows": rows}, f, indent=1)
  figure(figure_grids, schedule, config, os.path.join(workdir, "grids.png"))
  return summary


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  start = time.perf_counter()
  summary = run(config, workdir)
  print(table(summary, config))
  print(f"done in {time.perf_counter() - start:.0f} s; results.md, results.json and grids.png "
        f"in {workdir}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
