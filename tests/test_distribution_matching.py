"""Distribution matching (Diff-Instruct, DMD, SiD) on single-Gaussian data N(m, diag s^2).

The teacher is the exact denoiser (`analytic.denoiser`) and the generator is affine, G(z) = c z + e,
so p_g = N(e, diag c^2) and the optimum is |c| = s, e = m. With an EXACT fake score (the closed
form of p_g's own denoiser, in place of a trained one) every generator gradient must vanish at the
optimum, bit for bit, and point toward it elsewhere; with a trained fake score (a Gaussian
denoiser family, which can represent p_g exactly) the two-player game must reach the optimum.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffdistill import analytic, schedules
from diffdistill.losses import distribution_matching as dm
from diffdistill.losses import dmd2
from diffdistill.train import state as state_lib
from diffdistill.train import step as step_lib

M = np.array([0.5, -1.0, 2.0], np.float32)
S = np.array([0.6, 1.2, 0.9], np.float32)
SCHEDULE = schedules.VPLinear()
EXACT = analytic.denoiser(SCHEDULE)
LOSSES = {"diff_instruct": dm.diff_instruct_loss, "dmd": dm.dmd_loss, "sid": dm.sid_loss}
METHODS = {"diff_instruct": dm.diff_instruct, "dmd": dm.dmd, "sid": dm.sid}


def gaussian(mean, std):
  """N(mean, diag std^2) as a one-component mixture (the teacher's and the exact fake's params)."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return analytic.GaussianMixture(np.ones(1), mean[None], np.square(std)[None])


def affine(params, x_init, rng=None):
  del rng
  return params["c"] * x_init + params["e"]


GENERATOR = dm.Generator(sample=affine, train_sample=affine, sigma_init=1.0)  # x_init = z


def gaussian_denoiser(params, x, t):
  """The fake-score family: the exact denoiser of N(mu, diag exp(logv)), affine in x."""
  a, s = SCHEDULE.alpha(t)[:, None], SCHEDULE.sigma(t)[:, None]
  v = jnp.exp(params["logv"])
  return params["mu"] + a * v / (a * a * v + s * s) * (x - a * params["mu"])


BATCH = {"x": jnp.zeros((4096, 3), jnp.float32)}  # only its shape is read


@functools.lru_cache(maxsize=None)
def exact_fake_grad(name, fake=EXACT):
  loss_fn = LOSSES[name](GENERATOR, EXACT, fake, schedule=SCHEDULE)
  return jax.jit(jax.grad(lambda p, fake_params: loss_fn(
      p, BATCH, jax.random.key(0), teacher_params=gaussian(M, S), fake_params=fake_params)[0]))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_exact_fake_score_gradient_is_zero_at_the_optimum(name):
  grads = exact_fake_grad(name)({"c": jnp.asarray(S), "e": jnp.asarray(M)}, gaussian(M, S))
  for leaf in jax.tree.leaves(grads):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("c, e", [(1.5 * S, M + 0.3), (0.5 * S, M - 0.5), (0.7 * S, M),
                                  (S, M + np.array([0.4, -0.4, 0.2], np.float32))])
def test_exact_fake_score_gradient_points_to_the_optimum(name, c, e):
  """-grad . (theta - theta*) < 0, and not by a sliver: cosine with the way home > 0.3."""
  grads = exact_fake_grad(name)({"c": jnp.asarray(c), "e": jnp.asarray(e)}, gaussian(e, c))
  g = np.concatenate([np.asarray(grads["c"]), np.asarray(grads["e"])])
  away = np.concatenate([c - S, e - M])
  cosine = -g @ away / (np.linalg.norm(g) * np.linalg.norm(away))
  assert cosine < -0.3, cosine


def _probe(params, x, t):
  """The exact denoiser of params = (mixture, k), with k I added to its Jacobian in x but not to
  its value: only a gradient that flows THROUGH the network's input sees k."""
  mix, k = params
  return EXACT(mix, x, t) + k * (x - jax.lax.stop_gradient(x))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_only_sid_differentiates_through_the_score_networks_inputs(name):
  """SiD's gradient flows through both networks' inputs x_t; Diff-Instruct's and DMD's does not."""
  loss_fn = LOSSES[name](GENERATOR, _probe, _probe, schedule=SCHEDULE)
  params = {"c": jnp.asarray(0.7 * S), "e": jnp.asarray(M + 0.3)}
  fake = gaussian(params["e"], params["c"])
  grad = jax.jit(lambda k_teacher, k_fake: jax.grad(lambda p: loss_fn(
      p, BATCH, jax.random.key(0), teacher_params=(gaussian(M, S), k_teacher),
      fake_params=(fake, k_fake))[0])(params))
  flat = lambda g: np.concatenate([np.asarray(v) for v in jax.tree.leaves(g)])  # noqa: E731
  g0 = flat(grad(0.0, 0.0))
  for k_teacher, k_fake in ((0.7, 0.0), (0.0, 0.7)):
    change = np.linalg.norm(flat(grad(k_teacher, k_fake)) - g0) / np.linalg.norm(g0)
    if name == "sid":
      assert change > 0.05, (k_teacher, k_fake, change)
    else:
      assert change < 1e-6, (k_teacher, k_fake, change)


def _train(name, *, num_steps=1000, batch_size=128, fake_repeats=5):
  method = METHODS[name](GENERATOR, EXACT, gaussian_denoiser, schedule=SCHEDULE,
                         fake_repeats=fake_repeats)
  players = {
      "generator": state_lib.Player.create(
          params={"c": jnp.ones(3), "e": jnp.zeros(3)},
          tx=optax.adam(optax.cosine_decay_schedule(1e-2, num_steps, 0.01))),
      "fake_score": state_lib.Player.create(
          params={"mu": jnp.zeros(3), "logv": jnp.zeros(3)},  # the generator's start N(0, I)
          tx=optax.adam(optax.cosine_decay_schedule(5e-2, num_steps, 0.2)))}
  state = state_lib.TrainState.create(players=players, rng=jax.random.key(1))
  mesh = step_lib.make_mesh(jax.devices()[:1])
  step = step_lib.make_step(method, mesh=mesh)
  batch = step_lib.global_batch({"x": np.zeros((batch_size, 3), np.float32)}, mesh=mesh)

  @jax.jit
  def run(state, batch, frozen):  # the engine's jitted step, scanned: one compile, no host loop
    def body(state, _):
      state, metrics = step.jitted(state, batch, frozen)
      return state, metrics["num_nonfinite"]
    return jax.lax.scan(body, state, None, length=num_steps)

  state, nonfinite = run(jax.device_put(state, step_lib.replicated(mesh)), batch,
                         {"teacher": gaussian(M, S)})
  return jax.device_get(state.players), int(nonfinite[-1])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_player_training_reaches_the_data_gaussian(name):
  players, nonfinite = _train(name)
  p = players["generator"].params
  assert nonfinite == 0
  np.testing.assert_allclose(np.abs(p["c"]), S, rtol=1e-2)
  np.testing.assert_allclose(p["e"], M, rtol=1e-2)
  # the fake score ends on the generator's own Gaussian
  np.testing.assert_allclose(np.exp(0.5 * players["fake_score"].params["logv"]), np.abs(p["c"]),
                             rtol=6e-2)


def test_dmd2_ttur_and_gan_head_on_the_fake_score_features():
  """k = 5 fake-score updates per generator update; the head reads the FAKE network's features,
  and the generator's GAN gradient reaches G through them (not through the teacher)."""
  features = lambda fake_params, x_t, t: gaussian_denoiser(fake_params, x_t, t)  # noqa: E731
  method = dmd2.dmd2(GENERATOR, EXACT, gaussian_denoiser, schedule=SCHEDULE, features=features,
                     gan_weight=0.5)
  by_player = {u.player: u for u in method.updates}
  assert [u.player for u in method.updates] == ["fake_score", "discriminator", "generator"]
  assert by_player["fake_score"].repeats == 5
  assert by_player["discriminator"].inputs["fake_params"] == "players/fake_score/params"
  assert by_player["generator"].inputs["fake_params"] == "players/fake_score/params"

  params = {"c": jnp.asarray(0.7 * S), "e": jnp.asarray(M + 0.3)}
  fake_params = {"mu": jnp.asarray(M + 0.3), "logv": jnp.log(jnp.asarray(0.7 * S) ** 2)}
  head = {"w": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.zeros(())}
  gen_loss = by_player["generator"].loss_fn

  @jax.jit
  def grad(teacher, fake, head):
    return jax.grad(lambda p: gen_loss(p, BATCH, jax.random.key(0), teacher_params=teacher,
                                       fake_params=fake, discriminator_params=head)[0])(params)

  flat = lambda g: np.concatenate([np.asarray(v) for v in jax.tree.leaves(g)])  # noqa: E731
  plain = flat(grad(gaussian(M, S), fake_params, jax.tree.map(jnp.zeros_like, head)))
  gan = flat(grad(gaussian(M, S), fake_params, head)) - plain
  assert np.linalg.norm(gan) > 1e-2 * np.linalg.norm(plain)
  # the GAN part does not change when the fake network's weights stay and the teacher moves
  moved = flat(grad(gaussian(M + 1.0, S), fake_params, head)) - flat(
      grad(gaussian(M + 1.0, S), fake_params, jax.tree.map(jnp.zeros_like, head)))
  np.testing.assert_allclose(moved, gan, rtol=1e-4, atol=1e-7)

  disc_loss = by_player["discriminator"].loss_fn
  batch = {"x": np.asarray(analytic.sample(gaussian(M, S), jax.random.key(3), 512))}
  (loss, aux), g = jax.value_and_grad(disc_loss, has_aux=True)(
      dmd2.init_linear_head(3), batch, jax.random.key(1), generator_params=params,
      fake_params=fake_params)
  np.testing.assert_allclose(loss, 2 * np.log(2), rtol=1e-6)  # a zero head: both logits 0
  assert np.isfinite(np.linalg.norm(g["w"])) and np.linalg.norm(g["w"]) > 0
  assert set(aux) >= {"real_logit", "fake_logit", "accuracy", "nonfinite"}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dmd2_ring2d,tiny", "dmd_ring2d,tiny"])
def test_recipe_smoke(tmp_path, variant):
  """The README's commands in their tiny form: the copy stage, the game (DMD2 with its GAN head;
  DMD with teacher pairs), evaluation; the generator's sliced W2 is logged."""
  import json  # noqa: PLC0415

  from experiments.distill import config as config_lib, main  # noqa: PLC0415
  out = main.run(config_lib.get_config(variant), str(tmp_path))
  row = next(r for r in out["rows"] if r["method"].endswith("generator"))
  assert row["nfe"] == 1 and np.isfinite(row["sliced_w2"]) and not row["nan"]
  assert 0 <= row["mode_cov_error_floor"] and np.isfinite(row["mode_cov_error"])
  teacher_nfes = {r["nfe"] for r in out["rows"] if r["method"] == "teacher ddim"}
  assert teacher_nfes == {1, *config_lib.get_config(variant).eval.teacher_nfes} and len(teacher_nfes) > 1
  with open(tmp_path / "dm" / "metrics.jsonl") as f:
    last = json.loads(f.read().strip().splitlines()[-1])
  assert last["generator/sliced_w2"] > 0 and last["num_nonfinite"] == 0
  assert {"fake_score/loss", "generator/loss", "fake_score/grad_norm",
          "generator/grad_norm"} <= set(last)


def test_multi_step_generator_backward_simulation():
  """DMD2's k-step generator: sample() runs x_{i+1} = alpha_{i+1} D(x_i, t_i) + sigma_{i+1} eps_i
  and outputs D(x_{k-1}, t_{k-1}); train_sample() gives each example D(x_i, t_i) at a drawn step
  i, with x_i from the generator's own (stop-gradient) earlier steps, so the gradient reaches
  only the last call."""
  times = (0.9, 0.6, 0.3)
  denoise = lambda p, x, t: p["a"] * x + p["b"] * t[:, None]  # noqa: E731
  gen = dm.multi_step_generator(denoise, schedule=SCHEDULE, times=times)
  params = {"a": jnp.asarray(0.7), "b": jnp.asarray(0.2)}
  x_init = gen.noise(jax.random.key(0), jnp.zeros((64, 3)))
  assert gen.sigma_init == pytest.approx(float(SCHEDULE.sigma(jnp.float32(0.9))))
  rng = jax.random.key(1)

  def by_hand(p, rng):  # every level's input, the same noise keys
    xs, x = [], x_init
    for i, t in enumerate(times):
      xs.append(x)
      x0 = denoise(p, x, jnp.full((64,), t))
      nxt = times[min(i + 1, len(times) - 1)]
      x = SCHEDULE.alpha(nxt) * x0 + SCHEDULE.sigma(nxt) * jax.random.normal(jax.random.fold_in(rng, i), x.shape)
    return xs, x0

  xs, last = by_hand(params, rng)
  np.testing.assert_allclose(gen.sample(params, x_init, rng), last, rtol=1e-5, atol=1e-6)
  i_rng, s_rng = jax.random.split(rng)
  i = np.asarray(jax.random.randint(i_rng, (64,), 0, 3))
  assert set(i) == {0, 1, 2}
  xs, _ = by_hand(params, s_rng)
  want = np.stack([np.asarray(denoise(params, xs[k], jnp.full((64,), times[k])))[j]
                   for j, k in enumerate(i)])
  np.testing.assert_allclose(gen.train_sample(params, x_init, rng), want, rtol=1e-5, atol=1e-6)
  # d/db of sum(train_sample) = sum over examples of t_i * d (only the last call is differentiated)
  g = jax.grad(lambda p: jnp.sum(gen.train_sample(p, x_init, rng)))(params)
  np.testing.assert_allclose(g["b"], 3 * np.sum(np.asarray(times)[i]), rtol=1e-5)
  with pytest.raises(ValueError, match="decreasing"):
    dm.multi_step_generator(denoise, schedule=SCHEDULE, times=(0.3, 0.6))


def test_recipe_with_a_multi_step_generator_wires_and_samples():
  from experiments.distill import config as config_lib, main, setup as setup_lib  # noqa: PLC0415
  config = config_lib.get_config("dmd2_ring2d,tiny")
  config.dm.generator_steps = 3
  setup = setup_lib.make_setup(config)
  plan = main.build_plan(config, setup)
  copy = plan.stages[0].players({})["student"].params
  results = {"copy": {"student": copy}}
  players = plan.stages[-1].players(results)
  plan.stages[-1].method.check(players, plan.stages[-1].frozen(results))
  results["dm"] = {"generator": players["generator"].params}
  student = next(s for s in plan.students if s.name == "dmd2 generator")
  assert student.nfe == 3
  x = setup.start_noise(jax.random.key(0), 16)
  out = jax.jit(student.run)(student.params(results), x)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  config.dm.generator_steps = 0
  with pytest.raises(ValueError, match="generator_steps must be an integer >= 1"):
    main.build_plan(config, setup)


@pytest.mark.parametrize("name", ["sds", "vsd"])
def test_particle_recipes_wire_and_their_samples_are_the_particles(name):
  from experiments.distill import config as config_lib, main, setup as setup_lib  # noqa: PLC0415
  config = config_lib.get_config(f"{name}_ring2d,tiny")
  setup = setup_lib.make_setup(config)
  config.eval.copy_rows = True  # (tiny turns them off) no copy row at NFE 0: it has no sampler
  plan = main.build_plan(config, setup)
  assert [s.name for s in plan.stages] == (["dm"] if name == "sds" else ["copy", "dm"])
  assert all(s.nfe > 0 for s in plan.students if s.name.startswith("network copy"))
  results = {}
  if name == "vsd":
    results["copy"] = {"student": plan.stages[0].players({})["student"].params}
  players = plan.stages[-1].players(results)
  assert set(players) == ({"particles"} if name == "sds" else {"particles", "variational"})
  assert players["particles"].params.shape == (config.eval.num_samples, 2)
  plan.stages[-1].method.check(players, plan.stages[-1].frozen(results))
  student = next(s for s in plan.students if s.name == f"{name} particles")
  assert student.nfe == 0
  results["dm"] = {"particles": players["particles"].params}
  out = student.run(student.params(results), setup.start_noise(jax.random.key(0), config.eval.num_samples))
  np.testing.assert_array_equal(out, players["particles"].params)


# -- class-conditional distillation: every network of the game reads the batch's labels --------
# Networks that ignore x and return a per-label constant: G(z, k) = c_g[k], D_d(., k) = m[k],
# D_f(., k) = c_f[k]. Each loss's gradient (value, for SiD) is then closed-form per label, and
# wrong with a dropped or shuffled label anywhere (the null label K gives other constants).
K, D_LAB = 3, 5


def _per_label(table_key):
  return lambda params, x, t, label=None: params[table_key][label] + 0.0 * x


def _labelled():
  r = np.random.default_rng(0)
  m = jnp.asarray(r.standard_normal((K + 1, D_LAB)), jnp.float32)
  gp = {"c": jnp.asarray(r.standard_normal((K + 1, D_LAB)), jnp.float32)}
  fp = {"c": jnp.asarray(r.standard_normal((K + 1, D_LAB)), jnp.float32)}
  labels = jnp.array([0, 2, 2, 1, 2, 0])
  batch = {"x": jnp.zeros((labels.shape[0], D_LAB)), "label": labels}
  counts = np.bincount(np.asarray(labels), minlength=K + 1)[:, None]
  return m, gp, fp, batch, counts


@pytest.mark.parametrize("steps", [1, 3])
def test_the_game_routes_labels_to_generator_teacher_and_fake_score(steps):
  sch = schedules.VPLinear()
  m, gp, fp, batch, n = _labelled()
  b = batch["x"].shape[0]
  gen = (dm.one_step_generator(_per_label("c"), schedule=sch) if steps == 1 else
         dm.multi_step_generator(_per_label("c"), schedule=sch, times=[0.9, 0.6, 0.3]))
  teacher = lambda params, x, t, label=None: m[label] + 0.0 * x  # noqa: E731
  fake = _per_label("c")
  rng = jax.random.key(0)
  x_init = gen.noise(rng, batch["x"])
  np.testing.assert_allclose(gen.sample(gp, x_init, rng, label=batch["label"]),
                             gp["c"][batch["label"]], rtol=1e-6)
  kw = dict(teacher_params=None, fake_params=fp)
  c_g, c_f = np.asarray(gp["c"]), np.asarray(fp["c"])
  grad = jax.grad(lambda p: dm.diff_instruct_loss(gen, teacher, fake, schedule=sch)(
      p, batch, rng, **kw)[0])(gp)["c"]
  np.testing.assert_allclose(grad, n * (c_f - m) / (D_LAB * b), rtol=1e-5, atol=1e-7)
  grad = jax.grad(lambda p: dm.dmd_loss(gen, teacher, fake, schedule=sch)(
      p, batch, rng, **kw)[0])(gp)["c"]
  norm = np.abs(c_g - m).mean(1, keepdims=True) + 1e-6
  np.testing.assert_allclose(grad, n * (c_f - m) / norm / (D_LAB * b), rtol=1e-5, atol=1e-7)
  value = dm.sid_loss(gen, teacher, fake, schedule=sch, alpha=1.2)(gp, batch, rng, **kw)[0]
  lab = np.asarray(batch["label"])
  diff = m[lab] - c_f[lab]
  per = (-0.2 * diff ** 2 + diff * (c_f[lab] - c_g[lab])).mean(1) / norm[lab, 0]
  np.testing.assert_allclose(value, per.mean(), rtol=1e-5)
  grad = jax.grad(lambda p: dm.fake_score_loss(gen, fake, schedule=sch)(
      p, batch, rng, generator_params=gp)[0])(fp)["c"]
  np.testing.assert_allclose(grad, n * 2 * (c_f - c_g) / (D_LAB * b), rtol=1e-5, atol=1e-7)


def test_dmd2s_discriminator_and_gan_term_read_the_labels():
  """Features = one-hot(label): the head's logit is w[label] + b for real and fake alike."""
  sch = schedules.VPLinear()
  m, gp, fp, batch, n = _labelled()
  gen = dm.one_step_generator(_per_label("c"), schedule=sch)
  features = lambda params, x_t, t, label=None: jax.nn.one_hot(label, K + 1)  # noqa: E731
  head = {"w": jnp.array([0.3, -0.5, 1.1, 2.0]), "b": jnp.array(0.2)}
  logit = np.asarray(head["w"])[np.asarray(batch["label"])] + 0.2
  disc = dmd2.discriminator_loss(gen, features, schedule=sch)
  value = disc(head, batch, jax.random.key(1), generator_params=gp, fake_params=fp)[0]
  softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
  np.testing.assert_allclose(value, np.mean(softplus(-logit) + softplus(logit)), rtol=1e-6)
  teacher = lambda params, x, t, label=None: m[label] + 0.0 * x  # noqa: E731
  loss = dmd2.generator_loss(gen, teacher, _per_label("c"), schedule=sch, features=features,
                             gan_weight=1.0)
  _, aux = loss(gp, batch, jax.random.key(2), teacher_params=None, fake_params=fp,
                discriminator_params=head)
  np.testing.assert_allclose(aux["gan"], np.mean(softplus(-logit)), rtol=1e-6)
