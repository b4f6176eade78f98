"""experiments/train_teacher end to end: exact resume after SIGKILL, clear errors before compiling."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from diffdistill.train import checkpoint as ckpt_lib
from experiments.train_teacher import config as config_lib, main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 400


def tiny(data_dir, **overrides):
  """toy2d_cpu shrunk to milliseconds per step, as config-override flags and as a ConfigDict."""
  values = {"num_steps": NUM_STEPS, "batch_size": 16, "log_every": 1, "checkpoint_every": 50,
            "optim.warmup_steps": 10, "network.kwargs.features": 16,
            "network.kwargs.num_blocks": 1, "network.kwargs.emb_dim": 16,
            "sample_at_end": False, "dataset.num_examples": 1000, "dataset.data_dir": data_dir,
            "dataset.prefetch": 0, "progress": False, **overrides}
  return values


def as_flags(values):
  return [f"--config.{k}={v}" for k, v in values.items()]


def as_config(values):
  config = config_lib.get_config("toy2d_cpu")
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def command(workdir, values):
  return [sys.executable, "-m", "experiments.train_teacher.main",
          "--config=experiments/train_teacher/config.py:toy2d_cpu", f"--workdir={workdir}",
          *as_flags(values)]


def env():
  e = dict(os.environ)
  e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
  return e


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r["step"] for r in records], [r["loss"] for r in records]


def test_sigkill_after_a_checkpoint_resumes_to_the_same_losses(tmp_path, data_dir):
  values = tiny(data_dir)
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  subprocess.run(command(ref, values), cwd=ROOT, env=env(), check=True, capture_output=True)
  proc = subprocess.Popen(command(killed, values), cwd=ROOT, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while not os.path.isdir(os.path.join(killed, "checkpoints", "100")):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_at_kill, _ = losses(killed)
  assert 100 <= max(steps_at_kill) < NUM_STEPS  # killed mid-run, after the checkpoint
  restart = subprocess.run(command(killed, values), cwd=ROOT, env=env(), check=True,
                           capture_output=True, text=True)
  assert "Resuming from the checkpoint of step" in restart.stderr
  ref_steps, ref_losses = losses(ref)
  steps, resumed_losses = losses(killed)
  assert steps == ref_steps == list(range(1, NUM_STEPS + 1))
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
  main_lib.train(as_config(tiny(data_dir, num_steps=2, checkpoint_every=2)), workdir)
  before = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
            for r, _, fs in os.walk(workdir) for f in fs}
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="different model"):
      main_lib.train(as_config(tiny(data_dir, num_steps=4, **{"network.kwargs.features": 32})),
                     workdir)
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
  after = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
           for r, _, fs in os.walk(workdir) for f in fs}
  assert after == before
