"""The multi-seed gmm64 tables of experiments/distill/README.md, from finished seed sweeps.

  python -m experiments.distill.tables --family=dm --runs=runs/dm   # distribution matching
  python -m experiments.distill.tables --family=cm --runs=runs/cm   # consistency models, flow maps
  python -m experiments.distill.tables --family=modes --runs=runs/dm_study   # any runs: modes
  python -m experiments.distill.tables --family=budget --runs=runs/ring16 --figure=out.png

read RUNS/<variant>/seeds.json (written by `experiments.distill.seeds`) for the family's variants
that exist, and the samples each seed saved (RUNS/<variant>/seed*/samples/<student>_nfe<k>.npz)
for one more column: the share of the lightest gmm64 component that the samples keep (its sample
count over its expected count, weight x N; 1 is exact), mean ± std over seeds. Prints a markdown
table, mean ± sample std over seeds, floors (the same statistic of exact samples) in the header.

modes: every run or seed sweep directly under RUNS (RUNS/<name>/results.json or seeds.json), one
row per student with the distribution columns and the covariance error's two parts
(`metrics.mode_stats`: the tail share beyond 1.5 mode radii, the core's covariance error), then
the teacher's rows at every NFE the runs hold (one testbed per RUNS folder: its runs share them).
dm: one row per generator; the teacher's rows come from the sid sweep (the evaluation noise is
the same for every variant). cm: the consistency paper's layout, NFE 1 then NFE 2, every method
against PD at the same NFE, then the teacher's DDIM and best training-free solver on each schedule
the methods run on (VP-linear, TrigFlow for sCD, rectified flow for MeanFlow and shortcut models:
each method's coupling error is against the exact map of its own schedule).
budget: the steps study of issue 20 on any testbed: runs (or sweeps) named <label>_<k>x, the
same recipe at k times its steps, and runs <label>_<k>x_seed<N> (the same recipe, another
`--config.seed`) that pool with it into mean ± std; per label the coupling error at 1 and 2 calls
for every k, its own run's teacher DDIM and the ratio at the largest k; --figure plots the
one-call ratio, with the std over seeds as error bars.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

import jax.numpy as jnp
import numpy as np

from diffdistill import analytic, metrics
from diffdistill.methods.plan import file_name
from experiments.distill import report, seeds

# (row label, sweep folder under --runs) per family
DM_VARIANTS = (("Diff-Instruct", "diff_instruct"), ("DMD (+ regression 0.25)", "dmd"),
               ("SiD (alpha 1.2)", "sid"), ("DMD2 (k = 5, GAN 0.01)", "dmd2"),
               ("DMD2 k = 1 (TTUR ablation)", "dmd2_k1"), ("SiD alpha 1.0", "sid_alpha1.0"),
               ("SiD alpha 0.5", "sid_alpha0.5"), ("DMD2 4-step generator", "dmd2_4step"),
               ("DMD without the copy (random init)", "dmd_nocopy"), ("SDS particles", "sds"),
               ("VSD particles", "vsd"))
CM_VARIANTS = (("PD (VP)", "pd"), ("CD (Heun, N = 32, EMA 0.95)", "cd"),
               ("CT (N(k) 2 -> 150, EMA)", "ct"), ("iCT (pseudo-Huber, no EMA)", "ict"),
               ("ECT (from the copy)", "ect"), ("CTM (gamma = 0)", "ctm"),
               ("sCD (TrigFlow)", "scd"), ("MeanFlow (rectified flow)", "meanflow"),
               ("shortcut (rectified flow)", "shortcut"))
# teacher rows of the cm table: (sweep that holds them, schedule label)
CM_TEACHERS = (("cd", "VP-linear"), ("scd", "TrigFlow"), ("meanflow", "rectified flow"))
HEAD = {"median": "coupling error median", "sliced_w2": "sliced W2", "mmd2": "MMD²",
        "mode_weight_tv": "mode weight TV", "mode_cov_error": "mode cov error",
        "mode_tail_share": "tail share", "mode_core_cov_error": "core cov error"}
FLOORS = seeds.FLOORS


def lightest_mode_share(folder: str, mix: analytic.GaussianMixture, student: str | None = None,
                        nfe: int | None = None) -> list[float]:
  """Per seed: (samples assigned to the lightest component) / (its weight x N), over the saved
  samples of `student` at `nfe` (None: every student file but the network copy's)."""
  w = np.asarray(mix.weights)
  j = int(np.argmin(w))
  name = file_name(student) if student else "*"
  shares = []
  for run in sorted(glob.glob(os.path.join(folder, "seed*"))):
    if not os.path.exists(os.path.join(run, "results.json")):
      continue  # an unfinished seed is not in seeds.json either
    for path in sorted(glob.glob(os.path.join(run, "samples", f"{name}_nfe{nfe or '*'}.npz"))):
      if os.path.basename(path).startswith("network_copy"):
        continue
      x = np.load(path)["samples"]
      counts = np.asarray(metrics.mode_counts(mix, jnp.asarray(x.reshape(len(x), -1))))
      shares.append(float(counts[j] / (w[j] * len(x))))
  return shares


def _fmt(key, v):
  return f"{v:.1e}" if key == "mmd2" else f"{v:.3f}"


def _cells(row: dict, keys) -> list[str]:
  """Mean ± std per key; a re-noising sampler's coupling error marked † (report.RENOISED_NOTE)."""
  return [_fmt(k, row[k]["mean"]) + (f" ± {_fmt(k, row[k]['std'])}" if row["n"] > 1 else "")
          + ("†" if k == "median" and row.get("renoised") else "")
          if k in row else "–" for k in keys]


def _share(shares: list[float]) -> str:
  if not shares:
    return "–"
  return f"{np.mean(shares):.2f}" + (f" ± {np.std(shares, ddof=1):.2f}" if len(shares) > 1 else "")


def _load(runs: str, name: str) -> list[dict] | None:
  path = os.path.join(runs, name, "seeds.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["rows"]


def _header(rows: list[dict], keys, w_min: float, *, lead: str) -> list[str]:
  def floor(k):
    vals = [r[FLOORS[k]] for r in rows if FLOORS.get(k) in r]
    return f" (floor {np.mean(vals):.3f})" if vals else ""
  names = [HEAD[k] + floor(k) for k in keys]
  names.insert(keys.index("mode_weight_tv") + 1, f"lightest mode ({100 * w_min:.1f} %): share kept")
  return [f"| {lead} | NFE | seeds | " + " | ".join(names) + " |",
          "|---|---:|---:|" + "---:|" * len(names)]


def _line(label, row, keys, share, *, teacher: bool = False) -> str:
  """A table line; a teacher's row does not depend on the seed: one value, no seed count."""
  row = {**row, "n": 1} if teacher else row
  cells = _cells(row, keys)
  cells.insert(keys.index("mode_weight_tv") + 1, share)
  return f"| {label} | {row['nfe']} | {'–' if teacher else row['n']} | " + " | ".join(cells) + " |"


def dm_table(runs: str) -> str:
  mix = analytic.mixture64()
  keys = ["sliced_w2", "mmd2", "mode_weight_tv", "mode_cov_error"]
  found = [(label, name, _load(runs, name)) for label, name in DM_VARIANTS]
  found = [f for f in found if f[2] is not None]
  lines = _header([r for *_, rows in found for r in rows], keys,
                  float(np.min(np.asarray(mix.weights))), lead="variant")
  for label, name, rows in found:
    share = _share(lightest_mode_share(os.path.join(runs, name), mix))
    for r in rows:
      if r["method"].endswith(("generator", "particles")):
        lines.append(_line(label, r, keys, share))
  teacher = next((rows for _, name, rows in found if name == "sid"), ())
  for r in teacher:
    if r["method"] in ("teacher ddim", "teacher dpm_solver_pp_2m", "teacher unipc_2",
                       "teacher unipc_3"):
      lines.append(_line(r["method"], r, keys, "–", teacher=True))
  return "\n".join(lines) + "\n"


def cm_table(runs: str) -> str:
  mix = analytic.mixture64()
  keys = ["median", "sliced_w2", "mode_weight_tv", "mode_cov_error"]
  found = {name: (label, _load(runs, name)) for label, name in CM_VARIANTS}
  found = {name: v for name, v in found.items() if v[1] is not None}
  all_rows = [r for _, rows in found.values() for r in rows]
  lines = _header(all_rows, keys, float(np.min(np.asarray(mix.weights))), lead="method")
  for nfe in sorted({r["nfe"] for r in all_rows if r["nfe"] in (1, 2)}):
    for name, (label, rows) in found.items():
      for r in rows:
        if r["nfe"] == nfe and not r["method"].startswith(("teacher", "network copy")):
          share = _share(lightest_mode_share(os.path.join(runs, name), mix, r["method"], nfe))
          student = label if r["method"] == name else f"{label}: {r['method']}"
          lines.append(_line(student, r, keys, share))
    for name, schedule in CM_TEACHERS:
      if name not in found:
        continue
      teacher = [r for r in found[name][1] if r["nfe"] == nfe and r["method"].startswith("teacher")]
      best = min(teacher, key=lambda r: r["median"]["mean"], default=None)
      for r in teacher:
        if r["method"] == "teacher ddim" or r is best:
          what = r["method"].removeprefix("teacher ")
          what = "DDIM" if what == "ddim" else f"best solver ({what})"
          lines.append(_line(f"teacher {what}, {schedule}", r, keys, "–", teacher=True))
  if any(r.get("renoised") for r in all_rows):
    lines += ["", report.RENOISED_NOTE]
  return "\n".join(lines) + "\n"


def _rows(runs: str, name: str) -> list[dict] | None:
  """A seed sweep's pooled rows (seeds.json), or a single run's (results.json), or None."""
  rows = _load(runs, name)
  if rows is None and os.path.exists(os.path.join(runs, name, "results.json")):
    with open(os.path.join(runs, name, "results.json")) as f:
      rows = seeds.aggregate([json.load(f)])
  return rows


def _with_mode_parts(run: str, row: dict) -> dict:
  """A single run's row from before the covariance error had its parts: computed from the
  student's saved samples against the run's mixture (its config's teacher), where they exist."""
  path = os.path.join(run, "samples", f"{file_name(row['method'])}_nfe{row['nfe']}.npz")
  if "mode_tail_share" in row or not os.path.exists(path):
    return row
  with open(os.path.join(run, "config.json")) as f:
    teacher = json.load(f)["teacher"]
  if teacher.get("mixture_file"):
    from experiments import teachers  # noqa: PLC0415  (the experiments' loader of mixture files)
    mix = teachers.load_mixture(teacher["mixture_file"])
  elif teacher.get("kind") == "analytic":
    mix = analytic.get_mixture(teacher["name"])
  else:
    return row
  x = np.load(path)["samples"]
  x = x.reshape(len(x), -1)
  stats, floor = metrics.mode_stats(mix, jnp.asarray(x, jnp.float32)), metrics.mode_floor(mix, len(x))
  parts = {"mode_tail_share": "tail_share", "mode_core_cov_error": "core_cov_error"}
  return {**row, **{k: {"mean": float(stats[v]), "std": 0.0} for k, v in parts.items()},
          **{f"{k}_floor": floor[v] for k, v in parts.items()}}


def modes_table(runs: str) -> str:
  """Every run (results.json) or seed sweep (seeds.json) directly under `runs`, by name."""
  keys = ["sliced_w2", "mode_weight_tv", "mode_cov_error", "mode_tail_share", "mode_core_cov_error"]
  found = []
  for name in sorted(os.listdir(runs)):
    single = _load(runs, name) is None
    rows = _rows(runs, name)
    if rows and single:
      rows = [_with_mode_parts(os.path.join(runs, name), r) for r in rows]
    if rows:
      found.append((name, rows))
  if not found:
    raise FileNotFoundError(f"No <run>/results.json nor <sweep>/seeds.json under {runs!r}.")
  all_rows = [r for _, rows in found for r in rows]

  def floor(k):
    vals = [r[FLOORS[k]] for r in all_rows if FLOORS.get(k) in r]
    return f" (floor {np.mean(vals):.3f})" if vals else ""

  lines = ["| run | student | NFE | seeds | " + " | ".join(HEAD[k] + floor(k) for k in keys) + " |",
           "|---|---|---:|---:|" + "---:|" * len(keys)]
  for name, rows in found:
    for r in rows:
      if not r["method"].startswith(("teacher", "network copy")):
        lines.append(f"| {name} | {r['method']} | {r['nfe']} | {r['n']} | "
                     + " | ".join(_cells(r, keys)) + " |")
  teacher = {(r["nfe"], r["method"]): r for _, rows in reversed(found) for r in rows
             if r["method"].startswith("teacher")}  # the same rows in every run of one testbed
  for _, r in sorted(teacher.items()):
    lines.append(f"| – | {r['method']} | {r['nfe']} | – | "
                 + " | ".join(_cells({**r, "n": 1}, keys)) + " |")
  return "\n".join(lines) + "\n"


BUDGET_NAME = re.compile(r"^(?P<label>.+)_(?P<mult>\d+(?:\.\d+)?)x(?:_seed(?P<seed>\d+))?$")


def _pooled_runs(runs: str, names: list[str]) -> list[dict] | None:
  """One budget point: a seed sweep (seeds.json) as it is, or single runs (results.json, e.g.
  ct_4x, ct_4x_seed1, ct_4x_seed2) pooled by (method, NFE), mean ± sample std over the runs."""
  sweeps = [n for n in names if _load(runs, n) is not None]
  if sweeps and len(names) > 1:
    raise ValueError(f"{sorted(names)} under {runs!r}: a seed sweep ({sweeps[0]}) is already one "
                     "point; name its extra seeds inside the sweep, not beside it.")
  if sweeps:
    return _load(runs, sweeps[0])
  results, seen = [], {}
  for n in sorted(names):
    path = os.path.join(runs, n, "results.json")
    if not os.path.exists(path):  # unfinished: not part of the point
      continue
    with open(path) as f:
      results.append(json.load(f))
    cfg = os.path.join(runs, n, "config.json")
    if os.path.exists(cfg):
      with open(cfg) as f:
        seed = json.load(f).get("seed")
      if seed in seen:
        raise ValueError(f"{seen[seed]} and {n} under {runs!r} both ran seed {seed}: pooling them "
                         "would count one seed twice.")
      seen[seed] = n
  return seeds.aggregate(results) if results else None


def budget_curves(runs: str) -> dict[str, dict[float, list[dict]]]:
  """{label: {step multiple: rows}} of every run or sweep under `runs` named <label>_<k>x; the
  runs <label>_<k>x_seed<N> (other seeds of the same recipe) pool with it into one point."""
  points: dict[tuple[str, float], list[str]] = {}
  for name in sorted(os.listdir(runs)):
    m = BUDGET_NAME.match(name)
    if m:
      points.setdefault((m["label"], float(m["mult"])), []).append(name)
  curves: dict[str, dict[float, list[dict]]] = {}
  for (label, mult), names in points.items():
    rows = _pooled_runs(runs, names)
    if rows:
      curves.setdefault(label, {})[mult] = rows
  if not curves:
    raise FileNotFoundError(f"No finished run named <label>_<k>x (e.g. ct_4x) under {runs!r}.")
  return dict(sorted(curves.items()))


def _student(rows: list[dict], nfe: int) -> dict | None:
  return next((r for r in rows if r["nfe"] == nfe
               and not r["method"].startswith(("teacher", "network copy"))), None)


def _ddim(rows: list[dict], nfe: int) -> dict | None:
  return next((r for r in rows if r["nfe"] == nfe and r["method"] == "teacher ddim"), None)


def budget_table(runs: str, figure: str | None = None) -> str:
  """The budget study: the students' coupling error at 1 and 2 calls against the multiple of
  their steps (runs named <label>_<k>x, k = 1, 4, 16, ...), each beside its own run's teacher
  DDIM at the same calls (its schedule's) and the ratio at the largest multiple; `figure` plots
  the one-call ratio to DDIM against the multiple."""
  curves = budget_curves(runs)
  mults = sorted({k for c in curves.values() for k in c})
  head = " | ".join(f"{k:g}x" for k in mults)
  lines = [f"| method | calls | {head} | teacher DDIM | last / DDIM |",
           "|---|---:|" + "---:|" * (len(mults) + 2)]
  for nfe in (1, 2):
    for label, curve in curves.items():
      cells, last = [], None
      for k in mults:
        r = _student(curve.get(k, ()), nfe)
        cells.append(_cells(r, ["median"])[0] if r else "–")
        last = (r, _ddim(curve[k], nfe)) if r else last
      if last is None:
        continue
      ddim = last[1]["median"]["mean"] if last[1] else float("nan")
      ratio = last[0]["median"]["mean"] / ddim
      mark = "†" if last[0].get("renoised") else ""
      lines.append(f"| {label} | {nfe} | " + " | ".join(cells)
                   + f" | {ddim:.3f} | {ratio:.2f}x{mark} |")
  if any(r.get("renoised") for c in curves.values() for rows in c.values() for r in rows):
    lines += ["", report.RENOISED_NOTE]
  if figure:
    _budget_figure(curves, mults, figure, title=os.path.basename(os.path.normpath(runs)))
  return "\n".join(lines) + "\n"


def _budget_figure(curves, mults, out: str, title: str) -> dict:
  """Draws the one-call ratio to DDIM against the multiple (error bars: the std over seeds where a
  point pools several); returns what it drew: {"points": {label: [(k, ratio)]}, "errors": {label:
  [std of the ratio]} (zeros for single runs), "xticks": [label text]}."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  drawn, errors = {}, {}
  for label, curve in curves.items():
    pts = [(k, _student(rows, 1), _ddim(rows, 1)) for k, rows in sorted(curve.items())]
    pts = [(k, s["median"]["mean"] / d["median"]["mean"], s["median"]["std"] / d["median"]["mean"])
           for k, s, d in pts if s and d]  # the teacher's DDIM does not depend on the seed
    if pts:
      ks, ratios, stds = zip(*pts)
      ax.errorbar(ks, ratios, yerr=stds if any(stds) else None, fmt="o-", capsize=3, label=label)
      drawn[label], errors[label] = [(k, r) for k, r, _ in pts], list(stds)
  ax.axhline(1.0, color="k", lw=0.8, ls="--", label="teacher DDIM")
  ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="0.5x DDIM")
  ax.set_xscale("log", base=2)
  ax.set_xticks(mults, [f"{k:g}x" for k in mults])
  ax.set_xlabel("steps (multiple of the variant's)")
  ax.set_ylabel("one-call coupling error / DDIM's")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  ticks = [t.get_text() for t in ax.get_xticklabels()]
  plt.close(fig)
  return {"points": drawn, "errors": errors, "xticks": ticks}


FAMILIES = {"dm": dm_table, "cm": cm_table, "modes": modes_table, "budget": budget_table}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--family", required=True, choices=sorted(FAMILIES),
                      help="dm: distribution matching; cm: consistency models and flow maps; "
                           "modes: every run under --runs, with the covariance error's parts; "
                           "budget: runs named <label>_<k>x, coupling against the steps")
  parser.add_argument("--runs", default=None, help="folder of the seed sweeps (default runs/<family>)")
  parser.add_argument("--figure", default=None,
                      help="budget only: also plot the one-call ratio to DDIM against the steps")
  args = parser.parse_args(argv)
  runs = args.runs or f"runs/{args.family}"
  if not os.path.isdir(runs):
    parser.error(f"--runs: no folder {runs!r}; run the sweeps of the README first.")
  if args.figure and args.family != "budget":
    parser.error(f"--figure: only --family=budget draws one, got --family={args.family}.")
  kwargs = {"figure": args.figure} if args.figure else {}
  print(FAMILIES[args.family](runs, **kwargs), end="")


if __name__ == "__main__":
  main()
