"""Smoke tests of experiments/learned_sampling at its `tiny` size (the README's command, shrunk):
the learned rows, Analytic-DPM's ancestral rows scored as distributions, and a trained teacher
("workdir:PATH") in place of an analytic one."""

import functools
import json
import math

import jax
import pytest

from diffdistill import analytic, schedules
from experiments.learned_sampling import config as config_lib
from experiments.learned_sampling import main as main_lib
from experiments.train_teacher import sampling

VARIANCES = ("ddpm/analytic", "ddpm/posterior", "ddpm/forward")


def _check_distribution(entry):
  """Every ancestral variance, the best standard and the learned grid scored, finite, with the
  data-vs-data floor."""
  assert set(VARIANCES) <= set(entry) and "best_standard" in entry and "floor" in entry
  for m in (*VARIANCES, "best_standard", "dpm_solver_pp_2m/learned grid"):
    q = entry[m]
    assert all(math.isfinite(q[k]) for k in ("sliced_w2", "sliced_w2_floor_mean", "mmd2",
                                               "mmd2_floor_mean")), (m, q)
    assert q["sliced_w2"] > 0 and q["sliced_w2_floor_mean"] == entry["floor"]["sliced_w2"]
  assert not any(entry[m]["nan"] for m in VARIANCES)


@pytest.mark.slow  # ~20 s: reference solves, two fits, three ancestral samplers
def test_tiny_config_writes_results_with_learned_standard_and_ancestral_rows(tmp_path):
  config = config_lib.get_config("tiny")
  summary = main_lib.run(config, str(tmp_path))
  s = summary["ring2d"]
  assert set(s["best_standard"]) == {5, 8}
  assert s["dpm_solver_pp_2m/learned grid"][5]["test"]["median"] > 0
  assert set(s["distribution"]) == set(config.nfe)
  for n in config.nfe:
    _check_distribution(s["distribution"][n])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["summary"]["ring2d"]["best_standard"]["5"]["method"] == "dpm_solver_pp_2m/logsnr"
  gamma = [r for r in saved["rows"] if r["method"] == "ddpm/analytic"][0]["gamma"]
  assert len(gamma) == 5 and all(0.0 <= g <= 1.0 for g in gamma)
  assert "ddpm/analytic" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "grids.png").exists()


def test_ancestral_rows_run_each_variance_and_score_it_against_exact_samples():
  # One NFE, 128 draws: the three variances give three different sample sets from the same
  # noise and key (a sampler that ignored `kind` would give one), each scored with the floor.
  config = config_lib.get_config("tiny")
  sch = schedules.get(config.schedule)
  mix = analytic.get_mixture("ring2d")
  denoise = functools.partial(analytic.denoiser(sch), mix)
  x_T = main_lib.noise(sch, 128, mix.dim, jax.random.PRNGKey(0))
  x0 = analytic.sample(mix, jax.random.PRNGKey(1), 128)
  quality = lambda x: sampling.sample_quality(x, mix)
  rows = main_lib.ancestral_rows(denoise, x_T, x0, quality, schedule=sch, nfe=4, name="ring2d",
                                 config=config)
  assert [r["method"] for r in rows] == list(VARIANCES)
  assert len({r["distribution"]["sliced_w2"] for r in rows}) == 3
  floor = quality(x0)["sliced_w2_floor_mean"]
  for r in rows:
    assert not r["nan"] and r["distribution"]["sliced_w2_floor_mean"] == floor
    assert 0 < r["distribution"]["sliced_w2"] < 10 * mix.means.std()  # samples, not noise


def test_a_missing_trained_teacher_names_the_command_that_trains_it(tmp_path):
  config = config_lib.get_config("digits")
  assert config.teachers == ("workdir:runs/teacher_digits",)
  config.teachers = (f"workdir:{tmp_path / 'none'}",)
  with pytest.raises(FileNotFoundError, match="experiments.train_teacher.main"):
    main_lib.run(config, str(tmp_path / "out"))


@pytest.mark.slow  # ~30 s: trains a 2-step toy2d teacher, then the tiny run on it
def test_tiny_config_runs_on_a_trained_teacher_workdir(tmp_path):
  from experiments.train_teacher import main as teacher_main  # noqa: PLC0415
  from train_helpers import as_config, tiny  # noqa: PLC0415
  teacher_dir = tmp_path / "teacher"
  teacher_main.train(as_config(tiny(str(tmp_path / "tfds"), num_steps=2, checkpoint_every=2)),
                     str(teacher_dir))
  config = config_lib.get_config("tiny")
  name = f"workdir:{teacher_dir}"
  config.teachers = (name,)
  out = tmp_path / "out"
  summary = main_lib.run(config, str(out))
  s = summary[name]
  assert s["dpm_solver_pp_2m/learned grid"][5]["test"]["median"] > 0
  _check_distribution(s["distribution"][5])  # against disjoint training examples
  learned = json.loads((out / "workdir_teacher_dpm_solver_pp_2m_grid_nfe5.json").read_text())
  assert learned["teacher"] == name and learned["schedule"].startswith("VPCosine")  # its own
