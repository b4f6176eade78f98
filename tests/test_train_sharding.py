"""train.sharding on the 8 simulated CPU devices: the rules, and the FSDP step against the
replicated (data-parallel) one for DSM, PD, sCD (jvp), MeanFlow (jvp) and DMD2 (two players, k=5).

The replicated reference is the data-parallel step on a (8 data x 1 fsdp) mesh; the sharded runs
split every large leaf of the state and of the frozen teacher over fsdp on (2 x 4) and (1 x 8)
meshes. Ten float32 steps of Adam must agree to 1e-6 relative (per leaf, in norm), as must the
losses of every step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from diffdistill import parametrization, schedules
from diffdistill.losses import dmd2, dsm, distribution_matching as dm, meanflow, progressive, scm
from diffdistill.train import sharding, state as state_lib, step as step_lib
from diffdistill.method import Method, Update

D, H, B, NUM_STEPS = 8, 32, 16, 10
RULES = sharding.Rules(min_size=0)  # split every divisible leaf, however small (tiny nets)


def test_rules_split_the_largest_divisible_dimension_and_replicate_small_leaves():
  mesh = step_lib.make_mesh(data=2, fsdp=4)
  assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 2, "fsdp": 4}
  spec = lambda path, shape, rules=sharding.Rules(): sharding.spec_for(  # noqa: E731
      path, shape, mesh=mesh, rules=rules)
  assert spec("params/Conv_0/kernel", (3, 3, 128, 256)) == P(None, None, None, "fsdp")
  assert spec("params/Dense_0/kernel", (1024, 6)) == P("fsdp", None)
  assert spec("params/Dense_0/kernel", (4098, 6)) == P()        # nothing divisible by 4
  assert spec("params/GroupNorm_0/scale", (8192,)) == P()       # the table: replicate
  assert spec("params/Dense_0/kernel", (16, 16)) == P()         # below min_size
  assert spec("params/Dense_0/kernel", (16, 16), RULES) == P(None, "fsdp")
  tensor = step_lib.make_mesh(data=2, fsdp=2, tensor=2)
  assert sharding.spec_for("k", (64, 128), mesh=tensor, rules=RULES) == P("tensor", "fsdp")
  dp = step_lib.make_mesh()
  assert dict(dp.shape) == {"data": 8, "fsdp": 1}
  assert sharding.spec_for("k", (512, 512), mesh=dp) == P()     # data parallel: all replicated
  with pytest.raises(ValueError, match="fsdp=3 x tensor=1 must divide the device count 8"):
    step_lib.make_mesh(fsdp=3)
  with pytest.raises(ValueError, match="data=4 x fsdp=4 x tensor=1 = 16 must equal"):
    step_lib.make_mesh(data=4, fsdp=4)


def init_mlp(seed, extra=()):
  """A two-layer MLP's params: W1 [D, H], time (and extra input) rows, W2 [H, D]."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"w1": jax.random.normal(k1, (D, H)) / np.sqrt(D), "b1": jnp.zeros(H),
          "wt": jax.random.normal(k2, (1 + len(extra), H)),
          "w2": jax.random.normal(k3, (H, D)) / np.sqrt(H)}


def apply(params, x, t, **extra):
  """out = tanh(x W1 + [t, extra] Wt + b1) W2: a network of (x, t) cheap to compile."""
  cond = jnp.stack([jnp.broadcast_to(t, x.shape[:1])]
                   + [jnp.broadcast_to(v, x.shape[:1]) for _, v in sorted(extra.items())], -1)
  return jnp.tanh(x @ params["w1"] + cond @ params["wt"] + params["b1"]) @ params["w2"]


def case(name):
  """(method, {player: params}, frozen) of a tiny instance of each method family."""
  params, teacher_params = init_mlp(0), init_mlp(1)
  if name == "dsm":
    loss = dsm.dsm_loss(apply, schedule=schedules.VPCosine(), kind="v")
    return Method(name="dsm", updates=(Update(player="student", loss_fn=loss),)), \
        {"student": params}, None
  if name == "pd":
    vp = schedules.VPCosine()
    den = parametrization.as_denoiser(apply, kind="v", schedule=vp)
    return progressive.progressive_distillation(den, den, schedule=vp), {"student": params}, \
        {"teacher": teacher_params, "num_steps": jnp.int32(4)}
  if name == "scd":
    trig = schedules.TrigFlow()
    teacher = parametrization.as_denoiser(apply, kind="x0", schedule=trig)
    method = scm.scm(apply, teacher, schedule=trig, warmup_steps=5)
    return method, {"student": {"net": params, "logvar": scm.logvar_init()}}, \
        {"teacher": teacher_params}
  if name == "meanflow":
    rf = schedules.RectifiedFlow(t_max=1.0)
    teacher = parametrization.as_denoiser(apply, kind="flow", schedule=rf)
    return meanflow.meanflow(apply, teacher, schedule=rf), {"student": init_mlp(0, ("r",))}, \
        {"teacher": teacher_params}
  if name == "dmd2":
    vp = schedules.VPCosine()
    den = parametrization.as_denoiser(apply, kind="v", schedule=vp)
    generator = dm.one_step_generator(den, schedule=vp, t_init=0.9)
    method = dmd2.dmd2(generator, den, den, schedule=vp, fake_repeats=5)
    return method, {"generator": init_mlp(2), "fake_score": init_mlp(3)}, \
        {"teacher": teacher_params}
  raise ValueError(name)


def train(name, mesh, *, rules=RULES, num_steps=NUM_STEPS):
  method, params, frozen = case(name)
  players = {p: state_lib.Player.create(params=v, tx=optax.adam(1e-2), ema={"ema": 0.9})
             for p, v in params.items()}
  state = state_lib.TrainState.create(players=players, rng=jax.random.key(7))
  state_sharding = step_lib.state_sharding(jax.eval_shape(lambda: state), mesh, rules=rules)
  frozen_sharding = step_lib.state_sharding(frozen, mesh, rules=rules) if frozen else None
  step = step_lib.make_step(method, mesh=mesh, state_sharding=state_sharding,
                            frozen_sharding=frozen_sharding)
  rs = np.random.RandomState(0)
  losses = []
  for _ in range(num_steps):
    batch = step_lib.global_batch({"x": rs.randn(B, D).astype(np.float32)}, mesh=mesh)
    state, metrics = step(state, batch, frozen)
    losses.append([float(v) for k, v in sorted(metrics.items()) if k == "loss" or k.endswith("/loss")])
  return state, np.array(losses)


def relative_errors(players, ref):
  """||a - b|| / ||b|| over each player's params, each EMA and its optimizer state."""
  errs = {}
  for name, p in players.items():
    parts = {"params": p.params, "opt_state": p.opt_state, **{f"ema/{k}": v for k, v in p.ema.items()}}
    refs = {"params": ref[name].params, "opt_state": ref[name].opt_state,
            **{f"ema/{k}": v for k, v in ref[name].ema.items()}}
    for part, tree in parts.items():
      a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])
      b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(refs[part])])
      errs[f"{name}/{part}"] = np.linalg.norm(a - b) / np.linalg.norm(b)
  return errs


def check_equal(name, shapes):
  ref_state, ref_losses = train(name, step_lib.make_mesh())
  for data, fsdp in shapes:
    mesh = step_lib.make_mesh(data=data, fsdp=fsdp)
    state, losses = train(name, mesh)
    # the state really is split: every player's largest kernels live in shards
    for player in state.players.values():
      for tree in (player.params, player.opt_state[0].mu, player.ema["ema"]):
        specs = {sharding.path_name(p).split("/")[-1]: x.sharding.spec
                 for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
        assert specs["w1"] == P(None, "fsdp") and specs["w2"] == P("fsdp", None), specs
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=1e-7)
    errs = relative_errors(state.players, ref_state.players)
    assert max(errs.values()) <= 1e-6, errs
    assert int(state.step) == NUM_STEPS and int(state.num_nonfinite) == 0


# ~5-10 s each on 2 shared cores; the slow test below runs all five on both meshes
@pytest.mark.parametrize("name, shapes", [("dsm", [(2, 4)]), ("scd", [(1, 8)])])
def test_sharded_step_equals_the_replicated_one(name, shapes):
  check_equal(name, shapes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dsm", "pd", "scd", "meanflow", "dmd2"])
def test_sharded_step_equals_the_replicated_one_on_both_meshes(name):
  check_equal(name, [(2, 4), (1, 8)])


def test_a_sharded_mesh_needs_the_state_sharding():
  method, _, _ = case("dsm")
  with pytest.raises(ValueError, match="state_sharding="):
    step_lib.make_step(method, mesh=step_lib.make_mesh(fsdp=8))


def test_accumulation_that_does_not_divide_the_batch_names_both_arguments():
  method, params, _ = case("dsm")
  state = state_lib.TrainState.create(
      players={"student": state_lib.Player.create(params=params["student"], tx=optax.adam(1e-3))},
      rng=jax.random.key(0))
  mesh = step_lib.make_mesh(jax.devices()[:1])
  step = step_lib.make_step(method, mesh=mesh, accumulation_steps=3)
  batch = step_lib.global_batch({"x": np.zeros((64, D), np.float32)}, mesh=mesh)
  with pytest.raises(ValueError, match=r"batch_size=64 .* accumulation_steps=3"):
    step(state, batch)


@pytest.mark.slow
def test_tensor_axis_step_equals_the_replicated_one():
  """2 data x 2 fsdp x 2 tensor: W1 [8, 32] held as [4, 16] per device, same numbers."""
  ref_state, ref_losses = train("dsm", step_lib.make_mesh())
  state, losses = train("dsm", step_lib.make_mesh(data=2, fsdp=2, tensor=2))
  w1 = state.players["student"].params["w1"]
  assert w1.sharding.spec == P("tensor", "fsdp") and w1.addressable_shards[0].data.shape == (4, 16)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=1e-7)
  errs = relative_errors(state.players, ref_state.players)
  assert max(errs.values()) <= 1e-6, errs
