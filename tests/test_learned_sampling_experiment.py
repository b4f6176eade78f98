"""Smoke test of experiments/learned_sampling at its `tiny` size (the README's command, shrunk)."""

import json

import pytest

from experiments.learned_sampling import config as config_lib
from experiments.learned_sampling import main as main_lib


@pytest.mark.slow  # ~50 s: reference solves and two fits
def test_tiny_config_writes_results_with_learned_and_standard_rows(tmp_path):
  summary = main_lib.run(config_lib.get_config("tiny"), str(tmp_path))
  s = summary["ring2d"]
  assert set(s["best_standard"]) == {5, 8}
  assert s["dpm_solver_pp_2m/learned grid"][5]["test"]["median"] > 0
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["summary"]["ring2d"]["best_standard"]["5"]["method"] == "dpm_solver_pp_2m/logsnr"
  assert (tmp_path / "grids.png").exists() and (tmp_path / "results.md").exists()
