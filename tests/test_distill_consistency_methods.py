"""The consistency methods in experiments/distill: every variant wires, its students run with their
NFE, and (slow) `cd_ring2d,tiny` and `ctm_ring2d,tiny` run end to end as their README commands do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import methods
from experiments.distill import config as config_lib, main, setup as setup_lib

CONSISTENCY = ("cd", "ct", "ict", "ect", "scd", "meanflow", "shortcut", "ctm")

# ct, ict and ect share cd's wiring (one player, consistency students), shortcut meanflow's (a flow
# student with one extra input on the rectified-flow teacher): slow
METHODS = [pytest.param(m, marks=pytest.mark.slow) if m in ("ct", "ict", "ect", "shortcut") else m
           for m in CONSISTENCY]


@pytest.mark.parametrize("method", METHODS)
def test_recipe_builds_and_students_run(method):
  config = config_lib.get_config(f"{method}_ring2d,tiny")
  assert config.method == method and method in methods.names()
  setup = setup_lib.make_setup(config)
  plan = main.build_plan(config, setup)
  assert plan.stages[0].name == "copy" and plan.stages[-1].name == method
  assert sorted(s.nfe for s in plan.students) == [1, 2]
  copy = plan.stages[0].players({})["student"].params
  results = {"copy": {"student": copy}}
  players = plan.stages[-1].players(results)
  # the method's update reads what the players and frozen inputs provide
  plan.stages[-1].method.check(players, plan.stages[-1].frozen(results))
  results[method] = {"student": players["student"].params}
  x = setup.start_noise(jax.random.key(0), 16)
  for student in plan.students:
    out = jax.jit(student.run)(student.params(results), x)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.slow
def test_cd_tiny_runs_end_to_end(tmp_path):
  out = main.run(config_lib.get_config("cd_ring2d,tiny"), str(tmp_path))
  rows = {(r["method"], r["nfe"]): r for r in out["rows"]}
  assert ("cd", 1) in rows and ("cd", 2) in rows
  assert np.isfinite(rows[("cd", 1)]["median"])


@pytest.mark.slow
def test_ctm_tiny_runs_end_to_end(tmp_path):
  """With its GAN term on: a discriminator player on the frozen copy's features."""
  import json  # noqa: PLC0415
  config = config_lib.get_config("ctm_ring2d,tiny")
  config.ctm.gan_weight = 0.1
  out = main.run(config, str(tmp_path))
  rows = {(r["method"], r["nfe"]): r for r in out["rows"]}
  assert ("ctm", 1) in rows and ("ctm", 2) in rows
  assert np.isfinite(rows[("ctm", 1)]["median"]) and np.isfinite(rows[("ctm", 2)]["median"])
  with open(tmp_path / "ctm" / "metrics.jsonl") as f:
    last = json.loads(f.read().strip().splitlines()[-1])
  assert last["student/gan"] > 0 and {"discriminator/loss", "discriminator/accuracy"} <= set(last)


def test_ctm_gan_wiring():
  config = config_lib.get_config("ctm_ring2d,tiny")
  config.ctm.gan_weight = 0.1
  setup = setup_lib.make_setup(config)
  plan = main.build_plan(config, setup)
  copy = plan.stages[0].players({})["student"].params
  stage = plan.stages[-1]
  players = stage.players({"copy": {"student": copy}})
  frozen = stage.frozen({"copy": {"student": copy}})
  assert set(players) == {"student", "discriminator"} and frozen["features"] is copy
  stage.method.check(players, frozen)
