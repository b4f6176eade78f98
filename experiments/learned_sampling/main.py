"""Learned grids and coefficients against the best training-free solver and spacing; Analytic-DPM
against the fixed reverse variances.

COMMAND: see config.py. For each teacher (an analytic mixture "name[:seed]", or a trained
teacher "workdir:PATH"; the fit uses only its denoiser): calibration noise and disjoint test
noise at t_max, both solved by the teacher's adaptive reference; every (solver, spacing) of the
config at each NFE; the learned grid (and learned coefficients) of `config.learned_solver`
fitted on the calibration draws and scored on both sets. Error: per-sample RMS distance to the
reference (`learn.per_sample_distance`), median and mean over samples.

Ancestral sampling (`analytic_dpm.sample`, DDPM = DDIM-eta with eta = 1, on the
`config.ancestral_spacing` grid) with the three reverse variances "analytic" (Bao et al.'s
optimum, Gamma estimated by `analytic_dpm.estimate_gamma` from the teacher on calibration data
samples), "posterior" (beta tilde) and "forward" (beta), at each NFE, from the same test noise.
These samplers are stochastic, so a per-sample distance to the ODE map means nothing: they are
scored as distributions, sliced W2 and MMD^2 against data samples with the data-vs-data floor
(`train_teacher.sampling.sample_quality` for analytic teachers, exact samples; for a trained
teacher, disjoint batches of its training set), next to the same numbers for the best standard
solver and the learned variants at that NFE.

Writes results.json, results.md and grids.png into the workdir.

`learned_grid_sampler` is the hook for experiments/quickstart: it fits a grid for one solver and
NFE on fresh calibration noise and returns a jitted `run(params, x_T)`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from diffdistill import analytic, metrics, schedules, solvers  # noqa: E402
from diffdistill import data as data_lib  # noqa: E402
from diffdistill.solvers import analytic_dpm, grids, learn  # noqa: E402
from experiments import teachers as teachers_lib  # noqa: E402
from experiments.train_teacher import sampling  # noqa: E402

WORKDIR_PREFIX = "workdir:"  # config.teachers entry of a trained teacher: "workdir:PATH"
# summary entries per teacher that are not learned methods
SUMMARY_KEYS = ("best_standard", "distribution", "schedule")


def _define_flags():
  """Only when run as the program (tests import this module beside other mains)."""
  config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py"),
      "The learned_sampling config (variants: gmm64, quick, ring2d, digits, tiny).")
  flags.DEFINE_string("workdir", "runs/learned_sampling", "Where results and the figure go.")


def teacher(name: str):
  """'mixture64' or 'mixture64:1' (the seed of a mixture that takes one)."""
  base, _, seed = name.partition(":")
  return analytic.get_mixture(base, **({"seed": int(seed)} if seed else {}))


def noise(schedule, n, shape, key):
  """n draws of the prior sigma(t_max) eps, eps ~ N(0, I) of `shape` (an int: [n, shape])."""
  shape = (shape,) if isinstance(shape, int) else tuple(shape)
  return jax.random.normal(key, (n, *shape)) * schedule.sigma(jnp.float32(schedule.t_max))


def load_teacher(name: str, config) -> teachers_lib.Teacher:
  """An analytic mixture on `config.schedule`, or the trained teacher of "workdir:PATH" (with its
  own schedule; `config.schedule` does not apply to it)."""
  if name.startswith(WORKDIR_PREFIX):
    return teachers_lib.load(kind="workdir", path=name[len(WORKDIR_PREFIX):])
  schedule = schedules.get(config.schedule)
  mix = teacher(name)
  return teachers_lib.Teacher(name=name, apply=analytic.denoiser(schedule), params=mix,
                              schedule=schedule, example_shape=(mix.dim,), mixture=mix)


def file_label(name: str) -> str:
  """A file-name-safe label: 'mixture64:1' -> 'mixture64_seed1', 'workdir:runs/t' -> 'workdir_t'."""
  if name.startswith(WORKDIR_PREFIX):
    name = "workdir_" + os.path.basename(os.path.normpath(name[len(WORKDIR_PREFIX):]))
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace(":", "_seed"))


def dataset_samples(path: str, n: int, *, seed: int) -> np.ndarray:
  """n distinct training examples of the trained teacher in `path` (one shuffled batch; n must
  not exceed the split, so that the sets cut from it are disjoint)."""
  with open(os.path.join(path, "config.json")) as f:
    ds = json.load(f)["dataset"]
  data = data_lib.get_dataset(ds["name"], split="train", batch_size=n, seed=seed, prefetch=0,
                              data_dir=ds.get("data_dir"), num_examples=ds.get("num_examples"))
  try:
    if n > data.num_examples:
      raise ValueError(f"The trained teacher's dataset {ds['name']!r} has {data.num_examples} "
                       f"training examples; num_calibration + 3 num_test = {n} disjoint ones "
                       "were asked for. Lower num_calibration or num_test.")
    return np.asarray(next(data)["x"], np.float32)
  finally:
    data.close()


def data_quality(samples: np.ndarray, ref: np.ndarray, floor_a: np.ndarray,
                 floor_b: np.ndarray) -> dict:
  """`sampling.sample_quality` with data sets in place of exact mixture draws: sliced W2 and
  MMD^2 of samples vs ref, and the floor: the same distances between floor_a and floor_b (all
  [N, ...], flattened; disjoint draws of the data)."""
  flat = lambda a: jnp.asarray(np.reshape(a, (len(a), -1)), jnp.float32)
  x, r, a, b = flat(samples), flat(ref), flat(floor_a), flat(floor_b)
  return {"sliced_w2": float(metrics.sliced_wasserstein(x, r)),
          "sliced_w2_floor_mean": float(metrics.sliced_wasserstein(a, b)),
          "mmd2": float(metrics.mmd2(x, r)), "mmd2_floor_mean": float(metrics.mmd2(a, b))}


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


def _quality_fn(t: teachers_lib.Teacher, name: str, config):
  """(x0 calibration samples for Gamma [num_calibration, ...], quality(samples) -> dict): exact
  mixture draws for analytic teachers (independent of sample_quality's own reference draws),
  disjoint training examples for a trained one."""
  n_cal, n = config.num_calibration, config.num_test
  if t.mixture is not None:
    x0 = analytic.sample(t.mixture, jax.random.fold_in(jax.random.PRNGKey(config.seed), 3), n_cal,
                         dtype=jnp.float32)
    quality = lambda x: sampling.sample_quality(np.reshape(x, (len(x), -1)), t.mixture,
                                                seed=config.seed)
    return x0, quality
  data = dataset_samples(name[len(WORKDIR_PREFIX):], n_cal + 3 * n, seed=config.seed)
  x0, ref, a, b = np.split(data, [n_cal, n_cal + n, n_cal + 2 * n])
  return jnp.asarray(x0), lambda x: data_quality(np.asarray(x), ref, a, b)


def _distribution(q: dict) -> dict:
  return {k: q[k] for k in ("sliced_w2", "sliced_w2_floor_mean", "mmd2", "mmd2_floor_mean")}


def run_teacher(config, name, workdir):
  """All rows for one teacher."""
  t = load_teacher(name, config)
  schedule = t.schedule
  denoise = functools.partial(t.apply, teachers_lib.device_params(t))
  k_cal, k_test = jax.random.split(jax.random.PRNGKey(config.seed))
  x_cal = noise(schedule, config.num_calibration, t.example_shape, k_cal)
  x_test = noise(schedule, config.num_test, t.example_shape, k_test)
  ref = lambda x: learn.reference_solution(denoise, x, schedule=schedule,
                                           rtol=config.reference_tol, atol=config.reference_tol)
  ref_cal, ref_test = ref(x_cal), ref(x_test)
  x0_cal, quality = _quality_fn(t, name, config)
  rows, learned_grids = [], {}
  for nfe in sorted(set(config.nfe) | set(config.match_nfe)):
    best = None
    for solver in config.solvers:
      if nfe < solvers.SOLVERS[solver].min_steps:
        continue
      for spacing in config.spacings:
        x = solvers.sample(denoise, x_test, schedule=schedule, solver=solver, nfe=nfe,
                           spacing=spacing)
        rows.append(dict(teacher=name, method=f"{solver}/{spacing}", kind="standard", nfe=nfe,
                         test=_errors(x, ref_test)))
        if best is None or rows[-1]["test"]["median"] < best[0]["test"]["median"]:
          best = (rows[-1], x)
    if nfe not in config.nfe:
      continue
    if best is not None:  # the distribution scores of the best standard, for the ancestral table
      best[0]["distribution"] = _distribution(quality(best[1]))
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
      path = os.path.join(workdir, f"{file_label(name)}_{config.learned_solver}_"
                          f"{label.replace('+', '_')}_nfe{nfe}.json")
      learn.save(path, saved)
      if coef:
        run = lambda x: solvers.sample(denoise, x, schedule=schedule, **learn.sample_kwargs(path))
      else:
        run = lambda x: solvers.sample(denoise, x, spacing=fit.t, **kw)
        learned_grids[nfe] = fit.t
      x = run(x_test)
      rows.append(dict(teacher=name, method=f"{config.learned_solver}/learned {label}",
                       kind="learned", nfe=nfe, test=_errors(x, ref_test),
                       calibration=_errors(run(x_cal), ref_cal), fit_seconds=seconds,
                       distribution=_distribution(quality(x)), file=os.path.basename(path)))
    rows += ancestral_rows(denoise, x_test, x0_cal, quality, schedule=schedule, nfe=nfe,
                           name=name, config=config)
  return rows, learned_grids, schedule


def ancestral_rows(denoise, x_test, x0_cal, quality, *, schedule, nfe, name, config):
  """DDPM (eta = 1) at `nfe` with each reverse variance of analytic_dpm.VARIANCES, one jitted
  sampler each, from x_test with one fixed key; Gamma at the grid's step starts from x0_cal."""
  t = grids.time_grid(schedule, nfe, spacing=config.ancestral_spacing)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1000 + nfe)
  k_gamma, k_sample = jax.random.split(key)
  start = time.perf_counter()
  gamma, prior_var = analytic_dpm.estimate_gamma(denoise, x0_cal, t[:-1], schedule=schedule,
                                                 rng=k_gamma)
  gamma_seconds = time.perf_counter() - start
  rows = []
  for kind in analytic_dpm.VARIANCES:
    run = jax.jit(functools.partial(
        analytic_dpm.sample, denoise, schedule=schedule, nfe=nfe, kind=kind, eta=1.0,
        spacing=config.ancestral_spacing, gamma=gamma, prior_var=prior_var))
    x = np.asarray(run(x_test, rng=k_sample))
    row = dict(teacher=name, method=f"ddpm/{kind}", kind="ancestral", nfe=nfe,
               nan=bool(np.any(~np.isfinite(x))), distribution=_distribution(quality(x)))
    if kind == "analytic":
      row.update(gamma=[float(g) for g in gamma], prior_var=prior_var, gamma_seconds=gamma_seconds)
    rows.append(row)
  return rows


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
    for method in [m for m in summary if m not in SUMMARY_KEYS]:
      if 10 in summary[method]:
        target = summary[method][10]["test"]["median"]
        match = [n for n, r in sorted(best.items()) if r["test"]["median"] <= target]
        summary[method]["standard_nfe_to_match_at_10"] = match[0] if match else (
            f"> {max(best)}")
    summary["distribution"] = _distribution_summary(own, best, config)
    out[name] = summary
  return out


def _distribution_summary(own, best, config):
  """Per NFE of config.nfe: the distribution scores of each ancestral variance, the best standard
  solver (named) and each learned variant, and the floor."""
  out = {}
  for n in config.nfe:
    entry = {}
    for r in own:
      if r["nfe"] == n and r["kind"] in ("ancestral", "learned"):
        entry[r["method"]] = {**r["distribution"], **({"nan": r["nan"]} if "nan" in r else {})}
    if n in best and "distribution" in best[n]:
      entry["best_standard"] = {"method": best[n]["method"], **best[n]["distribution"]}
    if entry:
      any_row = next(iter(entry.values()))
      entry["floor"] = {"sliced_w2": any_row["sliced_w2_floor_mean"],
                        "mmd2": any_row["mmd2_floor_mean"]}
    out[n] = entry
  return out


def table(summary, config) -> str:
  lines = []
  for name, s in summary.items():
    lines.append(f"\n### {name} ({s.get('schedule', config.schedule)}); median per-sample error "
                 "on held-out noise (calibration in brackets)\n")
    methods = [m for m in s if m not in SUMMARY_KEYS]
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
    lines += distribution_table(name, s["distribution"], config)
  return "\n".join(lines) + "\n"


def distribution_table(name, d, config) -> list[str]:
  """Analytic-DPM's section: sliced W2 / MMD^2 of each sampler's test samples against data."""
  lines = [f"\n### {name}: ancestral sampling (DDPM, eta = 1, {config.ancestral_spacing} grid) by "
           "reverse variance; sliced W2 / MMD^2 to data samples (floor: data vs data)\n"]
  learned = sorted({m for e in d.values() for m in e if "/learned" in m})
  variances = [f"ddpm/{k}" for k in analytic_dpm.VARIANCES]
  lines.append("| NFE | floor | " + " | ".join(variances) + " | best standard (ODE) | "
               + " | ".join(learned) + " |")
  lines.append("|---:|" + "---|" * (2 + len(variances) + len(learned)))
  cell = lambda q: "n/a" if q is None else f"{q['sliced_w2']:.3g} / {q['mmd2']:.2e}"
  for n in config.nfe:
    e = d.get(n, {})
    if not e:
      continue
    b = e.get("best_standard")
    best = "n/a" if b is None else f"{cell(b)} ({b['method']})"
    lines.append(f"| {n} | {cell(e['floor'])} | " + " | ".join(cell(e.get(m)) for m in variances)
                 + f" | {best} | " + " | ".join(cell(e.get(m)) for m in learned) + " |")
  return lines


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
  rows, figure_grids, schedule, schedules_used = [], None, None, {}
  for name in config.teachers:
    r, g, schedule = run_teacher(config, name, workdir)
    schedules_used[name] = schedule
    rows += r
    figure_grids = figure_grids or g
  summary = summarize(rows, config)
  for name, sch in schedules_used.items():
    summary[name]["schedule"] = repr(sch)
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
