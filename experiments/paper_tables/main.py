"""Runs a paper table on the paper's teacher (experiments/distill) and sets its FIDs beside the
paper's.

COMMANDS (from the repository root):
  python -m experiments.paper_tables.main --list
  python -m experiments.paper_tables.main --table=sid_cifar10_uncond \
      --checkpoint=edm-cifar10-32x32-uncond-vp.pkl --fid_reference=cifar10_train_stats.npz \
      --inception=pt_inception-2015-12-05-6726825d.pth --workdir=runs/paper/sid_cifar10

`--tiny` runs the same table at the distill variant's smoke-test size (the paper's method settings
kept, its scale dropped; FID of --fid_samples samples): what the slow tests run on random weights.
Any `--config.*` override of experiments/distill is accepted after the table's own (e.g.
`--config.dm.num_steps=100000` for a shorter run). The run writes the distill workdir (results.json,
samples, figures) and WORKDIR/paper.json / paper.md: the paper's number and ours at each NFE.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from experiments.paper_tables import tables as tables_lib

FLAGS = flags.FLAGS
_FILES = ("checkpoint", "dataset", "vae", "fid_reference", "inception")


def _define_flags():
  flags.DEFINE_bool("list", False, "Print every table and exit.")
  flags.DEFINE_string("table", None, f"One of {tables_lib.names()}.")
  flags.DEFINE_string("checkpoint", None, "The teacher's checkpoint (interop.load).")
  flags.DEFINE_string("dataset", None, "The training data, where the method reads data.")
  flags.DEFINE_string("vae", None, "A latent teacher's AutoencoderKL folder.")
  flags.DEFINE_string("fid_reference", None, "FID reference statistics (.npz / .pkl).")
  flags.DEFINE_string("inception", None, "Inception weights: NVIDIA's .pkl (the papers' "
                      "FID), pytorch-fid's .pth, or an .npz conversion.")
  flags.DEFINE_string("workdir", None, "The run's folder.")
  flags.DEFINE_bool("tiny", False, "The variant's smoke-test size (random-weight checks).")
  flags.DEFINE_integer("fid_samples", None, "FID samples (default: 50,000; tiny: 8).")
  flags.DEFINE_multi_string("config", [], "Extra --config.KEY=VALUE overrides (KEY=VALUE).")


def _set(config, key: str, value) -> None:
  """config[key] = value for a dotted key that exists (Adam's b1 / b2 may be added to optim)."""
  *path, last = key.split(".")
  node = config
  for part in path:
    if part not in node:
      raise KeyError(f"{key!r} is not a key of the distill config.")
    node = node[part]
  if last not in node and key not in ("optim.b1", "optim.b2", "optim.eps"):
    raise KeyError(f"{key!r} is not a key of the distill config.")
  node[last] = value


def make_config(table: tables_lib.PaperTable, *, checkpoint: str, inception: str = "",
                fid_reference: str = "", dataset: str = "", vae: str = "", tiny: bool = False,
                fid_samples: int | None = None, overrides: dict | None = None):
  """The distill config of `table` with the user's files (the paper's settings, or the tiny
  variant's scale with the paper's method settings)."""
  from experiments.distill import config as config_lib  # noqa: PLC0415 (jax when needed)
  if table.blocked:
    raise ValueError(f"{table.name} cannot run yet: {table.blocked}")
  if not checkpoint:
    raise ValueError(f"{table.name} needs --checkpoint: {table.files['checkpoint']}.")
  if "dataset" in table.files and not dataset and not tiny:
    raise ValueError(f"{table.name} needs --dataset: {table.files['dataset']}.")
  config = config_lib.get_config(table.variant + (",tiny" if tiny else ""))
  for key, value in {**table.method, **({} if tiny else table.scale)}.items():
    _set(config, key, value)
  config.teacher.path = checkpoint
  config.teacher.dataset = dataset or ""
  config.teacher.vae = vae or ""
  config.eval.fid.reference = fid_reference or ""
  config.eval.fid.inception = inception or ""
  config.eval.fid.num_samples = fid_samples or (8 if tiny else 50_000)
  config.eval.fid.batch_size = min(config.eval.fid.batch_size, config.eval.fid.num_samples)
  for key, value in (overrides or {}).items():
    _set(config, key, value)
  return config


def compare(table: tables_lib.PaperTable, rows: list[dict]) -> dict:
  """The paper's number and ours (the student rows' FID) at each NFE the paper reports."""
  ours = {r["nfe"]: r.get("fid") for r in rows if r["method"] == table.student_row}
  return {"table": table.name, "paper": table.paper, "where": table.where,
          "metric": table.metric,
          "rows": [{"nfe": nfe, "paper": value, "ours": ours.get(nfe)}
                   for nfe, value in sorted(table.numbers.items())]}


def markdown(result: dict) -> str:
  lines = [f"{result['paper']}, {result['where']} ({result['metric']})", "",
           "| NFE | paper | ours |", "|---:|---:|---:|"]
  for r in result["rows"]:
    ours = "not run" if r["ours"] is None else f"{r['ours']:.3f}"
    lines.append(f"| {r['nfe']} | {r['paper']} | {ours} |")
  return "\n".join(lines) + "\n"


def listing() -> str:
  lines = ["| table | paper | numbers | runs | budget |", "|---|---|---|---|---|"]
  for name in tables_lib.names():
    t = tables_lib.TABLES[name]
    numbers = ", ".join(f"{v} ({k} NFE)" for k, v in sorted(t.numbers.items()))
    runs = "no: " + t.blocked.split(";")[0] if t.blocked else f"yes ({t.variant})"
    lines.append(f"| {name} | {t.paper}, {t.where} | {numbers} | {runs} | {t.budget} |")
  return "\n".join(lines)


def run(table: tables_lib.PaperTable, workdir: str, **kw) -> dict:
  from experiments.distill import main as distill_main  # noqa: PLC0415
  config = make_config(table, **kw)
  out = distill_main.run(config, workdir)
  result = compare(table, out["rows"])
  result["command"] = " ".join(["python -m experiments.paper_tables.main"] + sys.argv[1:])
  with open(os.path.join(workdir, "paper.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(workdir, "paper.md"), "w") as f:
    f.write(markdown(result))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.list:
    print(listing())
    return
  if not FLAGS.table or not FLAGS.workdir:
    raise app.UsageError("--table and --workdir are required (or --list).")
  from experiments.distill import config as config_lib  # noqa: PLC0415 (jax when needed)
  result = run(tables_lib.get(FLAGS.table), FLAGS.workdir,
               **{k: getattr(FLAGS, k) or "" for k in _FILES}, tiny=FLAGS.tiny,
               fid_samples=FLAGS.fid_samples,
               overrides=config_lib.parse_overrides(FLAGS.config))
  print(markdown(result))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
