"""sCD's training stability: how often it diverges with and without tangent normalization and
tangent warm-up (Lu & Song 2025, Sec. 4), over seeds.

  python -m experiments.distill.scm_stability --workdir=runs/scm_stability

For each time-embedding scale (the tangent differentiates the network in t: the MLP's default
positional scale 1000 gives ||g|| ~ 1e3 where scale 10 gives ~1) and each of the four
{normalization on/off} x {warm-up on/off} settings, it trains `scd_<testbed>` over --seeds (from
one network copy per embedding scale, shared by every run of that scale) with
`experiments.distill.seeds`, and writes WORKDIR/stability.md and stability.json: per setting,
the number of diverged runs and the median over seeds of the 1-step coupling error, sliced W2,
the largest logged tangent norm and the last logged loss.

A run counts as diverged when any of: a non-finite loss or gradient (the step's guard skipped it:
`num_nonfinite` > 0), a non-finite sample, or a 1-step sliced W2 above the teacher's own 1-step
DDIM sample's (training made the student worse than the one-step baseline it started near).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging

SETTINGS = {  # name: (tangent_normalization, warm-up on)
    "norm + warm-up": (0.1, True),
    "norm only": (0.1, False),
    "warm-up only": (0.0, True),
    "neither": (0.0, False),
}


def _define_flags():
  flags.DEFINE_string("workdir", None, "Where the runs and stability.md go.")
  flags.DEFINE_string("testbed", "ring2d", "scd_<testbed> is the variant trained.")
  flags.DEFINE_string("seeds", "0,1,2,3,4", "Comma-separated seeds (>= 5 for a rate).")
  flags.DEFINE_string("embedding_scales", "1000,10", "Time-embedding scales of the student MLP.")
  flags.DEFINE_integer("num_steps", 1500, "sCD steps per run.")
  flags.DEFINE_integer("warmup_steps", 500, "Warm-up length H where warm-up is on.")
  flags.DEFINE_integer("copy_steps", 3000, "Steps of each embedding scale's network copy.")


def run_dir(workdir: str, scale: float, setting: str) -> str:
  return os.path.join(workdir, f"es{scale:g}", setting.replace(" + ", "_").replace(" ", "_"))


def summarize(folder: str, seeds: list[int]) -> dict:
  """Divergences and medians over the seeds' runs in `folder` (a seeds sweep)."""
  diverged, err, w2, gmax, last = 0, [], [], [], []
  for s in seeds:
    d = os.path.join(folder, f"seed{s}")
    with open(os.path.join(d, "results.json")) as f:
      res = json.load(f)
    with open(os.path.join(d, "scd", "metrics.jsonl")) as f:
      logs = [json.loads(line) for line in f if line.strip()]
    row = next(r for r in res["rows"] if r["method"] == "scd" and r["nfe"] == 1)
    ddim = next(r for r in res["rows"] if r["method"] == "teacher ddim" and r["nfe"] == 1)
    bad = (any(r.get("num_nonfinite", 0) > 0 for r in logs) or row["nan"]
           or not np.isfinite(row["sliced_w2"]) or row["sliced_w2"] > ddim["sliced_w2"])
    diverged += int(bad)
    err.append(row["median"])
    w2.append(row["sliced_w2"])
    gmax.append(max(r.get("tangent_norm", np.nan) for r in logs))
    last.append(logs[-1].get("l2", np.nan))
  med = lambda v: float(np.nanmedian(np.asarray(v, np.float64)))  # noqa: E731
  return {"runs": len(seeds), "diverged": diverged, "median_error": med(err),
          "max_error": float(np.nanmax(err)), "sliced_w2": med(w2), "teacher_ddim_sliced_w2": ddim["sliced_w2"],
          "max_tangent_norm": med(gmax), "last_l2": med(last)}


def markdown(table: dict) -> str:
  lines = ["| embedding scale | setting | diverged / runs | 1-step error median (max) | "
           "1-step sliced W2 | max tangent norm | last l2 |",
           "|---:|---|---:|---:|---:|---:|---:|"]
  for key, r in table.items():
    scale, setting = key.split("|")
    lines.append(f"| {scale} | {setting} | {r['diverged']} / {r['runs']} | {r['median_error']:.3f} "
                 f"({r['max_error']:.3f}) | {r['sliced_w2']:.3f} | {r['max_tangent_norm']:.3g} | "
                 f"{r['last_l2']:.3g} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from experiments.distill import config as config_lib, seeds as seeds_lib  # noqa: PLC0415
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  seeds = seeds_lib.parse_seeds(f.seeds)
  table = {}
  for scale in (float(s) for s in f.embedding_scales.split(",")):
    for setting, (norm, warm) in SETTINGS.items():
      config = config_lib.get_config(f"scd_{f.testbed}")
      config.progress = False
      config.student.kwargs.embedding_scale = scale
      config.copy.num_steps = f.copy_steps
      config.copy.dir = os.path.join(f.workdir, f"es{scale:g}", "copy")
      config.scd.num_steps = f.num_steps
      config.log_every = max(1, min(50, f.num_steps // 5))  # the tangent norm's trace
      config.scd.tangent_normalization = norm
      config.scd.warmup_steps = f.warmup_steps if warm else 0
      config.eval.num_samples = 1024
      config.eval.solvers = ("dpm_solver_pp_2m",)
      config.eval.copy_rows = False
      folder = run_dir(f.workdir, scale, setting)
      seeds_lib.sweep(config, seeds, folder)
      table[f"{scale:g}|{setting}"] = summarize(folder, seeds)
      print(markdown(table))
  with open(os.path.join(f.workdir, "stability.json"), "w") as fh:
    json.dump(table, fh, indent=1)
  header = (f"sCD on {f.testbed}: {f.num_steps} steps per run, warm-up H = {f.warmup_steps} where on, "
            f"normalization c = 0.1 where on; seeds {f.seeds}\n\n")
  with open(os.path.join(f.workdir, "stability.md"), "w") as fh:
    fh.write(header + markdown(table))
  print(header + markdown(table))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
