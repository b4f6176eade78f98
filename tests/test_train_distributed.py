"""Two processes x two CPU devices over jax.distributed (gloo) train the same params as one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.train_teacher import main as main_lib
from train_helpers import as_config, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_distributed_worker.py")


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # two JAX processes over gloo: ~20 s of the default suite's 6-minute budget
@pytest.mark.parametrize("mesh", [{}, {"mesh.fsdp": 2, "mesh.min_size": 16}],
                         ids=["data_parallel", "fsdp"])
def test_two_processes_match_each_other_and_one_process(tmp_path, mesh):
  """data parallel: a (4) mesh over 2 processes x 2 devices; fsdp: (2 data x 2 fsdp), the leaves
  of >= 16 elements split over the fsdp axis; each against one process of 8 devices with the
  same config."""
  values = tiny(str(tmp_path / "tfds"), num_steps=20, checkpoint_every=10, **mesh)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  # one process first: it also generates the dataset, which the two processes then share
  single = main_lib.train(as_config(values), str(tmp_path / "single"))
  port = free_port()
  outs = [str(tmp_path / f"p{i}.npz") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", str(port), str(tmp_path / "multi"),
                             outs[i], json.dumps(values)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  split = [int(log.split("split leaves: ")[1].split()[0]) for log in logs]
  assert all(n > 0 for n in split) if mesh else split == [0, 0], split
  p0, p1 = (dict(np.load(o)) for o in outs)
  assert p0.keys() == p1.keys() and p0
  for k in p0:
    np.testing.assert_array_equal(p0[k], p1[k])
  ref = {jax.tree_util.keystr(p): np.asarray(x)
         for p, x in jax.tree_util.tree_flatten_with_path(single.params)[0]}
  assert ref.keys() == p0.keys()
  for k in ref:  # 8 devices vs 2 x 2: the same math, other reduction orders
    np.testing.assert_allclose(p0[k], ref[k], rtol=2e-4, atol=2e-5)
  with open(tmp_path / "multi" / "metrics.jsonl") as f:
    multi_losses = [json.loads(line)["loss"] for line in f]
  with open(tmp_path / "single" / "metrics.jsonl") as f:
    single_losses = [json.loads(line)["loss"] for line in f]
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-4)
