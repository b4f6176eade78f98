"""The quickstart's core on a tiny size: every method runs, is scored and lands in the outputs."""

import json
import os

import numpy as np

from diffdistill import solvers
from experiments.quickstart import config as quickstart_config
from experiments.quickstart import main as quickstart


def test_quickstart_tiny(tmp_path):
  config = quickstart_config.get_config("tiny")
  rows = quickstart.run(config, str(tmp_path), progress=False)
  solver_rows = [r for r in rows if r["family"] == "solver"]
  assert {(r["name"], r["nfe_asked"]) for r in solver_rows} == {
      (s, n) for s in config.solvers for n in config.nfe}
  # the distilled students join the table at their own NFE
  assert {(r["name"], r["nfe"]) for r in rows if r["family"] == "distilled"} == {
      ("pd student", 2), ("pd student", 1)}
  err = {(r["name"], r["nfe"]): r["median"] for r in rows}
  for r in rows:
    assert not r["nan"] and np.isfinite(r["rms"]) and r["ms"] > 0
  # Scored against the exact flow map, error must fall with NFE, and the 2nd/3rd-order multistep
  # solvers must beat DDIM at equal NFE; a wrong reference (another end time, other noise) or a
  # mis-wired solver breaks both.
  for s in config.solvers:
    assert err[s, 10] < 0.7 * err[s, 5], s
  for s in config.solvers:
    if s != "ddim":
      assert err[s, 10] < 0.7 * err["ddim", 10], s
  md = (tmp_path / "results.md").read_text()
  assert all(s in md for s in config.solvers)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert len(saved["rows"]) == len(rows)
  assert os.path.getsize(tmp_path / "quickstart.png") > 10_000


def test_reference_is_the_exact_flow_map_of_the_same_noise():
  # A 3rd-order solver at NFE 50 lands within ~1e-4 of the exact map; a reference from other
  # noise, to another end time (even 20 t_min) or in the wrong precision would be far off.
  config = quickstart_config.get_config("tiny")
  setup = quickstart.make_setup(config)
  run = solvers.make_sampler(setup.apply, schedule=setup.schedule, solver="unipc_2", nfe=50)
  method = quickstart.Method(name="unipc_2", family="solver", nfe=50, nfe_asked=50, order=3, run=run)
  r = quickstart.evaluate(method, setup, repeats=1)
  assert r["median"] < 1e-3 and r["rms"] < 3e-3, r


def test_deterministic_solvers_are_the_registry_minus_stochastic_and_adaptive():
  names = quickstart.deterministic_solvers()
  assert "ddim" in names and "adaptive" not in names
  assert not any(solvers.SOLVERS[n].stochastic for n in names)
