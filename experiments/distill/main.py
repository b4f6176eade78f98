"""Distils a teacher with any method of the library and scores the students against the exact map.

COMMAND (from the repository root):
  python -m experiments.distill.main --config=experiments/distill/config.py:pd_gmm64 --workdir=runs/pd_gmm64

See config.py for the variants (<method>_<testbed>, any module of `diffdistill.methods`). The
run builds the method's plan (`methods.get(config.method).build`), trains its stages in order
(`stages.run_stages`; a killed run resumes with the same command), then evaluates every student
next to the teacher's DDIM and best training-free solver at the same NFE and writes into the
workdir: results.json (the table, the command, the config, per-stage steps and wall time),
results.md, distill.png, and samples/<student>_nfe<k>.npz (x_start, samples, nfe and the noise
levels alpha/sigma at the start and end).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import jax
from absl import app, flags, logging

from diffdistill import _validate, methods, solvers
from diffdistill.methods import _common, plan as plan_lib
from diffdistill.train import optim, step as step_lib
from experiments.distill import evaluation, report, setup as setup_lib, stages


def _define_flags():
  from ml_collections import config_flags  # noqa: PLC0415
  config_flags.DEFINE_config_file("config", None, "config.py:<method>_<testbed>", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run folder: stages, samples, results.")


COPY_SOLVERS = ("ipndm", "dpm_solver_pp_2m", "ddim")  # the copy's sampler at an NFE: first feasible


def build_plan(config, setup) -> plan_lib.Plan:
  """The method's plan; when it fits a network copy of the teacher, the copy itself joins the
  evaluation, sampled with a training-free solver at each student NFE: the floor its students
  start from."""
  plan = methods.get(config.method).build(config, setup)
  copy = next((s for s in plan.stages if s.name == "copy"), None)
  if copy is not None and config.eval.copy_rows:
    net = _common.student_net(config, setup)
    for nfe in sorted({s.nfe for s in plan.students if s.nfe > 0}):  # NFE 0: SDS / VSD particles
      solver = next(n for n in COPY_SOLVERS if _feasible(n, nfe))
      sample = functools.partial(_copy_sample, net.denoise, schedule=net.schedule, solver=solver,
                                 t_start=setup.t_start, t_end=setup.t_end)
      plan.students.append(plan_lib.Student(name=f"network copy + {solver}", nfe=nfe,
                                            params=lambda r: r["copy"]["student"], sample=sample))
  return plan


def _feasible(solver, nfe):
  try:
    solvers.steps_for_nfe(solver, nfe)
  except ValueError:
    return False
  return True


def _copy_sample(denoise, params, x, *, nfe, rng=None, **kw):
  del rng
  return solvers.sample(functools.partial(denoise, params), x, nfe=nfe, **kw)


def _positive_int(name: str, value, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def validate(config, setup, workdir: str, plan: plan_lib.Plan | None = None) -> None:
  """Every check that can fail before a file is written: a bad config leaves no workdir behind,
  and nothing fails after training that could have failed before it."""
  _validate.check_writable_dir("workdir", workdir)
  _positive_int("config.batch_size", config.batch_size)
  # a loss that reads groups of examples (IMM's particles) needs whole groups on every device
  group = math.lcm(1, *(u.group_size for stage in (plan.stages if plan else ())
                        for u in stage.method.updates))
  step_lib.check_batch_size(config.batch_size, mesh=setup.mesh, group_size=group)
  e = config.eval
  _positive_int("config.eval.num_samples", e.num_samples, 2)  # distribution metrics need two
  _positive_int("config.eval.repeats", e.repeats)
  for key in ("solvers", "always"):
    unknown = sorted(set(e[key]) - set(solvers.SOLVERS))
    if unknown:
      raise ValueError(f"config.eval.{key} has unknown solvers {unknown}; known: "
                       f"{sorted(solvers.SOLVERS)}.")
  for nfe in e.teacher_nfes:
    _positive_int("each of config.eval.teacher_nfes", nfe)
  optim.make_optimizer(dict(config.optim), num_steps=10**6)  # a bad optimizer, before any training
  evaluation.check_fid_config(setup)
  for stage in plan.stages if plan else ():  # a shared copy fitted for another run
    if stage.directory and stage.identity is not None:
      stages.check_identity(stage.directory, stage.identity, stage.name, record=False)
  saved = os.path.join(workdir, "config.json")
  if os.path.exists(saved):  # a restart resumes; another run must not overwrite this one
    with open(saved) as f:
      old = json.load(f)
    new = json.loads(config.to_json_best_effort())
    diff = sorted(_flat(old).items() ^ _flat(new).items())
    if diff:
      keys = sorted({k for k, _ in diff})
      raise ValueError(
          f"workdir={workdir!r} holds a run of {old.get('method')}_{old.get('testbed')} with "
          f"another config (differing: {keys[:6]}); a run resumes only with the same config. "
          "Choose another --workdir (or delete that one).")


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = json.dumps(v)
  return out


def run(config, workdir: str) -> dict:
  """Builds the plan, trains its stages, evaluates its students; returns results.json's content."""
  start = time.perf_counter()
  setup = setup_lib.make_setup(config)
  plan = build_plan(config, setup)
  validate(config, setup, workdir, plan)
  os.makedirs(workdir, exist_ok=True)
  setup.workdir = workdir
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  results, stats = stages.run_stages(plan, setup, workdir, progress=config.progress)
  train_s = time.perf_counter() - start
  rows = (plan.evaluate or evaluation.evaluate)(plan, setup, results, workdir,
                                                progress=config.progress)
  notes = {}
  if "extra" in plan.notes:
    x_start = setup.start_noise(jax.random.key(config.eval.seed), config.eval.num_samples)
    notes = plan.notes["extra"](results, x_start)
  table = (plan.table or report.table)(rows)
  out = {"command": " ".join(["python -m experiments.distill.main"] + sys.argv[1:]),
         "variant": f"{config.method}_{config.testbed}", "teacher": setup.teacher.name,
         "rows": rows, "table": table, "stages": stats, "notes": notes,
         "seconds": {"train": train_s, "total": time.perf_counter() - start},
         "config": config.to_dict()}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table)
  report.figure(rows, workdir, f"{config.method} on {setup.teacher.name}")
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
