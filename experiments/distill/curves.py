"""Training curves of a multi-player stage, per player, pooled over seeds.

  python -m experiments.distill.curves --stage=dm --out=experiments/distill/figures/dm_curves_gmm64.png \
      sid=runs/dm/sid diff_instruct=runs/dm/diff_instruct dmd=runs/dm/dmd dmd2=runs/dm/dmd2

Each LABEL=DIR names a run folder or a seeds sweep (experiments.distill.seeds: DIR/seed*/); the
figure has one panel per logged quantity (by default each player's loss and gradient norm, the
generator's score gap and batch sliced W2), one line per label (the median over seeds, the band
their range). The quantities are read from DIR[/seed*]/STAGE/metrics.jsonl, as the training loop
logged them every log_every steps.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

DEFAULT_KEYS = ("generator/loss", "generator/grad_norm", "generator/gap", "generator/sliced_w2",
                "fake_score/loss", "fake_score/grad_norm")


def read_runs(folder: str, stage: str) -> list[list[dict]]:
  """The metrics.jsonl records of every run in `folder` (itself, or its seed*/ sweeps)."""
  paths = sorted(glob.glob(os.path.join(folder, "seed*", stage, "metrics.jsonl")))
  if not paths and os.path.exists(os.path.join(folder, stage, "metrics.jsonl")):
    paths = [os.path.join(folder, stage, "metrics.jsonl")]
  if not paths:
    raise FileNotFoundError(f"No {stage}/metrics.jsonl under {folder!r} (nor {folder}/seed*/{stage}/).")
  runs = []
  for p in paths:
    with open(p) as f:
      runs.append([json.loads(line) for line in f if line.strip()])
  return runs


def series(runs: list[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
  """(steps, values [runs, steps]) over the steps every run logged `key` at; None if none did."""
  per_run = [{r["step"]: r[key] for r in run if key in r} for run in runs]
  steps = sorted(set.intersection(*(set(d) for d in per_run)))
  if not steps:
    return None
  return np.asarray(steps), np.asarray([[d[s] for s in steps] for d in per_run], np.float64)


def plot(labelled: dict[str, list[list[dict]]], keys, out: str, title: str = "") -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  keys = [k for k in keys if any(series(runs, k) is not None for runs in labelled.values())]
  if not keys:
    raise ValueError("None of the requested keys was logged by any run.")
  cols = min(3, len(keys))
  rows = -(-len(keys) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    for label, runs in labelled.items():
      s = series(runs, key)
      if s is None:
        continue
      steps, values = s
      line, = ax.plot(steps, np.median(values, axis=0), label=f"{label} ({len(runs)})")
      if len(runs) > 1:
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(),
                        alpha=0.2, lw=0)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step")
    if key.endswith("grad_norm") or key.endswith("gap"):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)


def error_panels(curves: dict[str, dict], panels, path: str, *, ylabel: str,
                 reference: tuple[float, str] | None = None) -> None:
  """One log-scale panel per name of `panels`, one line per label of `curves` ({label: {"step":
  [...], panel: [...]}}), e.g. a student's error against a closed form while it trains;
  `reference` (value, label) is drawn as a dotted line in the first panel."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  panels = list(panels)
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True,
                           squeeze=False)
  axes = axes[0]
  for ax, name in zip(axes, panels):
    for label, c in curves.items():
      ax.semilogy(c["step"], c[name], label=label)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(True, which="both", alpha=0.3)
  if reference is not None:
    axes[0].axhline(reference[0], color="k", ls=":", lw=1, label=reference[1])
  axes[0].set_ylabel(ylabel)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="LABEL=DIR (a run folder or a seeds sweep)")
  parser.add_argument("--stage", default="dm")
  parser.add_argument("--keys", default=",".join(DEFAULT_KEYS))
  parser.add_argument("--title", default="")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  labelled = {}
  for item in args.runs:
    label, sep, folder = item.partition("=")
    if not sep or not label or not folder:
      parser.error(f"each run must be LABEL=DIR, got {item!r}.")
    labelled[label] = read_runs(folder, args.stage)
  plot(labelled, args.keys.split(","), args.out, args.title)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
