"""Distils a teacher with any method of the library and scores the students against the exact map.

COMMAND (from the repository root):
  python -m experiments.distill.main --config=experiments/distill/config.py:pd_gmm64 --workdir=runs/pd_gmm64

See config.py for the variants (<method>_<testbed>). The run trains the recipe's stages in order
(`common.run_stages`; a killed run resumes with the same command), then evaluates every student
next to the teacher's DDIM and best training-free solver at the same NFE and writes into the
workdir: results.json (the table, the command, the config, per-stage steps and wall time),
results.md, distill.png, and samples/<student>_nfe<k>.npz (x_start, samples, nfe and the noise
levels alpha/sigma at the start and end).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

from absl import app, flags, logging

from diffdistill import solvers
from experiments.distill import common
from experiments.distill.recipes import RECIPES


def _define_flags():
  from ml_collections import config_flags  # noqa: PLC0415
  config_flags.DEFINE_config_file("config", None, "config.py:<method>_<testbed>", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run folder: stages, samples, results.")


COPY_SOLVERS = ("ipndm", "dpm_solver_pp_2m", "ddim")  # the copy's sampler at an NFE: first feasible


def build_plan(config, setup) -> common.Plan:
  """The recipe's plan; when it fits a network copy of the teacher, the copy itself joins the
  evaluation, sampled with a training-free solver at each student NFE: the floor its students
  start from."""
  if config.method not in RECIPES:
    raise ValueError(f"config.method must be one of {sorted(RECIPES)}, got {config.method!r}.")
  plan = RECIPES[config.method](config, setup)
  copy = next((s for s in plan.stages if s.name == "copy"), None)
  if copy is not None and config.eval.copy_rows:
    from experiments.distill.recipes import trajectory  # noqa: PLC0415
    net = trajectory.student_net(config, setup)
    for nfe in sorted({s.nfe for s in plan.students if s.nfe > 0}):  # NFE 0: SDS / VSD particles
      solver = next(n for n in COPY_SOLVERS if _feasible(n, nfe))
      run = functools.partial(_sample, net.denoise, schedule=net.schedule, solver=solver, nfe=nfe,
                              t_start=setup.t_start, t_end=setup.t_end)
      plan.students.append(common.Student(name=f"network copy + {solver}", nfe=nfe,
                                          params=lambda r: r["copy"]["student"], run=run))
  return plan


def _feasible(solver, nfe):
  try:
    solvers.steps_for_nfe(solver, nfe)
  except ValueError:
    return False
  return True


def _sample(denoise, params, x, **kw):
  return solvers.sample(functools.partial(denoise, params), x, **kw)


def run(config, workdir: str) -> dict:
  """Builds the plan, trains its stages, evaluates its students; returns results.json's content."""
  start = time.perf_counter()
  setup = common.make_setup(config)
  plan = build_plan(config, setup)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  results, stats = common.run_stages(plan, setup, workdir, progress=config.progress)
  train_s = time.perf_counter() - start
  rows = (plan.evaluate or common.evaluate)(plan, setup, results, workdir, progress=config.progress)
  notes = {}
  if "extra" in plan.notes:
    x_start = setup.start_noise(__import__("jax").random.key(config.eval.seed), config.eval.num_samples)
    notes = plan.notes["extra"](results, x_start)
  out = {"command": " ".join(["python -m experiments.distill.main"] + sys.argv[1:]),
         "variant": f"{config.method}_{config.testbed}", "teacher": setup.teacher.name,
         "rows": rows, "table": (plan.table or common.table)(rows), "stages": stats, "notes": notes,
         "seconds": {"train": train_s, "total": time.perf_counter() - start},
         "config": config.to_dict()}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write((plan.table or common.table)(rows))
  common.figure(rows, setup, workdir, f"{config.method} on {setup.teacher.name}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  from diffdistill.train import loop  # noqa: PLC0415
  try:
    out = run(config, workdir)
  except loop.Interrupted as e:
    print(e)
    raise SystemExit(130) from None
  print(out["table"])
  if out["notes"]:
    print(out["notes"])
  print(f"{out['variant']}: {out['seconds']['total']:.0f} s; results in {workdir}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
