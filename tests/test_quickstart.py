"""The quickstart's core on a tiny size: every method runs, is scored and lands in the outputs."""

import json
import os
import types

import numpy as np
import pytest

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


# ---- Bad inputs (issue 7): the command line and the workdir, checked before any work. ----


def parse_config(*overrides, variant="tiny"):
  """The config as `python -m experiments.quickstart.main --config=...:variant OVERRIDES` sees it."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["main", f"--config=experiments/quickstart/config.py:{variant}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_solvers_comma_list_from_the_command_line():
  config = parse_config("--config.solvers=ddim,dpm_solver_pp_2m", variant="ring2d")
  assert quickstart.solver_names(config) == ["ddim", "dpm_solver_pp_2m"]
  assert quickstart.solver_names(parse_config()) == ["ddim", "dpm_solver_pp_2m"]
  assert quickstart.solver_names(parse_config(variant="ring2d")) == quickstart.deterministic_solvers()
  for value, bad in (("ddim,foo", r"\['foo'\]"), ("ddpm", r"\['ddpm'\] not usable here \(\['ddpm'\] take random draws")):
    with pytest.raises(ValueError, match=f"config.solvers: {bad}"):
      quickstart.validate(parse_config(f"--config.solvers={value}"))


@pytest.fixture
def no_reference(monkeypatch):
  """Fails the test if the run gets as far as computing the teacher and the reference."""
  def fail(config):
    raise AssertionError("make_setup ran before the config and workdir were checked")
  monkeypatch.setattr(quickstart, "make_setup", fail)


@pytest.mark.parametrize("override, message", [
    ("--config.spacing=karrass", "config.spacing must be one of"),
    ("--config.nfe=0", "config.nfe must be an integer >= 1"),
    ("--config.teacher=ring", "config.teacher must be one of"),
    ("--config.solvers=ddim,foo", "config.solvers"),
])
def test_bad_config_fails_before_the_reference_and_leaves_no_workdir(tmp_path, no_reference,
                                                                     override, message):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    quickstart.run(parse_config(override), str(workdir), progress=False)
  assert not workdir.exists()


def test_unusable_workdir_fails_before_the_reference(tmp_path, no_reference):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ValueError, match="workdir=.* is a file"):
    quickstart.run(parse_config(), str(blocker / "run"), progress=False)


def test_figure_is_readable_and_shows_the_learned_grid(tmp_path, monkeypatch):
  # before: 21 legend entries at font 6, ticks at every NFE met (18, 19, 20 ran together), and no
  # sample panel for the learned grid (the best row at NFE 4)
  config = quickstart_config.get_config("ring2d")
  rs = np.random.RandomState(0)
  ref = rs.randn(256, 2)
  rows = [dict(name=n, family="solver", nfe=nfe + (i % 3 == 0), nfe_asked=nfe, median=1.0 / nfe,
               samples=ref) for i, n in enumerate(quickstart.deterministic_solvers())
          for nfe in config.nfe]
  rows += [dict(name="unipc_2 + learned grid", family="learned", nfe=nfe, nfe_asked=nfe,
                median=0.1 / nfe, samples=ref) for nfe in config.nfe]
  rows += [dict(name="pd student", family="distilled", nfe=n, nfe_asked=n, median=0.05,
                samples=ref) for n in (1, 2, 4)]
  figures = []
  monkeypatch.setattr(quickstart.plt, "close", figures.append)
  quickstart.figure(rows, types.SimpleNamespace(reference=ref), config, str(tmp_path / "q.png"))
  main_ax, *panels = figures[0].axes
  assert [t.get_text() for t in main_ax.get_xticklabels()] == [str(n) for n in config.nfe]
  labels = [t.get_text() for t in main_ax.get_legend().get_texts()]
  assert len(labels) <= 7 and labels[-1].startswith("the other") and min(
      t.get_fontsize() for t in main_ax.get_legend().get_texts()) >= 9
  titles = [p.get_title().split("\n")[0] for p in panels]
  assert titles == ["exact flow map", *config.scatter_methods, "unipc_2 + learned grid"]
