"""experiments/distill end to end on tiny variants: outputs, resume after SIGKILL, one compile."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffdistill import analytic, schedules
from diffdistill.losses import progressive
from diffdistill.train import state as state_lib, step as step_lib
from diffdistill.method import Method, Update
from diffdistill import methods
from diffdistill.methods.plan import file_name
from experiments.distill import setup as setup_lib
from experiments.distill import config as config_lib
from experiments.distill import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
  e = dict(os.environ)
  e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
  return e


@pytest.mark.parametrize("variant", [
    "pd_ring2d",
    *(pytest.param(v, marks=pytest.mark.slow)
      for v in ("reflow_ring2d", "kd_ring2d", "tract_ring2d", "boot_ring2d"))])
def test_tiny_variant_writes_results_and_samples(tmp_path, variant):
  config = config_lib.get_config(f"{variant},tiny")
  out = main_lib.run(config, str(tmp_path))
  rows = out["rows"]
  students = [r for r in rows if not r["method"].startswith("teacher")]
  assert students and all(np.isfinite(r["median"]) and not r["nan"] for r in rows)
  for r in students:  # every student NFE has the teacher's DDIM beside it
    assert any(t["method"] == "teacher ddim" and t["nfe"] == r["nfe"] for t in rows)
    f = np.load(tmp_path / "samples" / f"{file_name(r['method'])}_nfe{r['nfe']}.npz")
    assert f["x_start"].shape == f["samples"].shape == (config.eval.num_samples, 2)
    assert int(f["nfe"]) == r["nfe"]
    assert {"alpha_start", "sigma_start", "alpha_end", "sigma_end"} <= set(f.files)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["variant"] == variant and len(saved["rows"]) == len(rows)
  assert (tmp_path / "distill.png").stat().st_size > 10_000
  if variant == "reflow_ring2d":
    assert 0 < out["notes"]["straightness_1rf"]


@pytest.mark.slow  # ~25 s: the losses' fixed points (test_distill_losses) are in the default run
def test_tiny_guided_pd_scores_every_w_against_the_exact_guided_map(tmp_path):
  config = config_lib.get_config("gpd_ring2d,tiny")
  out = main_lib.run(config, str(tmp_path))
  rows = {(r["method"], r["steps"]): r for r in out["rows"]}
  for k in config.gpd.eval_steps:
    student = rows[("guided PD (w=3)", k)]
    teacher = rows[("guided teacher ddim (w=3)", k)]
    assert student["nfe"] == k and teacher["nfe"] == 2 * k  # a guided teacher step is 2 calls
    assert np.isfinite(student["median"]) and 0 <= student["class_accuracy"] <= 1
    f = np.load(tmp_path / "samples" / f"guided_PD_w3_nfe{k}.npz")
    assert f["samples"].shape == (config.eval.num_samples, 2) and f["label"].max() < 4
  # the reference is the exact guided flow map: every sample lands in its label's class
  assert rows[("exact guided flow map (w=3)", 0)]["class_accuracy"] == 1.0
  assert "| guided PD (w=3) | 1 | 1 |" in (tmp_path / "results.md").read_text()


def test_new_teacher_and_new_round_compile_nothing():
  # PD's step is traced once for all rounds: the teacher and N are frozen inputs.
  schedule = schedules.VPLinear()
  student = lambda p, x, t: p["c"] * x  # noqa: E731
  loss = chex.assert_max_traces(progressive.pd_loss(student, student, schedule=schedule), n=1)
  method = Method(name="pd", updates=(Update(player="student", loss_fn=loss, inputs={
      "teacher_params": "frozen/teacher", "num_steps": "frozen/num_steps"}),))
  mesh = step_lib.make_mesh()
  step = step_lib.make_step(method, mesh=mesh)
  batch = step_lib.global_batch({"x": np.asarray(analytic.sample(
      analytic.ring2d(), jax.random.key(0), 16))}, mesh=mesh)
  tx = optax.sgd(1e-3)  # one optimizer object: it is part of the state's (static) structure
  for n, c in ((8, 1.0), (4, 0.9), (2, 0.8), (1, 0.7)):
    player = state_lib.Player.create(params={"c": jnp.float32(c)}, tx=tx)
    state = state_lib.TrainState.create(players={"student": player}, rng=jax.random.key(0))
    state, _ = step(state, batch, {"teacher": {"c": jnp.float32(c)}, "num_steps": jnp.int32(n)})


def _command(workdir, extra=()):
  return [sys.executable, "-m", "experiments.distill.main",
          "--config=experiments/distill/config.py:pd_ring2d,tiny", f"--workdir={workdir}",
          "--config.pd.steps_per_round=300", "--config.log_every=1", *extra]


def _losses(workdir):
  out = {}
  for stage in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, stage, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        out[stage] = [(r["step"], r["loss"]) for r in map(json.loads, f)]
  return out


@pytest.mark.slow  # three tiny runs in subprocesses: ~1 min on an idle 2-core machine
def test_sigkill_mid_round_resumes_to_the_same_losses(tmp_path):
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  subprocess.run(_command(ref), cwd=ROOT, env=env(), check=True, capture_output=True)
  proc = subprocess.Popen(_command(killed), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(killed, "round_1", "checkpoints", "40")):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  at_kill = _losses(killed)
  assert 40 <= at_kill["round_1"][-1][0] < 300  # killed mid-round, after a checkpoint
  subprocess.run(_command(killed), cwd=ROOT, env=env(), check=True, capture_output=True)
  want, got = _losses(ref), _losses(killed)
  assert set(want) == {"copy", "round_2", "round_1"}
  assert got == want  # bit for bit, every stage


def test_a_trained_teacher_loads_inside_the_distill_command(tmp_path):
  # The distill main defines --config; loading a train_teacher workdir must not define it again
  # (it did, through train_teacher/evaluate.py's import-time flags: DuplicateFlagError).
  from experiments.train_teacher import main as teacher_main  # noqa: PLC0415
  from train_helpers import as_config, tiny  # noqa: PLC0415
  workdir = tmp_path / "teacher"
  teacher_main.train(as_config(tiny(str(tmp_path / "tfds"), num_steps=2, checkpoint_every=2)),
                     str(workdir))
  code = ("from experiments.distill import main; main._define_flags(); "
          "from experiments import teachers; "
          f"t = teachers.load(kind='workdir', path={str(workdir)!r}); "
          "print('loaded', t.name, t.example_shape, t.kind)")
  out = subprocess.run([sys.executable, "-c", code], env=env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "loaded toy2d/ring@2 (2,)" in out.stdout


def test_reschedule_moves_a_teacher_to_another_schedule():
  """teachers.reschedule of the exact VP teacher is the exact teacher of the new schedule, and a
  rescheduled teacher offers no weights to start a student from."""
  from experiments import teachers  # noqa: PLC0415
  with jax.enable_x64(True):
    vp = teachers.load(kind="analytic", name="ring2d")
    rf = schedules.RectifiedFlow()
    moved = teachers.reschedule(vp, rf)
    want = teachers.load(kind="analytic", name="ring2d", schedule=rf)
    x = jax.random.normal(jax.random.key(1), (5, 2), jnp.float64)
    t = jnp.linspace(0.05, 0.95, 5, dtype=jnp.float64)
    np.testing.assert_allclose(moved.apply(moved.params, x, t), want.apply(want.params, x, t),
                               rtol=1e-9, atol=1e-9)
  assert moved.schedule == rf and moved.module is None and moved.kind is None
  assert moved.mixture is vp.mixture and teachers.reschedule(vp, vp.schedule) is vp
  with pytest.raises(ValueError, match="schedule must be a schedules.Schedule"):
    teachers.reschedule(vp, "rectified_flow")


def test_digits_variants_reschedule_only_when_the_method_needs_another_schedule():
  cd = config_lib.get_config("cd_digits")
  assert cd.teacher.schedule == "" and cd.copy.num_steps == 0  # the teacher's own weights
  mf = config_lib.get_config("meanflow_digits")
  assert mf.teacher.schedule == "rectified_flow" and mf.copy.num_steps > 0
  assert mf.student.network == "unet_digits8" and mf.student.kind == "flow"


FULL = [(name, testbed) for name in methods.names()
        for testbed in getattr(methods.get(name), "FULL", {})]


def _flat(config) -> dict:
  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, "items"):
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", value
  return dict(walk(config, ""))


def test_full_budgets_change_only_their_keys_and_are_refused_where_there_is_none():
  # the methods whose one-step students need more than the 10-minute budget (issue 20) have one
  assert {("meanflow", "gmm64"), ("ect", "gmm64"), ("ct", "gmm64"), ("ict", "gmm64"),
          ("dmd", "gmm64"), ("dmd2", "gmm64")} <= set(FULL)
  for name, testbed in FULL:
    base = _flat(config_lib.get_config(f"{name}_{testbed}"))
    full = _flat(config_lib.get_config(f"{name}_{testbed},full"))
    want = methods.get(name).FULL[testbed]
    assert set(full) == set(base) and set(want) <= set(base)  # no key added by a typo
    assert {k for k in base if base[k] != full[k]} == set(want)
    assert all(full[k] == v for k, v in want.items())
    steps = [k for k in want if k.endswith("num_steps")]
    assert steps and all(full[k] > base[k] for k in steps)  # a longer run, not another recipe
  with pytest.raises(ValueError, match=r"pd_gmm64 has no ',full' budget.*'meanflow_gmm64'"):
    config_lib.get_config("pd_gmm64,full")
  with pytest.raises(ValueError, match=r"Unknown config option 'ful'; expected 'tiny', 'quick' or "
                                       r"'full'"):
    config_lib.get_config("meanflow_gmm64,ful")


def test_a_shared_copy_is_refused_by_a_run_that_needs_another(tmp_path):
  from diffdistill.methods import _common  # noqa: PLC0415
  from experiments.distill import stages  # noqa: PLC0415
  ident = {m: _common.copy_identity(config_lib.get_config(f"{m}_gmm64"))
           for m in ("pd", "cd", "ct", "ict", "ect", "meanflow", "shortcut", "scd")}
  # the README's shared copies: one for the VP methods, one for the rectified-flow ones
  assert ident["pd"] == ident["cd"] == ident["ct"] == ident["ict"] == ident["ect"]
  assert ident["meanflow"] == ident["shortcut"] != ident["ct"] != ident["scd"]
  stages.check_identity(str(tmp_path), ident["ct"], "copy")  # first use: recorded
  stages.check_identity(str(tmp_path), ident["ect"], "copy")  # the same copy
  with pytest.raises(ValueError, match=r"copy stage directory .* was fitted for another run: .*"
                                       r"student.kind there 'v', here 'flow', teacher.schedule "
                                       r"there 'vp_linear', here 'rectified_flow'"):
    stages.check_identity(str(tmp_path), ident["meanflow"], "copy")


@pytest.mark.slow  # ~10-20 s: trains a 2-step teacher
def test_a_trained_teacher_on_another_schedule_is_rescheduled(tmp_path):
  from diffdistill import parametrization  # noqa: PLC0415
  from experiments import teachers  # noqa: PLC0415
  from experiments.train_teacher import main as teacher_main  # noqa: PLC0415
  from train_helpers import as_config, tiny  # noqa: PLC0415
  workdir = str(tmp_path / "teacher")
  teacher_main.train(as_config(tiny(str(tmp_path / "tfds"), num_steps=2, checkpoint_every=2)),
                     workdir)
  config = config_lib.get_config("meanflow_ring2d,tiny")
  config.teacher.kind, config.teacher.path = "workdir", workdir
  setup = setup_lib.make_setup(config)
  own = teachers.load(kind="workdir", path=workdir)
  assert isinstance(setup.teacher.schedule, schedules.RectifiedFlow)
  assert setup.teacher.module is None and setup.t_start == 1.0
  x, t = jnp.ones((3, 2)), jnp.array([0.1, 0.5, 0.9])
  want = parametrization.rescheduled(own.apply, source=own.schedule,
                                     target=setup.teacher.schedule)(own.params, x, t)
  np.testing.assert_allclose(setup.teacher.apply(setup.teacher.params, x, t), want, rtol=1e-6)
  config.teacher.schedule = ""  # its own schedule: the teacher as trained
  assert setup_lib.make_setup(config).teacher.module is not None
  # a workdir written before config fields were added (dataset.pipeline / workers) still loads
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  for key in ("pipeline", "workers"):
    del saved["dataset"][key]
  with open(path, "w") as f:
    json.dump(saved, f)
  np.testing.assert_array_equal(teachers.load(kind="workdir", path=workdir).apply(own.params, x, t),
                                own.apply(own.params, x, t))


def test_a_copy_of_zero_steps_and_reflow_on_digits_are_refused():
  config = config_lib.get_config("cd_ring2d,tiny")
  config.copy.num_steps = 0  # an analytic teacher has no weights: the copy must be fitted
  with pytest.raises(ValueError, match=r"config.copy.num_steps=0: the teacher \(ring2d\)"):
    methods.get("cd").build(config, setup_lib.make_setup(config))
  with pytest.raises(ValueError, match="reflow_digits is not a variant"):
    config_lib.get_config("reflow_digits")


@pytest.mark.parametrize("key, value, match", [
    ("eval.solvers", ("dpm_solver_pp_2m", "dpm_solver_pp_9m"), r"eval.solvers has unknown solvers \['dpm_solver_pp_9m'\]"),
    ("eval.always", ("nope",), r"eval.always has unknown solvers"),
    ("pd.eval_steps", (3,), r"pd.eval_steps must be a non-empty subset of the rounds' step counts \[2, 1\]"),
    ("pd.steps_per_round", -1, r"pd.steps_per_round must be a positive integer, got -1"),
    ("batch_size", 0, r"config.batch_size must be an integer >= 1, got 0"),
    ("eval.num_samples", 0, r"config.eval.num_samples must be an integer >= 2, got 0"),
    ("eval.teacher_nfes", (10, 0), r"config.eval.teacher_nfes must be an integer >= 1, got 0"),
    ("optim.name", "sgdd", r"optim"),
])
def test_a_bad_config_is_refused_before_any_file_is_written(tmp_path, key, value, match):
  config = config_lib.get_config("pd_ring2d,tiny")
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match):
    main_lib.run(config, str(workdir))
  assert not workdir.exists()


def test_a_workdir_under_proc_and_a_workdir_of_another_run_are_refused(tmp_path):
  config = config_lib.get_config("pd_ring2d,tiny")
  with pytest.raises(ValueError, match="workdir='/proc/diffdistill_run' is not writable"):
    main_lib.run(config, "/proc/diffdistill_run")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))  # a pd run's
  other = config_lib.get_config("kd_ring2d,tiny")
  with pytest.raises(ValueError, match=r"holds a run of pd_ring2d with another config .*'method'"):
    main_lib.run(other, str(workdir))
  assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]  # nothing overwritten


def test_a_shared_copy_of_a_trained_teacher_starts_every_seed(tmp_path):
  """A seeds sweep with --config.copy.dir on a dataset teacher (the digits table's sCD and
  MeanFlow): the copy fitted under seed 0 starts seed 1 as it is. Its saved data position belongs
  to seed 0's pipeline; a finished stage reads no data, so it is not restored (it was, and seed 1
  stopped on 'state was saved by another pipeline')."""
  import dataclasses  # noqa: PLC0415
  from experiments.distill import stages  # noqa: PLC0415
  from experiments.train_teacher import main as teacher_main  # noqa: PLC0415
  from train_helpers import as_config, tiny  # noqa: PLC0415
  teacher = str(tmp_path / "teacher")
  teacher_main.train(as_config(tiny(str(tmp_path / "tfds"), num_steps=2, checkpoint_every=2)),
                     teacher)
  for seed in (0, 1):  # the copy stage alone: the stage the seeds share
    config = config_lib.get_config("meanflow_ring2d,tiny")
    config.teacher.kind, config.teacher.path = "workdir", teacher
    config.copy.dir, config.seed = str(tmp_path / "copy"), seed
    setup = setup_lib.make_setup(config)
    plan = main_lib.build_plan(config, setup)
    plan = dataclasses.replace(plan, stages=[s for s in plan.stages if s.name == "copy"])
    setup.workdir = str(tmp_path / f"seed{seed}")  # as main.run: the teacher's samples go there
    _, stats = stages.run_stages(plan, setup, setup.workdir, progress=False)
    assert stats["copy"]["trained_now"] == (config.copy.num_steps if seed == 0 else 0)
