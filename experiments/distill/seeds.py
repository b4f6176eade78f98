"""One variant over several seeds, and the table of its rows averaged over them.

  python -m experiments.distill.seeds --config=experiments/distill/config.py:sid_gmm64 \
      --config.copy.dir=runs/shared/copy_gmm64 --seeds=0,1,2 --workdir=runs/sid_gmm64_seeds

runs `experiments.distill.main` once per seed (config.seed = s, workdir WORKDIR/seed<s>; a seed
whose results.json exists is not rerun, so an interrupted sweep resumes), then writes
WORKDIR/seeds.md and seeds.json: for every (method, NFE) row, each metric's mean, sample standard
deviation and range over the seeds. `config.seed` sets the students' initialization, the training
batches and every training draw; the evaluation's x_T and exact reference (`config.eval.seed`) are
the same for every seed, so the spread is the training's. With `--config.copy.dir` every seed
starts from the same network copy of the teacher (the spread then excludes the copy's own);
without it each seed fits its own copy.

  python -m experiments.distill.seeds --aggregate runs/a/seed0 runs/a/seed1 ... --out=runs/a

only aggregates finished workdirs (any runs whose results.json rows should be pooled).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, logging

from experiments.distill import report

METRICS = (("median", "coupling error median"), ("sliced_w2", "sliced W2"),
           ("mmd2", "MMD²"), ("mode_weight_tv", "mode weight TV"),
           ("mode_cov_error", "mode cov error"), ("mode_tail_share", "tail share"),
           ("mode_core_cov_error", "core cov error"), ("fd_digits", "FD-digits"),
           ("is_digits", "digits IS"), ("fid", "FID"))
FLOORS = {"sliced_w2": "sliced_w2_floor", "mode_weight_tv": "mode_weight_tv_floor",
          "mode_cov_error": "mode_cov_error_floor", "mode_tail_share": "mode_tail_share_floor",
          "mode_core_cov_error": "mode_core_cov_error_floor", "mmd2": "mmd2_floor",
          "fd_digits": "fd_digits_floor"}


def aggregate(results: list[dict]) -> list[dict]:
  """Rows pooled by (method, NFE) over runs: {method, nfe, n, <metric>: {mean, std, min, max}}
  for every metric that all of the group's rows hold; floors averaged."""
  if not results:
    raise ValueError("aggregate needs at least one results.json content.")
  groups: dict[tuple, list[dict]] = {}
  for res in results:
    for row in res["rows"]:
      groups.setdefault((row["method"], row["nfe"]), []).append(row)
  out = []
  for (method, nfe), rows in groups.items():
    agg = {"method": method, "nfe": nfe, "n": len(rows),
           "renoised": any(r.get("renoised", False) for r in rows)}
    for key, _ in METRICS:
      vals = [r[key] for r in rows if key in r]
      if len(vals) != len(rows):
        continue
      v = np.asarray(vals, np.float64)
      agg[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                  "min": float(v.min()), "max": float(v.max())}
      if key in FLOORS and all(FLOORS[key] in r for r in rows):
        agg[FLOORS[key]] = float(np.mean([r[FLOORS[key]] for r in rows]))
    out.append(agg)
  return sorted(out, key=lambda r: (r["nfe"], r["method"].startswith("teacher"),
                                    r["median"]["mean"] if "median" in r else 0.0))


def _cell(agg: dict, key: str) -> str:
  if key not in agg:
    return "–"
  m = agg[key]
  fmt = ((lambda v: f"{v:.1e}") if key == "mmd2" else (lambda v: f"{v:.1f}") if key == "fd_digits"
         else (lambda v: f"{v:.3f}"))
  cell = fmt(m["mean"]) + (f" ± {fmt(m['std'])}" if agg["n"] > 1 else "")
  if key == "median" and agg.get("renoised"):
    cell += "†"
  if key in FLOORS and FLOORS[key] in agg:
    cell += f" ({fmt(agg[FLOORS[key]])})"
  return cell


def markdown(rows: list[dict]) -> str:
  """Mean ± sample std over the runs (floor in parentheses), n runs per row."""
  keys = [(k, name) for k, name in METRICS if any(k in r for r in rows)]
  lines = ["| method | NFE | n | " + " | ".join(name for _, name in keys) + " |",
           "|---|---:|---:|" + "---:|" * len(keys)]
  for r in rows:
    lines.append(f"| {r['method']} | {r['nfe']} | {r['n']} | "
                 + " | ".join(_cell(r, k) for k, _ in keys) + " |")
  if any(r.get("renoised") for r in rows):
    lines += ["", report.RENOISED_NOTE]
  return "\n".join(lines) + "\n"


def write(results: list[dict], out_dir: str, header: str = "") -> str:
  rows = aggregate(results)
  text = header + markdown(rows)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "seeds.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out_dir, "seeds.json"), "w") as f:
    json.dump({"rows": rows, "runs": [r.get("command", "") for r in results],
               "seconds": [r.get("seconds", {}).get("total") for r in results]}, f, indent=1)
  return text


def _read(workdir: str) -> dict:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No results.json in {workdir!r}: run experiments.distill.main there first.")
  with open(path) as f:
    return json.load(f)


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {text!r}.") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds must name at least one seed, each once; got {text!r}.")
  return seeds


def sweep(config, seeds: list[int], workdir: str) -> str:
  from experiments.distill import main as main_lib  # noqa: PLC0415
  results = []
  for s in seeds:
    run_dir = os.path.join(workdir, f"seed{s}")
    if os.path.exists(os.path.join(run_dir, "results.json")):
      print(f"seed {s}: done before, read from {run_dir}")
      results.append(_read(run_dir))
      continue
    c = config.copy_and_resolve_references()
    c.seed = s
    out = main_lib.run(c, run_dir)
    print(f"seed {s}: {out['seconds']['total']:.0f} s")
    results.append(out)
  header = (f"{config.method}_{config.testbed}, seeds {', '.join(map(str, seeds))}: mean ± sample "
            "std over seeds (floor: the same statistic of exact samples)\n\n")
  return write(results, workdir, header)


def main(argv):
  from absl import flags  # noqa: PLC0415
  f = flags.FLAGS
  if f.aggregate:
    if not f.out:
      raise app.UsageError("--aggregate needs --out=DIR for seeds.md.")
    print(write([_read(d) for d in argv[1:]], f.out))
    return
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if f.config is None or not f.workdir:
    raise app.UsageError("--config and --workdir are required (or --aggregate DIR... --out=DIR).")
  logging.set_verbosity(logging.WARNING)
  print(sweep(f.config, parse_seeds(f.seeds), f.workdir))


def _define_flags():
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415
  config_flags.DEFINE_config_file("config", None, "experiments/distill/config.py:<method>_<testbed>")
  flags.DEFINE_string("workdir", None, "Sweep folder: seed<s>/ per seed, seeds.md / seeds.json.")
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated config.seed values.")
  flags.DEFINE_bool("aggregate", False, "Only pool the results.json of the workdirs given as arguments.")
  flags.DEFINE_string("out", None, "With --aggregate: where seeds.md / seeds.json go.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
