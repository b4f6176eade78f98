"""The distribution-matching table of experiments/distill/README.md, from finished seed sweeps.

  python -m experiments.distill.dm_table --runs=runs/dm

reads RUNS/<variant>/seeds.json (written by `experiments.distill.seeds`) for the variants below
that exist, and the samples each seed saved (RUNS/<variant>/seed*/samples/*.npz) for one more
column: the share of the lightest gmm64 component that the generator keeps (its sample count over
its expected count, weight x N; 1 is exact). Prints a markdown table; the teacher's rows come
from the sid sweep (the same evaluation noise for every variant).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import jax.numpy as jnp
import numpy as np

from diffdistill import analytic, metrics

VARIANTS = (("Diff-Instruct", "diff_instruct"), ("DMD (+ regression 0.25)", "dmd"),
            ("SiD (alpha 1.2)", "sid"), ("DMD2 (k = 5, GAN 0.01)", "dmd2"),
            ("DMD2 k = 1 (TTUR ablation)", "dmd2_k1"), ("SiD alpha 1.0", "sid_alpha1.0"),
            ("SiD alpha 0.5", "sid_alpha0.5"), ("DMD2 4-step generator", "dmd2_4step"),
            ("DMD without the copy (random init)", "dmd_nocopy"), ("SDS particles", "sds"),
            ("VSD particles", "vsd"))
KEYS = ("sliced_w2", "mmd2", "mode_weight_tv", "mode_cov_error")
TEACHER = ("teacher ddim", "teacher dpm_solver_pp_2m", "teacher unipc_2", "teacher unipc_3")


def lightest_mode_share(folder: str, mix: analytic.GaussianMixture) -> list[float]:
  """Per seed: (samples assigned to the lightest component) / (its weight x N)."""
  w = np.asarray(mix.weights)
  j = int(np.argmin(w))
  shares = []
  for path in sorted(glob.glob(os.path.join(folder, "seed*", "samples", "*_nfe*.npz"))):
    if "network_copy" in path:
      continue
    x = np.load(path)["samples"]
    counts = np.asarray(metrics.mode_counts(mix, jnp.asarray(x.reshape(len(x), -1))))
    shares.append(float(counts[j] / (w[j] * len(x))))
  return shares


def _fmt(key, v):
  return f"{v:.1e}" if key == "mmd2" else f"{v:.3f}"


def table(runs: str) -> str:
  mix = analytic.mixture64()
  w_min = float(np.min(np.asarray(mix.weights)))
  lines = ["| variant | NFE | seeds | sliced W2 (floor 0.022) | MMD² | mode weight TV (floor 0.027) | "
           f"lightest mode ({100 * w_min:.1f} %): share kept | mode cov error (floor 0.320) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  teacher = None
  for label, name in VARIANTS:
    path = os.path.join(runs, name, "seeds.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      rows = json.load(f)["rows"]
    if name == "sid":
      teacher = rows
    shares = lightest_mode_share(os.path.join(runs, name), mix)
    share = (f"{np.mean(shares):.2f}" + (f" ± {np.std(shares, ddof=1):.2f}" if len(shares) > 1 else "")
             if shares else "–")
    for r in rows:
      if not r["method"].endswith(("generator", "particles")):
        continue
      cells = [_fmt(k, r[k]["mean"]) + (f" ± {_fmt(k, r[k]['std'])}" if r["n"] > 1 else "")
               for k in KEYS]
      lines.append(f"| {label} | {r['nfe']} | {r['n']} | " + " | ".join(cells[:3] + [share] + cells[3:])
                   + " |")
  for r in teacher or ():
    if r["method"] in TEACHER:
      cells = [_fmt(k, r[k]["mean"]) for k in KEYS]
      lines.append(f"| {r['method']} | {r['nfe']} | – | " + " | ".join(cells[:3] + ["–"] + cells[3:])
                   + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", default="runs/dm", help="folder of the seed sweeps")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.runs):
    parser.error(f"--runs: no folder {args.runs!r}; run the sweeps of the README first.")
  print(table(args.runs), end="")


if __name__ == "__main__":
  main()
