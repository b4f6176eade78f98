"""Unclear errors of the experiments found by issue 19, now named with the accepted values."""

import os
import subprocess
import sys

import numpy as np
import pytest

from diffdistill import analytic
from experiments import teachers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("content", [b"not an npz", None], ids=["text", "npy"])
def test_a_mixture_file_that_is_not_an_npz_is_named(tmp_path, content):
  # before: numpy's "This file contains pickled (object) data ... allow_pickle=" message
  path = str(tmp_path / "mix.npz")
  if content is None:
    with open(path, "wb") as f:
      np.save(f, np.ones(3))
  else:
    with open(path, "wb") as f:
      f.write(content)
  with pytest.raises(ValueError, match=r"Mixture file .*mix.npz' is not an .npz archive .*"
                     r"teachers.save_mixture\(path, mix\) or np.savez\(path, weights=\[K\]"):
    teachers.load_mixture(path)
  teachers.save_mixture(path, analytic.ring2d())  # a real one still loads
  assert teachers.load_mixture(path).means.shape == analytic.ring2d().means.shape
  full = analytic.mixture64(num_components=3, seed=1)  # full covariances round-trip too
  teachers.save_mixture(path, full)
  back = teachers.load_mixture(path)
  np.testing.assert_allclose(np.asarray(back.covs), np.asarray(full.covs), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(back.weights), np.asarray(full.weights), rtol=1e-6)


# a process of its own (its flags would collide with other mains' in this one): the imports
# take 5-20 s on 2 cores
def _analytic_demo(workdir, num_samples: int) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.analytic_demo.main",
                         f"--workdir={workdir}", f"--num_samples={num_samples}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_analytic_demo_runs_and_prints_its_mode_columns(tmp_path):
  # the README's command; it once died converting mode_stats' per-component array to a float
  proc = _analytic_demo(tmp_path / "demo", 200)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| weight_tv | cov_error | tail_share | core_cov_error |" in proc.stdout, proc.stdout
  assert os.path.exists(tmp_path / "demo" / "analytic_demo.png")


@pytest.mark.slow
def test_analytic_demo_num_samples_below_two_names_the_flag(tmp_path):
  # before: an error from inside the metrics that did not name --num_samples
  proc = _analytic_demo(tmp_path / "demo", 1)
  assert proc.returncode != 0
  assert "flag --num_samples=1: 1 is not integer >= 2" in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "demo")
