"""experiments/train_teacher end to end: exact resume after SIGKILL, clear errors before compiling."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffdistill.train import checkpoint as ckpt_lib
from experiments.train_teacher import main as main_lib
from train_helpers import as_config, as_flags, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 1000  # long enough that the kill lands mid-run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def command(workdir, values):
  return [sys.executable, "-m", "experiments.train_teacher.main",
          "--config=experiments/train_teacher/config.py:toy2d_cpu", f"--workdir={workdir}",
          *as_flags(values)]


def env():
  """One CPU device: the subprocess runs are about step overhead, and 1 device steps fastest."""
  e = dict(os.environ)
  e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
  return e


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r["step"] for r in records], [r["loss"] for r in records]


# ~30 s (three processes); the default run keeps the exact checkpoint round trip
# (test_train_checkpoint) and the interrupted run's resume message (test_train_loop)
@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [{}, {"dataset.pipeline": "grain", "dataset.workers": 1}],
                         ids=["native", "grain"])
def test_sigkill_after_a_checkpoint_resumes_to_the_same_losses(tmp_path, data_dir, pipeline):
  values = tiny(data_dir, num_steps=NUM_STEPS, log_every=10, **pipeline)
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  subprocess.run(command(ref, values), cwd=ROOT, env=env(), check=True, capture_output=True)
  # its own process group, killed whole as a preempted job is: grain's worker processes outlive
  # a parent killed alone (one was seen running an hour later)
  proc = subprocess.Popen(command(killed, values), cwd=ROOT, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
  deadline = time.time() + 120
  while not os.path.isdir(os.path.join(killed, "checkpoints", "50")):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
    time.sleep(0.005)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  steps_at_kill, _ = losses(killed)
  assert 50 <= max(steps_at_kill) < NUM_STEPS  # killed mid-run, after the checkpoint
  restart = subprocess.run(command(killed, values), cwd=ROOT, env=env(), check=True,
                           capture_output=True, text=True)
  assert "Resuming from the checkpoint of step" in restart.stderr
  ref_steps, ref_losses = losses(ref)
  steps, resumed_losses = losses(killed)
  assert steps == ref_steps == list(range(10, NUM_STEPS + 1, 10))
  assert resumed_losses == ref_losses  # bit for bit


BAD = [
    ({"optim.name": "sgdd"}, "optim.name must be one of"),
    ({"network.name": "resnet"}, "config.network.name must be one of"),
    ({"dataset.name": "toy2d/rings"}, "config.dataset.name must be one of"),
    ({"loss.kind": "noise"}, "config.loss.kind must be one of"),
    ({"batch_size": 12}, "must be a positive multiple of the device count"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m.split()[0] for _, m in BAD])
def test_bad_config_is_a_clear_error_before_compiling_or_writing(tmp_path, data_dir, caplog,
                                                                 overrides, message):
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    with pytest.raises(ValueError, match=message):
      main_lib.train(as_config(tiny(data_dir, **overrides)), workdir)
  assert not os.path.exists(workdir)
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


def test_workdir_of_another_model_is_an_error_before_compiling_and_untouched(tmp_path, data_dir,
                                                                              caplog):
  workdir = str(tmp_path / "run")
  main_lib.train(as_config(tiny(data_dir, num_steps=2, checkpoint_every=2,
                                      **{"optim.warmup_steps": 0})), workdir)
  before = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
            for r, _, fs in os.walk(workdir) for f in fs}
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="different model"):
      main_lib.train(as_config(tiny(data_dir, num_steps=4, **{"network.kwargs.features": 32,
                                                          "optim.warmup_steps": 0})),
                     workdir)
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
  after = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
           for r, _, fs in os.walk(workdir) for f in fs}
  assert after == before


def test_end_of_run_samples_figure_and_metrics_against_the_exact_ring(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  main_lib.train(as_config(tiny(data_dir, num_steps=4, log_every=2, sample_at_end=True,
                                num_eval_samples=64, sampler_rtol=1e-2,
                                **{"optim.warmup_steps": 0})), workdir)
  assert os.path.getsize(os.path.join(workdir, "samples", "step_0000004.png")) > 1000
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    record = json.loads(f.readlines()[-1])
  assert record["step"] == 4
  # 4 steps of training are far from the ring: the distance must sit well above its floor
  assert record["eval/sliced_w2"] > 2 * record["eval/sliced_w2_floor_mean"] > 0


# ---- Bad inputs (issue 7): command-line overrides and the workdir. ----


def parse_config(*overrides, variant="toy2d_cpu"):
  """The config as `python -m experiments.train_teacher.main --config=...:variant OVERRIDES` sees it."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["main", f"--config=experiments/train_teacher/config.py:{variant}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_schedule_keywords_can_be_set_from_the_command_line():
  from diffdistill import schedules
  from experiments.train_teacher import teacher
  config = parse_config("--config.schedule.kwargs.t_max=0.9")
  assert teacher.schedule_from_config(config.schedule) == schedules.VPCosine(t_max=0.9)
  config = parse_config("--config.schedule.kwargs.sigma_max=40", variant="digits_cpu")
  assert teacher.schedule_from_config(config.schedule) == schedules.EDM(sigma_max=40.0)
  assert teacher.schedule_from_config(parse_config().schedule) == schedules.VPCosine()
  config = parse_config("--config.schedule.kwargs.sigma_max=40")
  with pytest.raises(ValueError, match="Bad arguments for schedule 'vp_cosine'"):
    teacher.schedule_from_config(config.schedule)


def test_every_schedule_keyword_is_declared_in_the_config():
  import dataclasses
  from diffdistill import schedules
  from experiments.train_teacher import config as config_lib
  fields = {f.name for cls in schedules.SCHEDULES.values() for f in dataclasses.fields(cls)}
  fields |= {"beta_schedule", "num_steps"}  # schedules.get's named beta lists
  assert fields - {"betas"} == set(config_lib.SCHEDULE_KWARGS)


def test_unusable_workdir_is_an_error_before_compiling(tmp_path, data_dir, caplog):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    with pytest.raises(ValueError, match="workdir=.* is a file"):
      main_lib.train(as_config(tiny(data_dir)), str(blocker / "run"))
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


def _ctrl_c_when(proc, ready, timeout=120):
  deadline = time.time() + timeout
  while not ready():
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
    time.sleep(0.005)
  proc.send_signal(signal.SIGINT)
  return proc.communicate()[1].decode()


# ~40 s (four processes). Before train.interrupt, 4 of 11 Ctrl-Cs during start-up segfaulted
# (exit -11), one was lost in jax's gc callback (the run went on, status 0), others left a
# KeyboardInterrupt traceback from inside jax's compiler (exit -2).
@pytest.mark.slow
def test_ctrl_c_at_any_moment_exits_130_cleanly_and_the_run_resumes(tmp_path, data_dir):
  values = tiny(data_dir, num_steps=NUM_STEPS, log_every=10)
  start = time.time()
  moments = {"imports": lambda: time.time() > start + 0.3,
             "start-up": lambda: time.time() > start + 3.0,
             "training": lambda: os.path.isdir(os.path.join(tmp_path / "training", "checkpoints",
                                                            "50"))}
  for name, ready in moments.items():
    workdir = str(tmp_path / name)
    start = time.time()
    proc = subprocess.Popen(command(workdir, values), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = _ctrl_c_when(proc, ready)
    assert proc.returncode == 130, (name, stderr[-3000:])
    for bad in ("Traceback", "Exception ignored", "Fatal Python error"):
      assert bad not in stderr, (name, stderr[-3000:])
    written = [f for _, _, fs in os.walk(workdir) for f in fs] if os.path.isdir(workdir) else []
    assert not [f for f in written if f.endswith(".tmp")], (name, written)
  workdir = str(tmp_path / "training")
  steps, _ = losses(workdir)
  assert 50 <= max(steps) < NUM_STEPS
  last = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  restart = subprocess.run(command(workdir, {**values, "num_steps": last + 10}), cwd=ROOT,
                           env=env(), check=True, capture_output=True, text=True)
  assert f"Resuming from the checkpoint of step {last}" in restart.stderr
  assert losses(workdir)[0][-1] == last + 10


# generates a dataset and compiles a step: 15-60 s on 2 cores
@pytest.mark.slow
def test_progress_false_also_silences_tfds_while_it_generates_the_dataset(tmp_path, capfd):
  # before: TFDS's "Generating splits... / Shuffling ..." bars printed with progress=False
  main_lib.train(as_config(tiny(str(tmp_path / "tfds"), num_steps=1, checkpoint_every=0,
                                **{"dataset.num_examples": 200})), str(tmp_path / "run"))
  err = capfd.readouterr().err
  assert os.path.isdir(tmp_path / "tfds" / "toy2d")  # generated here, by this run
  assert "examples/s" not in err and "Generating" not in err, err[-2000:]


# three runs (~25 s of CPU); the default suite keeps the step equality (test_train_sharding) and
# the sharded checkpoint restored onto another mesh (test_train_checkpoint)
@pytest.mark.slow
def test_fsdp_run_and_resume_on_another_mesh_shape_match_data_parallel(tmp_path, data_dir):
  """--config.mesh.fsdp=8 on the 8 devices, killed after step 3 and resumed as 2 data x 4 fsdp:
  the losses of the data-parallel run, and the state really is split."""
  # decay_steps fixed: the first fsdp run stops at step 3 with the 6-step run's learning rates
  values = tiny(data_dir, num_steps=6, checkpoint_every=3,
                **{"optim.warmup_steps": 0, "optim.decay_steps": 6})
  ref = main_lib.train(as_config(values), str(tmp_path / "dp"))
  workdir = str(tmp_path / "fsdp")
  sharded = {"mesh.fsdp": 8, "mesh.min_size": 0}
  first = main_lib.train(as_config({**values, **sharded, "num_steps": 3}), workdir)
  kernel = first.params["Dense_0"]["kernel"]  # [2, 16]: 16 split over the 8 devices
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (2, 2)
  resumed = main_lib.train(as_config({**values, **sharded, "mesh.fsdp": 4}), workdir)
  assert dict(resumed.params["Dense_0"]["kernel"].sharding.mesh.shape) == {"data": 2, "fsdp": 4}
  _, ref_losses = losses(str(tmp_path / "dp"))
  steps, fsdp_losses = losses(workdir)
  assert steps == list(range(1, 7))
  np.testing.assert_allclose(fsdp_losses, ref_losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_mesh_that_does_not_fit_the_devices_is_a_clear_error(tmp_path, data_dir):
  with pytest.raises(ValueError, match=r"config.mesh .*fsdp=3.*must divide the device count 8"):
    main_lib.train(as_config(tiny(data_dir, **{"mesh.fsdp": 3})), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
