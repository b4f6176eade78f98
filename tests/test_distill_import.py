"""experiments/distill on an imported checkpoint (`--config.teacher.kind=import`, the `import`
testbed): a random-weight diffusers DiT folder written here (no torch, no download) is the
teacher; its students start from its weights and train on its own samples.

The EDM-format snapshot's run is in test_interop_edm.py (it needs torch to write the pickle)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from diffdistill.interop import dit as interop_dit
from diffdistill.methods import _common
from experiments import teachers
from experiments.distill import config as config_lib, main as main_lib, setup as setup_lib

DIT = dict(_class_name="DiTTransformer2DModel", num_attention_heads=2, attention_head_dim=8,
           in_channels=4, out_channels=8, num_layers=2, sample_size=8, patch_size=2,
           num_embeds_ada_norm=5)


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("dit")
  rng = np.random.default_rng(0)
  leaves = interop_dit.diffusers_leaves(dict(DIT, norm_eps=1e-5), tied=False)
  save_file({k: (0.1 * rng.standard_normal(s)).astype(np.float32)
             for leaf in leaves for k, s in zip(leaf.keys, leaf.shapes)},
            str(folder / "diffusion_pytorch_model.safetensors"))
  (folder / "config.json").write_text(json.dumps(DIT))
  return str(folder)


def _config(method, path, **over):
  config = config_lib.get_config(f"{method}_import,tiny")
  config.teacher.path = path
  for k, v in over.items():
    config.teacher[k] = v
  return config


@pytest.mark.parametrize("label", [-1, 2])
def test_the_student_at_the_teachers_weights_is_the_teacher(dit_folder, label):
  """The student network (`nets.Net` with the checkpoint's own function, `net_apply`) at the
  teacher's params is the teacher's denoiser: its time convention (1000 t - 1), its first C of 2C
  channels and the fixed label all carried over."""
  setup = setup_lib.make_setup(_config("cd", dit_folder, label=label))
  teacher = setup.teacher
  assert teacher.example_shape == (8, 8, 4) and teacher.num_classes == 0
  assert teacher.name.endswith("(null class)" if label < 0 else "(class 2)")
  net = _common.student_net(setup.config, setup)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 4))
  t = jnp.array([0.05, 0.5, 0.95])
  want = teacher.apply(teacher.params, x, t)
  np.testing.assert_allclose(net.denoise(teacher.params, x, t), want, rtol=1e-6, atol=1e-6)
  other = teachers.load(kind="import", path=dit_folder, label=0 if label < 0 else 5)
  assert float(jnp.max(jnp.abs(other.apply(other.params, x, t) - want))) > 1e-3  # the label matters


def test_import_refusals_name_the_cause(dit_folder, tmp_path):
  with pytest.raises(ValueError, match="meanflow's student takes r as an input besides"):
    setup_lib.make_setup(_config("meanflow", dit_folder))
  with pytest.raises(ValueError, match=r"label must be in \[0, 5\]"):
    teachers.load(kind="import", path=dit_folder, label=6)
  with pytest.raises(ValueError, match="needs path="):
    teachers.load(kind="import")
  with pytest.raises(ValueError, match="brings its own schedule"):
    teachers.load(kind="import", path=dit_folder, schedule=setup_lib.schedules_lib.VPLinear())


@pytest.mark.parametrize("method,schedule", [("scd", "trigflow"), ("reflow", "rectified_flow")])
def test_a_student_on_another_schedule_starts_from_the_checkpoint_as_the_teacher(
    dit_folder, method, schedule):
  """sCD's TrigFlow and reflow's rectified flow: the imported DiT (VP-discrete, eps) keeps its
  weights behind the exact change of schedule; at those weights the student's denoiser is the
  teacher's at the same logSNR (x scaled to the VP state), and its raw output is a flow."""
  setup = setup_lib.make_setup(_config(method, dit_folder))
  teacher = setup.teacher
  assert teacher.schedule.name.startswith(schedule) and teacher.kind == "flow"
  net = _common.student_net(setup.config, setup)
  assert net.schedule == teacher.schedule and net.kind == "flow"
  own = teachers.load(kind="import", path=dit_folder)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 4))
  t = jnp.array([0.2, 0.5, 0.8]) * float(teacher.schedule.t_max)
  s = teacher.schedule
  lam = s.logsnr(t)
  u = own.schedule.t_from_logsnr(lam)  # the VP time of the same noise level
  k = (own.schedule.alpha(u) / s.alpha(t))[:, None, None, None]
  want = own.apply(own.params, k * x, u)
  np.testing.assert_allclose(net.denoise(teacher.params, x, t), want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(teacher.apply(teacher.params, x, t), want, rtol=2e-5, atol=2e-5)


# slow (42 s, the default suite's slowest). Its parts stay covered in CI: the latent teacher's
# test below runs CD on an imported DiT end to end (on a dataset's latents), the conditional
# teacher's test without a dataset checks the teacher's-own-samples data path, and the torch
# suite's test_interop_edm.py::test_an_edm_snapshot_is_distilled_end_to_end[EDMPrecond] distils
# an unconditional import on its own samples end to end.
@pytest.mark.slow
def test_cd_distils_an_imported_dit_on_its_own_samples(dit_folder, tmp_path):
  out = main_lib.run(_config("cd", dit_folder), str(tmp_path))
  students = [r for r in out["rows"] if r["method"] == "cd"]
  assert [r["nfe"] for r in students] == [1, 2]
  assert all(np.isfinite(r["median"]) and not r["nan"] for r in out["rows"])
  f = np.load(tmp_path / "samples" / "cd_nfe1.npz")
  assert f["samples"].shape == (128, 8, 8, 4)
  # the data were the teacher's own samples: 128 pairs of DPM-Solver++(2M) at 4 calls (tiny)
  assert (tmp_path / "teacher_samples" / "chunks").is_dir()
  assert out["teacher"] == f"dit:{dit_folder.rstrip('/').rsplit('/', 1)[-1]} (null class)"


# A latent teacher: a DiT on 4x4x4 latents of a VAE that encodes 8x8 grayscale images (digits8,
# embedded: no download), both random and written here.
LATENT_DIT = dict(DIT, sample_size=4)
VAE = dict(_class_name="AutoencoderKL", block_out_channels=[4, 8], layers_per_block=1,
           norm_num_groups=2, latent_channels=4, in_channels=1, out_channels=1,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def _write_folder(folder, config, leaves, seed=0):
  rng = np.random.default_rng(seed)
  save_file({k: (0.1 * rng.standard_normal(s)).astype(np.float32)
             for leaf in leaves for k, s in zip(leaf.keys, leaf.shapes)},
            str(folder / "diffusion_pytorch_model.safetensors"))
  (folder / "config.json").write_text(json.dumps(config))
  return str(folder)


@pytest.fixture(scope="module")
def latent_teacher(tmp_path_factory):
  from diffdistill.interop import vae as interop_vae
  dit = _write_folder(tmp_path_factory.mktemp("latent_dit"), LATENT_DIT,
                      interop_dit.diffusers_leaves(dict(LATENT_DIT, norm_eps=1e-5), tied=False))
  vae = _write_folder(tmp_path_factory.mktemp("vae"), VAE,
                      interop_vae.vae_leaves(dict(interop_vae._DEFAULTS, **VAE)), seed=1)
  return dit, vae


def _latent_config(method, latent_teacher, **over):
  config = _config(method, latent_teacher[0], vae=latent_teacher[1], dataset="digits8")
  for k, v in over.items():
    config.eval.fid[k] = v
  return config


def test_a_latent_teachers_data_are_encoded_images_drawn_per_step(latent_teacher):
  """With teacher.vae and a dataset, a batch is the VAE's posterior draw of the dataset's images
  (to_latent with key fold_in(seed, step)), and a resumed source draws the same."""
  setup = setup_lib.make_setup(_latent_config("cd", latent_teacher))
  assert setup.latent and setup.vae.info["downsampling"] == 2
  data = setup.data(seed=3, batch_size=8)
  first, second = next(data), next(data)
  images = setup_lib.data_lib.Keys(setup_lib.data_lib.get_dataset(
      "digits8", split="train", batch_size=8, seed=3, prefetch=0), ("x",))
  x0, x1 = next(images)["x"], next(images)["x"]
  vae = setup.vae
  want = vae.to_latent(vae.params, jnp.asarray(x1), jax.random.fold_in(jax.random.key(3), 1))
  assert second["x"].shape == (8, 4, 4, 4)
  np.testing.assert_allclose(second["x"], want, rtol=1e-5, atol=1e-6)
  mean = vae.to_latent(vae.params, jnp.asarray(x0))
  assert float(np.max(np.abs(first["x"] - mean))) > 1e-3  # a posterior draw, not the mean
  state = data.get_state()
  third = next(data)
  data.set_state(state)
  np.testing.assert_array_equal(next(data)["x"], third["x"])


def test_a_latent_teacher_is_distilled_and_its_students_samples_decoded(latent_teacher, tmp_path):
  out = main_lib.run(_latent_config("cd", latent_teacher), str(tmp_path))
  assert all(np.isfinite(r["median"]) and not r["nan"] for r in out["rows"])
  with np.load(tmp_path / "samples" / "cd_nfe1.npz") as f:
    latents, images = f["samples"], f["images"]
  assert latents.shape == (128, 4, 4, 4) and images.shape == (128, 8, 8, 1)
  setup = setup_lib.make_setup(_latent_config("cd", latent_teacher))
  decoded = setup.vae.from_latent(setup.vae.params, jnp.asarray(latents[:8]))
  np.testing.assert_allclose(images[:8], np.clip(decoded, -1, 1), rtol=1e-5, atol=1e-6)
  assert (tmp_path / "samples" / "cd_nfe1.png").is_file() and (tmp_path / "samples.png").is_file()
  from experiments.evaluate import main as evaluate_main
  assert evaluate_main.read_images(str(tmp_path / "samples" / "cd_nfe1.npz")).shape == (
      128, 8, 8, 3)  # the decoded images, as RGB


def test_latent_and_fid_refusals_name_the_cause(latent_teacher, dit_folder, tmp_path):
  dit, vae = latent_teacher
  config = config_lib.get_config("cd_gmm64,tiny")
  config.teacher.vae = vae
  with pytest.raises(ValueError, match="teacher.vae is for an imported latent teacher"):
    setup_lib.make_setup(config)
  with pytest.raises(ValueError, match="has 4 latent channels.*takes inputs of shape"):
    setup_lib.make_setup(_config("cd", _write_folder(
        tmp_path, dict(LATENT_DIT, in_channels=3, out_channels=6), interop_dit.diffusers_leaves(
            dict(LATENT_DIT, in_channels=3, out_channels=6, norm_eps=1e-5), tied=False)), vae=vae))
  with pytest.raises(ValueError, match="is not an autoencoder"):
    setup_lib.make_setup(_config("cd", dit, vae=dit))
  config = _latent_config("cd", latent_teacher, reference=str(tmp_path / "ref.npz"))
  with pytest.raises(ValueError, match="config.eval.fid.inception is empty"):
    main_lib.run(config, str(tmp_path / "run"))
  config = _latent_config("cd", latent_teacher, reference=str(tmp_path / "ref.npz"),
                          inception=dit)
  with pytest.raises(FileNotFoundError, match=r"config.eval.fid.reference=.*does not exist"):
    main_lib.run(config, str(tmp_path / "run"))
  np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  config = config_lib.get_config("cd_gmm64,tiny")
  config.eval.fid.update(reference=str(tmp_path / "ref.npz"), inception=dit)
  with pytest.raises(ValueError, match=r"FID scores images; the teacher's samples have shape \(64,\)"):
    main_lib.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # refused before anything was written


# Inception-v3 compiles for minutes on 2 loaded cores (8 simulated devices): slow.
@pytest.mark.slow
def test_students_fid_is_the_frechet_distance_of_their_decoded_uint8_images(latent_teacher,
                                                                             tmp_path,
                                                                             monkeypatch):
  """eval.fid: every student row gets FID of fid.num_samples fresh samples, decoded by the VAE and
  quantised to uint8; FIDScorer equals the distance recomputed from the features of the same
  images with np.cov (random Inception weights, random reference statistics)."""
  from diffdistill import metrics
  from diffdistill.nets import inception as inception_net
  from experiments.distill import evaluation
  from tests.test_evaluate import _random_weights
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "inception.npz",
           **inception_net.state_dict_from_variables(_random_weights(rng)))
  mu_ref, a = rng.normal(size=2048), rng.normal(size=(2048, 64))
  np.savez(tmp_path / "ref.npz", mu=mu_ref, sigma=a @ a.T / 64 + 0.1 * np.eye(2048))
  config = _latent_config("cd", latent_teacher, reference=str(tmp_path / "ref.npz"),
                          inception=str(tmp_path / "inception.npz"), num_samples=6,
                          batch_size=4)
  setup = setup_lib.make_setup(config)
  scorer = evaluation.FIDScorer(setup)
  seen, real_outputs = [], evaluation.inception_eval.inception_outputs

  def outputs(variables, images, **kw):  # records what reaches the network
    seen.append(np.asarray(images))
    return real_outputs(variables, images, **kw)
  monkeypatch.setattr(evaluation.inception_eval, "inception_outputs", outputs)
  latents = jax.random.normal(jax.random.key(5), (6, 4, 4, 4))
  calls = []

  def run(params, x, rng):  # a "student" whose batches are the rows of `latents`
    del params, rng
    calls.append(len(x))
    return latents[sum(calls[:-1]):sum(calls)]
  got = scorer(run, None, progress=False)
  assert calls == [4, 2] and got["fid_num_samples"] == 6
  images = evaluation.to_uint8(setup.decode(latents))
  assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
  np.testing.assert_array_equal(np.concatenate(seen), np.repeat(images, 3, axis=-1))
  pool3 = np.asarray(inception_net.inception_features(
      scorer.variables, np.repeat(images, 3, axis=-1))[0], np.float64)
  want = metrics.frechet_distance_float64(pool3.mean(0), np.cov(pool3, rowvar=False), mu_ref,
                                          np.load(tmp_path / "ref.npz")["sigma"])
  assert got["fid"] == pytest.approx(want, rel=1e-4)
  out = main_lib.run(config, str(tmp_path / "run"))
  rows = [r for r in out["rows"] if r["method"] == "cd"]
  assert [r["fid_num_samples"] for r in rows] == [6, 6]
  assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in rows)
  assert "fid" not in next(r for r in out["rows"] if r["method"] == "teacher ddim")


def test_to_uint8_quantises_as_the_papers_samplers_do():
  """EDM's generate.py: (x * 127.5 + 128).clip(0, 255) truncated to uint8."""
  from experiments.distill import evaluation
  x = np.array([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(evaluation.to_uint8(x), [0, 0, 64, 128, 255, 255, 255])


@pytest.mark.slow
def test_scd_distils_an_imported_dit_on_trigflow(dit_folder, tmp_path):
  """sCD's tangent (a jvp in t through the change of schedule and the DiT's attention) trains
  the checkpoint's weights; its students sample."""
  out = main_lib.run(_config("scd", dit_folder), str(tmp_path))
  students = [r for r in out["rows"] if r["method"] == "scd"]
  assert [r["nfe"] for r in students] == [1, 2]
  assert all(np.isfinite(r["median"]) and not r["nan"] for r in out["rows"])
  assert "on trigflow" in out["teacher"]


# A class-conditional latent teacher over all its labels: a 10-class DiT on the VAE's latents of
# digits8, whose labels the data carry.
COND_DIT = dict(LATENT_DIT, num_embeds_ada_norm=10)


@pytest.fixture(scope="module")
def conditional_teacher(tmp_path_factory, latent_teacher):
  dit = _write_folder(tmp_path_factory.mktemp("cond_dit"), COND_DIT,
                      interop_dit.diffusers_leaves(dict(COND_DIT, norm_eps=1e-5), tied=False))
  return dit, latent_teacher[1]


def _conditional_config(method, teacher):
  config = _config(method, teacher[0], vae=teacher[1], dataset="digits8", conditional=True)
  return config


def test_a_conditional_teacher_keeps_its_labels_in_the_data_the_student_and_the_samplers(
    conditional_teacher):
  setup = setup_lib.make_setup(_conditional_config("cd", conditional_teacher))
  teacher = setup.teacher
  assert setup.conditional and teacher.num_classes == 10 and "all 10 classes" in teacher.name
  batch = next(setup.data(seed=0, batch_size=8))
  assert set(batch) == {"x", "label"} and batch["x"].shape == (8, 4, 4, 4)
  net = _common.student_net(setup.config, setup)
  x = jax.random.normal(jax.random.key(0), (4, 4, 4, 4))
  t = jnp.array([0.1, 0.4, 0.6, 0.9])
  y = jnp.array([0, 3, 3, 9])
  want = teacher.apply(teacher.params, x, t, label=y)
  np.testing.assert_allclose(net.denoise(teacher.params, x, t, label=y), want, rtol=1e-6,
                             atol=1e-6)
  assert float(jnp.max(jnp.abs(teacher.apply(teacher.params, x, t, label=y[::-1]) - want))) > 1e-3
  # the samplers and the exact map carry one label per row: row i equals a run at label y_i alone
  labels = setup.labels(jax.random.key(1), 4)
  ddim = setup.teacher_sampler("ddim", 2, labels=labels)(x)
  alone = setup.teacher_sampler("ddim", 2, labels=labels[::3])(x[::3])  # rows 0 and 3 alone
  np.testing.assert_allclose(ddim[::3], alone, rtol=1e-5, atol=1e-5)
  other = setup.teacher_sampler("ddim", 2, labels=(labels + 1) % 10)(x)
  assert float(jnp.min(jnp.max(jnp.abs(other - ddim), axis=(1, 2, 3)))) > 1e-4  # every row moved
  with pytest.raises(ValueError, match="needs labels"):
    setup.teacher_sampler("ddim", 2)


def test_a_conditional_teacher_without_a_dataset_trains_on_its_samples_at_drawn_labels(
    conditional_teacher, tmp_path):
  """Without teacher.dataset the data are the teacher's own samples, each at a label drawn
  uniformly and stored with it: x is the teacher's sampler at that label from x_T."""
  config = _config("cd", conditional_teacher[0], vae=conditional_teacher[1], conditional=True)
  setup = setup_lib.make_setup(config)
  setup.workdir = str(tmp_path)
  pairs = next(_common.teacher_pairs(config, setup, "pairs", _common.teacher_pair_sampler(
      config, setup), str(tmp_path), batch_size=16))
  assert set(pairs) == {"x_T", "x", "label"} and len(np.unique(pairs["label"])) > 3
  sample = functools.partial(setup.teacher_sampler, config.pairs.solver, config.pairs.nfe)
  x_T = jnp.asarray(pairs["x_T"])
  np.testing.assert_allclose(pairs["x"], sample(labels=pairs["label"])(x_T), rtol=1e-4, atol=1e-3)
  other = sample(labels=(pairs["label"] + 1) % 10)(x_T)
  assert float(jnp.min(jnp.max(jnp.abs(other - pairs["x"]), axis=(1, 2, 3)))) > 1e-4
  batch = next(setup.data(seed=0, batch_size=8))  # the students' data: the samples and labels
  assert set(batch) == {"x", "label"} and batch["x"].shape == (8, 4, 4, 4)
  assert np.all((batch["label"] >= 0) & (batch["label"] < 10))


def test_conditional_refusals_name_the_cause(conditional_teacher, dit_folder, latent_teacher):
  with pytest.raises(ValueError, match=r"kd does not distil a class-conditional.*\['cd', 'ct'"):
    setup_lib.make_setup(_conditional_config("kd", conditional_teacher))
  config = config_lib.get_config("cd_gmm64,tiny")
  config.teacher.conditional = True
  with pytest.raises(ValueError, match="is for an imported class-conditional checkpoint"):
    setup_lib.make_setup(config)


@pytest.mark.slow
@pytest.mark.parametrize("method, samples", [("cd", "cd_nfe1"), ("dmd2", "dmd2_generator_nfe1")])
def test_a_method_distils_a_conditional_latent_teacher_over_its_labels(
    conditional_teacher, tmp_path, method, samples):
  """CD, and DMD2 with its GAN head (G(z, label), the teacher and the fake score at the batch's
  labels; tests/test_distribution_matching.py checks the routing in closed form)."""
  out = main_lib.run(_conditional_config(method, conditional_teacher), str(tmp_path))
  assert all(np.isfinite(r["median"]) and not r["nan"] for r in out["rows"])
  with np.load(tmp_path / "samples" / f"{samples}.npz") as f:
    labels, images = f["labels"], f["images"]
  assert labels.shape == (128,) and len(np.unique(labels)) > 5 and images.shape == (128, 8, 8, 1)


@pytest.mark.slow
def test_sid_distils_a_conditional_teacher_without_a_dataset(conditional_teacher, tmp_path):
  """Data-free, as SiD is: the teacher's own samples at drawn labels; every labelled row runs."""
  config = _config("sid", conditional_teacher[0], vae=conditional_teacher[1], conditional=True)
  out = main_lib.run(config, str(tmp_path))
  assert all(np.isfinite(r["median"]) and not r["nan"] for r in out["rows"])
  with np.load(tmp_path / "samples" / "sid_generator_nfe1.npz") as f:
    assert f["labels"].shape == (128,) and f["images"].shape == (128, 8, 8, 1)
  assert (tmp_path / "teacher_samples" / "pairs.json").is_file()


def test_an_extra_time_input_goes_through_the_checkpoints_time_map(dit_folder):
  """A student with an extra input (MeanFlow's r) built on an imported network
  (`_common.extra_input_net`): at the teacher's weights it is the teacher whatever r is (the r
  projection starts at zero), and once that projection is nonzero the network reads r as it reads
  t: DiT's step index 1000 r - 1 here (interop._network), the null label carried over too."""
  setup = setup_lib.make_setup(_config("cd", dit_folder))
  net = _common.student_net(setup.config, setup)
  u_net = _common.extra_input_net(setup.config, setup, net, ("r",))
  assert u_net.module.extra_cond == ("r",) and net.module.extra_cond == ()
  fresh = u_net.init(jax.random.key(1))
  params = jax.device_get(teachers.device_params(setup.teacher))
  start = _common.nets.init_from(fresh, params)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 4))
  t, r = jnp.array([0.3, 0.6, 0.9]), jnp.array([0.1, 0.2, 0.5])
  np.testing.assert_allclose(u_net.apply(start, x, t, r=r), net.apply(params, x, t),
                             rtol=1e-6, atol=1e-6)
  # every leaf the teacher lacks (the r embedding) made nonzero: r now matters, read as 1000 r - 1
  teacher_paths = {p for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  moved = jax.tree_util.tree_map_with_path(
      lambda p, v: v if p in teacher_paths else 0.05 * jnp.ones_like(v), start)
  out = u_net.apply(moved, x, t, r=r)
  assert float(jnp.max(jnp.abs(out - u_net.apply(moved, x, t, r=r + 0.1)))) > 1e-3
  module_apply = _common.nets.make_apply(u_net.module)
  want = module_apply(moved, x, 1000.0 * t - 1.0, r=1000.0 * r - 1.0,
                      label=jnp.full((3,), 5))[..., :4]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_an_edm_kind_network_reads_an_extra_time_as_c_noise():
  """For kind 'edm' the network's time input is c_noise = log(sigma) / 4 (`as_denoiser` computes
  it from t): a time-like extra input given in the schedule's time is mapped the same way."""
  from diffdistill import nets, schedules
  from diffdistill.interop import _network
  module = nets.get_network("mlp", features=16, num_blocks=1, emb_dim=16, extra_cond=("r", "d"))
  schedule = schedules.EDM()
  params = nets.init_params(module, jax.random.key(0), jnp.zeros((1, 3)))
  leaves, tree = jax.tree.flatten(params)  # random everywhere, the zero-initialized layers too
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [v + 0.3 * jax.random.normal(k, v.shape)
                                     for v, k in zip(leaves, keys)])
  net_apply = _network.network_apply(module, kind="edm", schedule=schedule)
  x = jax.random.normal(jax.random.key(1), (2, 3))
  c_noise, r, d = jnp.array([-1.0, 0.5]), jnp.array([0.02, 3.0]), jnp.array([0.1, 0.7])
  want = nets.make_apply(module)(params, x, c_noise, r=0.25 * jnp.log(r), d=d)  # d: not a time
  got = net_apply(params, x, c_noise, r=r, d=d)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(got - net_apply(params, x, c_noise, r=2 * r, d=d)).max()) > 1e-3
  assert _network.TIME_LIKE == ("r", "s")


def test_a_guided_teacher_is_cfg_inside_its_interval_and_plain_outside(dit_folder):
  """`--config.teacher.guidance=w` with an interval: the teacher's denoiser is
  D(null) + w (D(label) - D(null)) at times inside it and D(label) outside; the student's start
  (`net_apply`) stays the checkpoint's own network."""
  plain = teachers.load(kind="import", path=dit_folder, conditional=True)
  guided = teachers.load(kind="import", path=dit_folder, conditional=True, guidance=2.5,
                         guidance_interval=(0.0, 0.6))
  assert guided.name.endswith("(guided, w = 2.5 for t in [0, 0.6]) (all 5 classes)")
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 4))
  t, label = jnp.array([0.2, 0.5, 0.9]), jnp.array([1, 3, 0])
  d_c = plain.apply(plain.params, x, t, label=label)
  d_null = plain.apply(plain.params, x, t, label=jnp.full((3,), 5))
  want = jnp.where((t <= 0.6)[:, None, None, None], d_null + 2.5 * (d_c - d_null), d_c)
  np.testing.assert_allclose(guided.apply(guided.params, x, t, label=label), want,
                             rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(want - d_c).max()) > 1e-3  # the guidance moves it
  one = teachers.load(kind="import", path=dit_folder, label=3, guidance=2.0)
  d_3 = plain.apply(plain.params, x, t, label=jnp.full((3,), 3))
  np.testing.assert_allclose(one.apply(one.params, x, t), d_null + 2.0 * (d_3 - d_null),
                             rtol=1e-4, atol=1e-4)  # x0 at t = 0.9: float32 rounding / alpha
  with pytest.raises(ValueError, match="guides a class against the null class"):
    teachers.load(kind="import", path=dit_folder, guidance=2.0)
  with pytest.raises(ValueError, match="guidance is for an imported class-conditional"):
    setup_lib.make_setup(_config_with(config_lib.get_config("cd_gmm64,tiny"), guidance=3.0))


def _config_with(config, **teacher):
  for k, v in teacher.items():
    config.teacher[k] = v
  return config
