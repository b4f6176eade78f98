"""The digits benchmark: FD-digits validated on the teacher, then the students' table.

  python -m experiments.distill.digits_table --workdir=runs/digits_table \\
      [--teacher=runs/teacher_digits] [--runs=runs/digits_table/ect,runs/digits_table/sid,...]

FD-digits (metrics/digits.py) is FID's formula on the features of a classifier trained in the
project. Before it ranks students it must rank what is known: on the evaluation's noise (the
256 x_T of every `<method>_digits` run, eval.seed 1) it scores
  * the floor: held-out test digits (10 draws of 256 of the 297);
  * train digits (256 drawn from the reference set itself: below the floor, not independent);
  * the teacher's exact PF-ODE map of the noise (adaptive Dopri8, rtol = atol = 1e-3);
  * the teacher's DDIM at 1, 2, 4, 8, 16, 32 calls and its best training-free solver at each;
  * UniPC-2 on a time grid learned at 2, 4 and 8 calls (`solvers.learn.learn_grid`, fitted to the
    teacher's exact map of 64 calibration draws disjoint from the evaluation's noise; left out
    with --no_learned_grids);
  * mode collapse: 256 train digits of one class;
and then reads each finished `experiments.distill` digits run in --runs (its results.json and
samples) for the students' rows: FD-digits, digits IS, coupling error to the exact map (of the
student's own schedule) and wall time. A --runs entry may be an `experiments.distill.seeds` sweep
(WORKDIR/seed<k>/ runs): its rows are the means over the finished seeds, FD-digits and coupling
with their sample std. Writes WORKDIR/digits_table.{md,json}, fd_vs_nfe.png
(FD against NFE with the floor) and samples.png (the first 12 samples of each row, same noise).
The exact map and the teacher's rows are kept (exact_map.npz, teacher_rows.npz, learned_rows.npz)
and reused when the noise is the same: a rerun with more --runs only scores the students (delete
them to redo).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill.data import digits8
from diffdistill.metrics import digits as digits_metric
from diffdistill.methods.plan import file_name
from diffdistill.solvers import learn
from experiments import teachers as teachers_lib
from experiments.distill import config as config_lib, evaluation, setup as setup_lib

DDIM_NFES = (1, 2, 4, 8, 16, 32)
SOLVER_NFES = (2, 4, 8, 16)
SOLVERS = ("dpm_solver_pp_2m", "unipc_2", "unipc_3", "deis_3", "ipndm", "dpm_solver_pp_3m", "heun")
LEARNED_SOLVER, LEARNED_NFES = "unipc_2", (2, 4, 8)
CALIBRATION_SEED, NUM_CALIBRATION = 1234, 64  # disjoint from eval.seed's noise


def _row(method, nfe, samples, scorer, reference=None, ms=None, seconds=None) -> dict:
  row = {"method": method, "nfe": nfe, **scorer.score(samples), "ms": ms, "seconds": seconds}
  if reference is not None:
    row["median"] = float(np.median(np.sqrt(np.mean(
        (np.asarray(samples, np.float64) - reference).reshape(len(reference), -1) ** 2, axis=1))))
  return row


def teacher_rows(setup, x_start, reference, scorer, *, progress=True) -> tuple[list, dict]:
  """The validation rows and the samples they scored (for the figure)."""
  import tqdm  # noqa: PLC0415
  n = len(x_start)
  floor = scorer.floor(n)
  x_train, y_train = digits8.load_split("train")
  rng = np.random.default_rng(0)
  rows = [{"method": f"held-out digits (floor, 10 draws of {n})", "nfe": 0,
           "fd_digits": floor["fd_mean"], "fd_std": floor["fd_std"], "is_digits": floor["is_mean"]},
          _row(f"train digits ({n} of the reference set)", 0,
               x_train[rng.choice(len(x_train), n, replace=False)], scorer),
          _row("teacher exact PF-ODE map", 0, reference, scorer, reference)]
  one = x_train[y_train == 3]
  rows.append(_row("mode collapse: train digits of one class", 0,
                   one[rng.choice(len(one), n, replace=True)], scorer))
  shown = {"teacher exact PF-ODE map": reference}
  jobs = [("ddim", k) for k in DDIM_NFES] + [(s, k) for k in SOLVER_NFES for s in SOLVERS]
  best: dict[int, dict] = {}
  for solver, nfe in tqdm.tqdm(jobs, desc="teacher solvers", disable=not progress):
    try:
      evaluation.solvers.steps_for_nfe(solver, nfe)
    except ValueError:
      continue
    out, ms = evaluation._time(setup.teacher_sampler(solver, nfe), x_start, repeats=3)
    row = _row(f"teacher {solver}", nfe, out, scorer, reference, ms)
    if solver == "ddim":
      rows.append(row)
      if nfe <= 2:
        shown[f"DDIM, {nfe}"] = out
    elif nfe not in best or row["median"] < best[nfe]["median"]:
      best[nfe] = row
  rows += [dict(r, method=f"teacher best solver ({r['method'][len('teacher '):]})")
           for r in best.values()]
  return rows, shown


def learned_grid_rows(setup, x_start, reference, scorer, *, progress=True) -> tuple[list, dict]:
  """LEARNED_SOLVER on a grid fitted at each of LEARNED_NFES to the teacher's exact map of
  NUM_CALIBRATION fresh draws, then run on the evaluation's noise (rows, samples shown)."""
  import tqdm  # noqa: PLC0415
  x_cal = np.asarray(setup.start_noise(jax.random.key(CALIBRATION_SEED), NUM_CALIBRATION))
  target = jnp.asarray(setup.exact_map(x_cal))
  denoise = functools.partial(setup.teacher.apply, teachers_lib.device_params(setup.teacher))
  rows, shown = [], {}
  for nfe in tqdm.tqdm(LEARNED_NFES, desc="learned grids", disable=not progress):
    start = time.perf_counter()
    grid = learn.learn_grid(denoise, jnp.asarray(x_cal), schedule=setup.teacher.schedule,
                            solver=LEARNED_SOLVER, nfe=nfe, target=target,
                            t_start=setup.t_start, t_end=setup.t_end)
    fit_seconds = time.perf_counter() - start
    out, ms = evaluation._time(setup.teacher_sampler(LEARNED_SOLVER, nfe, spacing=grid), x_start,
                               repeats=3)
    rows.append(_row(f"teacher {LEARNED_SOLVER} + learned grid", nfe, out, scorer, reference, ms,
                     seconds=fit_seconds))
    if nfe == 2:
      shown[f"{LEARNED_SOLVER} + learned grid, 2"] = out
  return rows, shown


def run_seeds(run_dir) -> list[str]:
  """The finished runs behind one --runs entry: the run itself, or the seed<k> runs of an
  `experiments.distill.seeds` sweep (in seed order)."""
  if os.path.exists(os.path.join(run_dir, "results.json")):
    return [run_dir]
  seeds = sorted((d for d in os.listdir(run_dir) if d.startswith("seed") and d[4:].isdigit()
                  and os.path.exists(os.path.join(run_dir, d, "results.json")))
                 if os.path.isdir(run_dir) else [], key=lambda d: int(d[4:]))
  if not seeds:
    raise FileNotFoundError(f"--runs: {run_dir!r} has no results.json and no finished seed<k>/ "
                            "runs (neither an experiments.distill run nor a seeds sweep).")
  return [os.path.join(run_dir, d) for d in seeds]


def _scored_run(d, eps, scorer) -> dict:
  """{(method, nfe): row} of one finished run's students, rescored from their samples."""
  with open(os.path.join(d, "results.json")) as f:
    res = json.load(f)
  out = {}
  for r in res["rows"]:
    if r["method"].startswith("teacher") or r["method"].startswith("network copy"):
      continue
    path = os.path.join(d, "samples", f"{file_name(r['method'])}_nfe{r['nfe']}.npz")
    with np.load(path) as f:
      if not np.allclose(f["x_start"] / float(f["sigma_start"]), eps, atol=1e-5):
        raise ValueError(f"{path} was sampled from other noise than eval.seed's 256 x_T; "
                         "its samples cannot sit in the same figure.")
      samples = f["samples"]
    out[(f"{res['variant'].rsplit('_', 1)[0]}: {r['method']}", r["nfe"])] = {
        **scorer.score(samples), "median": r["median"], "renoised": r.get("renoised", False),
        "ms": r["ms"], "seconds": res["seconds"]["total"], "samples": samples}
  return out


def student_rows(run_dirs, eps, scorer) -> tuple[list, dict]:
  """The students of finished digits runs (or seed sweeps: `run_seeds`), rescored; eps: the
  evaluation noise x_T / sigma(t_max) (a run on a rescheduled teacher starts from the same eps at
  its own scale). A sweep's row holds the mean over its seeds (FD-digits and coupling with their
  sample std, `seeds` the count, the per-seed values under `per_seed`); the figure shows the first
  seed's samples."""
  rows, shown = [], {}
  for d in run_dirs:
    scored = [_scored_run(s, eps, scorer) for s in run_seeds(d)]
    for key in scored[0]:
      per = [s[key] for s in scored if key in s]
      if len(per) != len(scored):
        raise ValueError(f"--runs: {d!r}: the row {key} is missing from some of its seeds.")
      row = {"method": key[0], "nfe": key[1], "seeds": len(per),
             "renoised": any(p["renoised"] for p in per)}
      for k in per[0]:
        if k not in ("samples", "renoised") and per[0][k] is not None:
          row[k] = float(np.mean([p[k] for p in per]))
      if len(per) > 1:
        row["fd_std"] = float(np.std([p["fd_digits"] for p in per], ddof=1))
        row["median_std"] = float(np.std([p["median"] for p in per], ddof=1))
        row["per_seed"] = {k: [p[k] for p in per] for k in ("fd_digits", "is_digits", "median",
                                                            "seconds")}
      rows.append(row)
      shown[f"{key[0]}, {key[1]}"] = per[0]["samples"]
  return rows, shown


def markdown(rows: list[dict]) -> str:
  lines = ["| row | NFE | seeds | FD-digits | digits IS | coupling error median | "
           "ms / 256 samples | run wall time |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    fd = f"{r['fd_digits']:.1f}" + (f" ± {r['fd_std']:.1f}" if "fd_std" in r else "")
    med = "–"
    if "median" in r:
      med = (f"{r['median']:.3f}" + (f" ± {r['median_std']:.3f}" if "median_std" in r else "")
             + ("†" if r.get("renoised") else ""))
    ms = f"{r['ms']:.1f}" if r.get("ms") is not None else "–"
    wall = f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "–"
    lines.append(f"| {r['method']} | {r['nfe'] or '–'} | {r.get('seeds', '–')} | {fd} | "
                 f"{r['is_digits']:.2f} | {med} | {ms} | {wall} |")
  return "\n".join(lines) + "\n"


def fd_figure(rows, path):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  floor = rows[0]
  ax.axhspan(floor["fd_digits"] - floor["fd_std"], floor["fd_digits"] + floor["fd_std"],
             color="0.85", label="held-out digits (floor ± std)")
  exact = next(r for r in rows if r["method"] == "teacher exact PF-ODE map")
  ax.axhline(exact["fd_digits"], color="k", ls=":", label="teacher exact PF-ODE map")
  ddim = sorted((r["nfe"], r["fd_digits"]) for r in rows if r["method"] == "teacher ddim")
  ax.loglog(*zip(*ddim), "s--", color="0.4", label="teacher DDIM")
  best = sorted((r["nfe"], r["fd_digits"]) for r in rows if r["method"].startswith("teacher best"))
  if best:
    ax.loglog(*zip(*best), "^--", color="0.6", label="teacher best solver (coupling)")
  learned = sorted((r["nfe"], r["fd_digits"]) for r in rows if r["method"].endswith("learned grid"))
  if learned:
    ax.loglog(*zip(*learned), "v--", color="0.2", label=f"teacher {LEARNED_SOLVER}, learned grid")
  students = [r for r in rows if ":" in r["method"] and r["nfe"]]  # not the NFE-0 reference rows
  names = list(dict.fromkeys(r["method"].split(":")[0] for r in students))
  colors = {n: plt.get_cmap("tab10")(k % 10) for k, n in enumerate(names)}
  for r in students:
    name = r["method"].split(":")[0]
    label = f"{name}, {r['nfe']} call{'s' if r['nfe'] > 1 else ''}"
    if r.get("seeds", 1) > 1:  # a seed sweep: the mean with the sample std over its seeds
      label += f" ({r['seeds']} seeds)"
    ax.errorbar(r["nfe"], r["fd_digits"], yerr=r.get("fd_std"), fmt="o" if r["nfe"] == 1 else "D",
                color=colors[name], capsize=3, label=label)
  ax.set_xlabel("NFE")
  ax.set_ylabel("FD-digits (256 samples)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=6.5, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def samples_figure(shown: dict, path, num: int = 12):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, axes = plt.subplots(len(shown), 1, figsize=(num * 0.55 + 2.6, 0.62 * len(shown)))
  for ax, (name, images) in zip(np.atleast_1d(axes), shown.items()):
    images = np.clip((np.asarray(images[:num]) + 1) / 2, 0, 1)[..., 0]
    strip = np.concatenate([np.pad(im, ((0, 0), (0, 1)), constant_values=1.0) for im in images], 1)
    ax.imshow(strip, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _cached_rows(path, x_start, compute) -> tuple[list, dict]:
  """(rows, samples shown) from `path` when it was written for this noise, else compute() saved
  there (the teacher's rows of one noise do not change between reruns with more --runs)."""
  if os.path.exists(path) and np.array_equal(np.load(path)["x_start"], x_start):
    with np.load(path) as f:
      return (json.loads(str(f["rows"])),
              {k[len("shown/"):]: f[k] for k in f.files if k.startswith("shown/")})
  rows, shown = compute()
  np.savez(path, x_start=x_start, rows=json.dumps(rows),
           **{f"shown/{k}": np.asarray(v) for k, v in shown.items()})
  return rows, shown


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--teacher", default="runs/teacher_digits")
  p.add_argument("--runs", default="", help="comma-separated experiments.distill digits workdirs "
                 "or seeds sweeps (workdirs of seed<k>/ runs: their rows are the mean over seeds)")
  p.add_argument("--classifier", default="runs/digits_classifier.npz")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--no_learned_grids", action="store_true",
                 help="leave out the learned-grid rows (their fits take ~20-45 min on 2 cores)")
  args = p.parse_args(argv)
  run_dirs = [d for d in args.runs.split(",") if d]
  for d in run_dirs:
    run_seeds(d)  # a finished run or sweep, else the error names it before any work
  t0 = time.perf_counter()
  config = config_lib.get_config("pd_digits")
  config.teacher.path = args.teacher
  setup = setup_lib.make_setup(config)
  x_start = np.asarray(setup.start_noise(jax.random.key(config.eval.seed), config.eval.num_samples))
  os.makedirs(args.workdir, exist_ok=True)
  cache = os.path.join(args.workdir, "exact_map.npz")
  if os.path.exists(cache) and np.array_equal(np.load(cache)["x_start"], x_start):
    reference = np.load(cache)["reference"]
  else:
    reference = setup.exact_map(x_start)
    np.savez(cache, x_start=x_start, reference=reference)
  scorer = digits_metric.DigitsScorer(digits_metric.classifier(args.classifier))
  rows, shown = _cached_rows(os.path.join(args.workdir, "teacher_rows.npz"), x_start,
                             lambda: teacher_rows(setup, x_start, reference, scorer,
                                                  progress=not args.no_progress))
  lrows, lshown = [], {}
  if not args.no_learned_grids:
    lrows, lshown = _cached_rows(os.path.join(args.workdir, "learned_rows.npz"), x_start,
                                 lambda: learned_grid_rows(setup, x_start, reference, scorer,
                                                           progress=not args.no_progress))
  rows += lrows
  shown.update(lshown)
  sigma_start = float(setup.teacher.schedule.sigma(jax.numpy.float32(setup.t_start)))
  srows, sshown = student_rows(run_dirs, x_start / sigma_start, scorer)
  rows += sorted(srows, key=lambda r: (r["nfe"], r["fd_digits"]))
  shown.update(sshown)
  text = markdown(rows)
  with open(os.path.join(args.workdir, "digits_table.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.workdir, "digits_table.json"), "w") as f:
    json.dump({"rows": rows, "runs": run_dirs, "teacher": args.teacher,
               "seconds": time.perf_counter() - t0}, f, indent=1)
  fd_figure(rows, os.path.join(args.workdir, "fd_vs_nfe.png"))
  samples_figure(shown, os.path.join(args.workdir, "samples.png"))
  print(text)


if __name__ == "__main__":
  main()
