"""experiments/distill's tools around the runs: the seeds table, the training-curve figure, and the
trunk features that DMD2's GAN head reads."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffdistill import nets, schedules
from experiments.distill import curves, seeds, tables


def _result(median, w2, extra_row=True):
  rows = [{"method": "sid generator", "nfe": 1, "median": median, "sliced_w2": w2,
           "sliced_w2_floor": 0.02, "mmd2": 1e-2, "mmd2_floor": 1e-4}]
  if extra_row:
    rows.append({"method": "teacher ddim", "nfe": 10, "median": 0.1, "sliced_w2": 0.05,
                 "sliced_w2_floor": 0.02, "mmd2": 1e-3, "mmd2_floor": 1e-4})
  return {"rows": rows, "command": "x", "seconds": {"total": 1.0}}


def test_seeds_table_pools_rows_by_method_and_nfe(tmp_path):
  rows = seeds.aggregate([_result(0.2, 0.05), _result(0.4, 0.07), _result(0.3, 0.06)])
  gen = next(r for r in rows if r["method"] == "sid generator")
  assert gen["n"] == 3 and gen["nfe"] == 1
  np.testing.assert_allclose(gen["median"]["mean"], 0.3)
  np.testing.assert_allclose(gen["median"]["std"], np.std([0.2, 0.4, 0.3], ddof=1))
  assert (gen["median"]["min"], gen["median"]["max"]) == (0.2, 0.4)
  np.testing.assert_allclose(gen["sliced_w2_floor"], 0.02)
  teacher = next(r for r in rows if r["method"] == "teacher ddim")
  assert teacher["median"]["std"] < 1e-12 and "mode_cov_error" not in teacher
  text = seeds.write([_result(0.2, 0.05), _result(0.4, 0.07)], str(tmp_path))
  assert "| sid generator | 1 | 2 | 0.300 ± 0.141 |" in text
  assert json.loads((tmp_path / "seeds.json").read_text())["rows"][0]["n"] == 2


def test_a_renoising_sampler_is_detected_and_its_coupling_marked():
  from diffdistill.methods.plan import Student
  from experiments.distill import evaluation, report

  def deterministic(params, x, *, nfe, rng=None):
    return params * x

  def renoising(params, x, *, nfe, rng=None):  # multistep-consistency-like: fresh noise inside
    rng = jax.random.key(0) if rng is None else rng
    return params * x + 0.1 * jax.random.normal(rng, x.shape)

  x = jnp.ones((8, 2))
  runs = {name: jax.jit(Student(name=name, nfe=2, params=None, sample=fn).run)
          for name, fn in (("det", deterministic), ("renoise", renoising))}
  assert not evaluation.renoises(runs["det"], 2.0, x, runs["det"](2.0, x))
  assert evaluation.renoises(runs["renoise"], 2.0, x, runs["renoise"](2.0, x))
  row = {"median": 0.3, "rms": 0.4, "ms": 1.0}
  text = report.table([{**row, "method": "cd", "nfe": 2, "renoised": True},
                       {**row, "method": "pd", "nfe": 2, "renoised": False}])
  assert "| cd | 2 | 3.00e-01† | 4.00e-01† |" in text and "| pd | 2 | 3.00e-01 | 4.00e-01 |" in text
  assert report.RENOISED_NOTE in text
  assert report.RENOISED_NOTE not in report.table([{**row, "method": "pd", "nfe": 2}])
  res = {"rows": [{**row, "method": "cd", "nfe": 2, "renoised": True}], "command": "x",
         "seconds": {"total": 1.0}}
  assert "0.300 ± 0.000†" in seeds.markdown(seeds.aggregate([res, res]))


def _cm_sweep(root, name, student, samples_per_seed):
  """A fake finished sweep: seeds.json with one student and one teacher row, saved samples."""
  results = []
  for seed, x in enumerate(samples_per_seed):
    row = {"method": student, "nfe": 1, "median": 0.1 + 0.1 * seed, "sliced_w2": 0.03,
           "sliced_w2_floor": 0.02, "mode_weight_tv": 0.05, "mode_weight_tv_floor": 0.03,
           "mode_cov_error": 1.0, "mode_cov_error_floor": 0.3}
    results.append({"rows": [row, {**row, "method": "teacher ddim", "median": 0.5}]})
    (root / name / f"seed{seed}" / "samples").mkdir(parents=True)
    (root / name / f"seed{seed}" / "results.json").write_text(json.dumps(results[-1]))
    np.savez(root / name / f"seed{seed}" / "samples" / f"{student}_nfe1.npz", samples=x)
  seeds.write(results, str(root / name))


def test_cm_table_reads_the_sweeps_and_counts_the_lightest_mode(tmp_path):
  from diffdistill import analytic, metrics  # noqa: PLC0415
  mix = analytic.mixture64()
  w = np.asarray(mix.weights)
  j = int(np.argmin(w))
  exact = np.asarray(analytic.sample(mix, jax.random.key(0), 8000))
  _cm_sweep(tmp_path, "cd", "cd", [exact, exact])
  share = tables.lightest_mode_share(str(tmp_path / "cd"), mix, "cd", 1)
  count = np.asarray(metrics.mode_counts(mix, jnp.asarray(exact)))[j]
  np.testing.assert_allclose(share, [count / (w[j] * 8000)] * 2)
  assert abs(share[0] - 1.0) < 0.35  # exact samples keep the mode (88 expected, std ~9.4)
  # samples of the same mixture without its lightest component keep none of it
  keep = np.arange(len(w)) != j
  covs = np.asarray(mix.covs, np.float64)[keep]
  missing = analytic.GaussianMixture(w[keep] / w[keep].sum(), np.asarray(mix.means)[keep],
                                     (covs + covs.transpose(0, 2, 1)) / 2)
  _cm_sweep(tmp_path, "ct", "ct", [np.asarray(analytic.sample(missing, jax.random.key(1), 8000))])
  assert tables.lightest_mode_share(str(tmp_path / "ct"), mix, "ct", 1)[0] < 0.05
  text = tables.cm_table(str(tmp_path))
  assert "| CD (Heun, N = 32, EMA 0.95) | 1 | 2 | 0.150 ± 0.071 |" in text
  assert "| teacher DDIM, VP-linear | 1 | – | 0.500 |" in text
  assert "sliced W2 (floor 0.020)" in text
  (tmp_path / "cd" / "seed1" / "results.json").unlink()  # an unfinished seed is not counted
  assert len(tables.lightest_mode_share(str(tmp_path / "cd"), mix, "cd", 1)) == 1


def test_modes_table_splits_the_covariance_error_of_a_single_run(tmp_path):
  """A run from before the split (results.json without the parts): the table computes the tail
  share and core error from its saved samples against its config's mixture; a smeared mode
  shows in the tail, not in the core."""
  from diffdistill import analytic, metrics  # noqa: PLC0415
  mix = analytic.mixture64()
  x = np.array(analytic.sample(mix, jax.random.key(0), 2048))
  k = np.asarray(jnp.argmax(analytic.responsibilities(mix, jnp.asarray(x)), axis=1))
  moved = np.flatnonzero(k == 0)[::4]  # a quarter of mode 0, 45 % of the way to mode 1
  x[moved] += 0.45 * np.asarray(mix.means[1] - mix.means[0])
  run = tmp_path / "dmd2_try"
  (run / "samples").mkdir(parents=True)
  np.savez(run / "samples" / "dmd2_generator_nfe1.npz", samples=x)
  row = {"method": "dmd2 generator", "nfe": 1, "sliced_w2": 0.05, "mode_weight_tv": 0.06,
         "mode_cov_error": 1.5, "mode_cov_error_floor": 0.3}
  (run / "results.json").write_text(json.dumps({"rows": [row, {**row, "method": "teacher ddim"}]}))
  (run / "config.json").write_text(json.dumps({"teacher": {"kind": "analytic", "name": "mixture64",
                                                           "mixture_file": ""}}))
  text = tables.modes_table(str(tmp_path))
  parts = metrics.mode_stats(mix, jnp.asarray(x))
  tail = float(parts["tail_share"])
  # the moved samples (mode 0's weight x 1/4 of its share) are in the tail (exact samples: none)
  assert 0.7 * float(mix.weights[0]) / 4 < tail < 1.3 * float(mix.weights[0]) / 4
  assert (f"| dmd2_try | dmd2 generator | 1 | 1 | 0.050 | 0.060 | 1.500 | {tail:.3f} | "
          f"{float(parts['core_cov_error']):.3f} |") in text
  assert "| – | teacher ddim | 1 | – | 0.050 |" in text and "tail share (floor 0.000)" in text
  with pytest.raises(FileNotFoundError, match="No <run>/results.json"):
    tables.modes_table(str(run / "samples"))


def test_seeds_bad_input_is_named():
  with pytest.raises(ValueError, match="--seeds must be comma-separated integers"):
    seeds.parse_seeds("0,a")
  with pytest.raises(ValueError, match="each once"):
    seeds.parse_seeds("1,1")
  with pytest.raises(ValueError, match="at least one results.json"):
    seeds.aggregate([])
  with pytest.raises(FileNotFoundError, match="No results.json"):
    seeds._read("/nonexistent/run")  # noqa: SLF001


def test_curves_use_the_steps_every_run_logged(tmp_path):
  for s, last in ((0, 300), (1, 200)):
    d = tmp_path / f"seed{s}" / "dm"
    d.mkdir(parents=True)
    d.joinpath("metrics.jsonl").write_text("\n".join(
        json.dumps({"step": k, "generator/loss": float(k + s), "fake_score/loss": 1.0})
        for k in range(100, last + 1, 100)))
  runs = curves.read_runs(str(tmp_path), "dm")
  steps, values = curves.series(runs, "generator/loss")
  np.testing.assert_array_equal(steps, [100, 200])
  np.testing.assert_array_equal(values, [[100, 200], [101, 201]])
  assert curves.series(runs, "generator/sliced_w2") is None
  out = tmp_path / "fig.png"
  curves.main([f"sid={tmp_path}", f"--out={out}", "--keys=generator/loss,fake_score/loss"])
  assert out.stat().st_size > 5_000
  with pytest.raises(FileNotFoundError, match="No dm/metrics.jsonl"):
    curves.read_runs(str(tmp_path / "nothing"), "dm")


def test_gan_head_features_of_an_mlp_are_its_last_block():
  mlp = nets.Net(module=nets.get_network("mlp", features=32, num_blocks=2, emb_dim=16),
                   kind="eps", schedule=schedules.VPLinear(), example_shape=(2,))
  mp = nets.init_params(mlp.module, jax.random.key(2), jnp.zeros((1, 2)))
  mf, mdim = nets.trunk_features(mlp)
  assert mf(mp, jnp.ones((5, 2)), jnp.full((5,), 0.3)).shape == (5, 32) and mdim == 32


def test_gan_head_features_of_a_dit_are_its_last_blocks_tokens_in_the_nets_own_conventions():
  """A DiT's features: its last block's tokens averaged, read from the network as the Net runs
  it: with an imported network's `apply_fn` (here DiT's step index 1000 t - 1 and a label), the
  features are those of the block at that step and label."""
  module = nets.get_network("dit", patch_size=2, hidden_size=16, depth=2, num_heads=2,
                            num_classes=3)
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  t, label = jnp.array([0.2, 0.5, 0.9]), jnp.array([0, 2, 3])
  params = jax.jit(module.init)(jax.random.key(1), x, t, label)["params"]  # eager: ~8 s
  leaves, tree = jax.tree.flatten(params)  # adaLN-Zero starts every block at the identity
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [a + 0.2 * jax.random.normal(k, a.shape)
                                     for a, k in zip(leaves, keys)])
  raw = nets.make_apply(module)
  step = lambda p, x, t, **c: raw(p, x, 1000.0 * t - 1.0, **c)  # noqa: E731
  net = nets.Net(module=module, kind="eps", schedule=schedules.VPLinear(), example_shape=(4, 4, 2),
                 apply_fn=step)
  features, dim = nets.trunk_features(net)
  features = jax.jit(features)  # eager DiT ops are slow
  f = features(params, x, t, label=label)
  _, state = jax.jit(lambda p: module.apply({"params": p}, x, 1000.0 * t - 1.0, label,
                                            capture_intermediates=True,
                                            mutable=["intermediates"]))(params)
  h = state["intermediates"]["blocks_1"]["__call__"][0]  # [B, tokens, D]
  assert dim == 16 and f.shape == (3, 16)
  np.testing.assert_allclose(f, h.mean(axis=1), rtol=1e-6)
  assert not np.allclose(f, features(params, x, t, label=label[::-1]))


@pytest.mark.slow  # ~10-30 s: compiling a U-Net; the digits DMD2 run reads these features
def test_gan_head_features_are_the_unet_bottleneck_averaged_over_space():
  module = nets.get_network("unet", model_channels=8, channel_mult=(1, 2), num_blocks=1,
                            attn_resolutions=(), dropout=0.0)
  net = nets.Net(module=module, kind="eps", schedule=schedules.VPLinear(), example_shape=(8, 8, 1))
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  t = jnp.full((3,), 0.5)
  params = jax.jit(module.init)(jax.random.key(1), x, t)["params"]  # jit: eager U-Net ops are slow
  features, dim = nets.trunk_features(net)
  features = jax.jit(features)
  f = features(params, x, t)
  assert f.shape == (3, dim) == (3, 16)  # the 4x4 level's 2 x 8 channels
  # the bottleneck block: the one right before the first up-path block, at the lowest resolution
  _, state = jax.jit(lambda p: module.apply({"params": p}, x, t, capture_intermediates=True,
                                            mutable=["intermediates"]))(params)
  inter = state["intermediates"]
  blocks = sorted((k for k in inter if k.startswith("UNetBlock_")), key=lambda k: int(k.split("_")[1]))
  mid = [k for k in blocks if inter[k]["__call__"][0].shape[1:3] == (4, 4)]
  # at the lowest level: the down block and num_blocks encoder blocks, the two middle blocks, then
  # num_blocks + 1 decoder blocks, so the second middle block is the centre one
  h = inter[mid[len(mid) // 2]]["__call__"][0]
  np.testing.assert_allclose(f, h.mean(axis=(1, 2)), rtol=1e-6)
  assert not np.allclose(f, features(params, x + 1.0, t))


def test_digits_rows_carry_fd_digits_into_the_tables():
  """A digits teacher's rows are scored against the data (FD-digits, digits IS, the floor) and
  the run table and the seeds table show them."""
  from diffdistill.data import digits8
  from diffdistill.metrics import digits
  from experiments.distill import evaluation, report

  scorer = digits.DigitsScorer(digits.init_classifier(jax.random.key(0)))  # untrained is enough here
  floor = scorer.floor(64, num_draws=3)
  x = digits8.load_split("test")[0][:64]
  quality_ref = {"digits": (scorer, floor, 1.5)}
  row = evaluation.score(x + 0.1, x, quality_ref)
  np.testing.assert_allclose(row["fd_digits"], scorer.frechet(x + 0.1))
  assert row["fd_digits_floor"] == floor["fd_mean"] and row["fd_digits_exact"] == 1.5
  assert "sliced_w2" not in row
  text = report.table([{**row, "method": "cd", "nfe": 1, "ms": 1.0}])
  assert f"| {row['fd_digits']:.1f} ({floor['fd_mean']:.1f}) | {row['is_digits']:.2f} |" in text
  assert "64 held-out test digits" in text and "same noise: 1.5" in text
  res = {"rows": [{**row, "method": "cd", "nfe": 1}], "command": "x", "seconds": {"total": 1.0}}
  assert f"{row['fd_digits']:.1f} ± 0.0 ({floor['fd_mean']:.1f})" in seeds.markdown(
      seeds.aggregate([res, res]))


def test_digits_table_reads_student_runs_of_the_same_noise(tmp_path):
  """digits_table: a finished digits run's students are rescored from their samples; samples
  from other noise are refused (they could not share the figure)."""
  from diffdistill.data import digits8
  from diffdistill.metrics import digits
  from experiments.distill import digits_table

  scorer = digits.DigitsScorer(digits.init_classifier(jax.random.key(0)))
  x_start = np.random.default_rng(0).standard_normal((32, 8, 8, 1)).astype(np.float32)
  samples = digits8.load_split("test")[0][:32]
  run = tmp_path / "cd"
  (run / "samples").mkdir(parents=True)
  np.savez(run / "samples" / "cd_nfe1.npz", x_start=80.0 * x_start, samples=samples, sigma_start=80.0)
  rows = [{"method": "cd", "nfe": 1, "median": 0.15, "ms": 2.0, "renoised": False},
          {"method": "teacher ddim", "nfe": 1, "median": 0.44, "ms": 1.0}]
  (run / "results.json").write_text(json.dumps(
      {"variant": "cd_digits", "rows": rows, "seconds": {"total": 561.0}}))
  out, shown = digits_table.student_rows([str(run)], x_start, scorer)
  assert [r["method"] for r in out] == ["cd: cd"] and list(shown) == ["cd: cd, 1"]
  np.testing.assert_allclose(out[0]["fd_digits"], scorer.frechet(samples))
  text = digits_table.markdown(out)
  assert f"| cd: cd | 1 | 1 | {out[0]['fd_digits']:.1f} |" in text
  assert "| 0.150 | 2.0 | 561 s |" in text
  with pytest.raises(ValueError, match="other noise"):
    digits_table.student_rows([str(run)], x_start + 1.0, scorer)
  # a seeds sweep: seed<k>/ runs pooled into one row per (method, NFE), in seed order
  sweep = tmp_path / "sweep"
  flipped = samples[:, ::-1]
  for k, (imgs, med, secs) in enumerate([(samples, 0.15, 500.0), (flipped, 0.25, 700.0)]):
    (sweep / f"seed{k}" / "samples").mkdir(parents=True)
    np.savez(sweep / f"seed{k}" / "samples" / "cd_nfe1.npz", x_start=80.0 * x_start,
             samples=imgs, sigma_start=80.0)
    (sweep / f"seed{k}" / "results.json").write_text(json.dumps(
        {"variant": "cd_digits", "rows": [{**rows[0], "median": med}],
         "seconds": {"total": secs}}))
  (sweep / "seed2").mkdir()  # an unfinished seed is left out
  out, shown = digits_table.student_rows([str(sweep)], x_start, scorer)
  fds = [scorer.frechet(samples), scorer.frechet(flipped)]
  assert len(out) == 1 and out[0]["seeds"] == 2 and fds[0] != fds[1]
  np.testing.assert_allclose([out[0]["fd_digits"], out[0]["fd_std"]],
                             [np.mean(fds), np.std(fds, ddof=1)], rtol=1e-6)
  np.testing.assert_allclose([out[0]["median"], out[0]["median_std"], out[0]["seconds"]],
                             [0.2, np.std([0.15, 0.25], ddof=1), 600.0])
  np.testing.assert_array_equal(shown["cd: cd, 1"], samples)
  text = digits_table.markdown(out)
  assert f"| 2 | {np.mean(fds):.1f} ± {np.std(fds, ddof=1):.1f} |" in text
  assert f"| 0.200 ± {np.std([0.15, 0.25], ddof=1):.3f} |" in text
  with pytest.raises(FileNotFoundError, match="no finished seed"):
    digits_table.run_seeds(str(tmp_path / "empty"))


def test_meanflow_closed_form_tracks_every_jump_and_names_bad_flags(tmp_path, monkeypatch):
  from experiments.distill import meanflow_closed_form as mcf  # noqa: PLC0415
  seen = []  # --teacher_velocity hands the loss a teacher whose velocity is the closed form's
  real_loss = mcf.meanflow.meanflow_loss

  def spy(apply, teacher=None, **kw):
    seen.append((teacher, kw))
    return real_loss(apply, teacher, **kw)

  monkeypatch.setattr(mcf.meanflow, "meanflow_loss", spy)
  # the closed form itself: u(z, t, t) is the velocity E[eps - x | z_t] of N(m, v)
  m, v = jnp.asarray([0.5, -1.0]), jnp.asarray([0.3, 2.0])
  z, t = jnp.asarray([[0.2, 0.7]]), jnp.asarray([0.4])
  # Var z_t = a_t, so E[eps - x | z] = -m + (t - (1 - t) v) / a_t (z - (1 - t) m)
  a_t = (1 - t) ** 2 * v + t ** 2
  want = -m + (t - (1 - t) * v) / a_t * (z - (1 - t) * m)
  np.testing.assert_allclose(mcf.average_velocity(m, v, z, t, t), want, rtol=1e-6)
  mcf.main([f"--workdir={tmp_path}", "--num_steps=4", "--eval_every=2", "--dim=2",
            "--adaptive_p=0.5", "--p_std=2.0", "--ratio_r_neq_t=0.75", "--teacher_velocity"])
  out = json.loads((tmp_path / "curves.json").read_text())
  assert out["args"]["p_std"] == 2.0 and out["args"]["ratio_r_neq_t"] == 0.75
  assert out["args"]["teacher_velocity"]
  (teacher, kw), = seen
  assert kw["p_std"] == 2.0 and kw["ratio_r_neq_t"] == 0.75 and kw["adaptive_p"] == 0.5
  m2, v2 = jnp.asarray(out["m"]), jnp.asarray(out["v"])
  zz, tt = jnp.ones((3, 2)), jnp.asarray([0.2, 0.5, 0.9])
  np.testing.assert_allclose((zz - teacher(None, zz, tt)) / tt[:, None],
                             mcf.average_velocity(m2, v2, zz, tt, tt), rtol=1e-5)
  curve = out["curves"]["0.5"]
  assert curve["step"] == [0, 2, 4] and all(len(curve[k]) == 3 for k in mcf.JUMPS)
  assert (tmp_path / "closed_form.png").exists()
  for bad in ("--p_std=0", "--ratio_r_neq_t=1.5"):
    with pytest.raises(ValueError, match=bad.split("=")[0]):
      mcf.main([f"--workdir={tmp_path}", bad])


def test_consistency_closed_form_measures_zero_for_the_exact_map(tmp_path, monkeypatch):
  """The measure: with the consistency function replaced by the closed-form flow map, every
  error is 0; the posterior mean's at t_max is ||D - Phi|| / ||Phi|| > 0."""
  from experiments import teachers as teachers_lib  # noqa: PLC0415
  from experiments.distill import config as config_lib, consistency_closed_form as ccf  # noqa: PLC0415
  from experiments.distill import setup as setup_lib  # noqa: PLC0415
  from diffdistill import analytic  # noqa: PLC0415
  mix = ccf.gaussian(4)
  teachers_lib.save_mixture(str(tmp_path / "g.npz"), mix)
  config = config_lib.get_config("ct_gmm64,tiny")
  config.teacher.mixture_file = str(tmp_path / "g.npz")
  setup = setup_lib.make_setup(config)
  s = setup.teacher.schedule

  def exact_f(denoise, *, schedule, t_min):  # f(params, x, t) = Phi_{t -> t_min}(x)
    def f(params, x, t):
      return analytic.gaussian_flow_map(setup.teacher.mixture, x, schedule=schedule,
                                        t_start=t[0], t_end=t_min)
    return f
  monkeypatch.setattr(ccf.cm, "consistency_function", exact_f)
  errors, ts = ccf.make_errors(setup, ccf._common.student_net(config, setup), n=256)
  assert ts[0] == setup.t_start and ts[1] > ts[2]
  np.testing.assert_allclose(errors(None, jax.random.key(0)), 0.0, atol=1e-5)
  assert 0.1 < ccf.posterior_mean_error(setup) < 1.0
  assert s.name.startswith("vp")


@pytest.mark.slow
def test_consistency_closed_form_runs_the_recipe_and_records_every_eval(tmp_path):
  from experiments.distill import consistency_closed_form as ccf  # noqa: PLC0415
  ccf.main([f"--workdir={tmp_path}", "--methods=ct", "--num_steps=4", "--eval_every=2",
            "--dim=2", "--config", "copy.num_steps=4", "--config", "batch_size=32"])
  out = json.loads((tmp_path / "curves.json").read_text())
  curve = out["curves"]["ct"]
  assert curve["step"] == [0, 2, 4] and all(len(curve[k]) == 3 for k in ccf.SIGMA_HATS)
  assert all(np.isfinite(curve[k]).all() for k in ccf.SIGMA_HATS)
  assert (tmp_path / "closed_form.png").exists()
  with pytest.raises(ValueError, match="--methods takes ct, ict and ect"):
    ccf.main([f"--workdir={tmp_path}", "--methods=cd"])


def test_budget_table_reads_runs_named_by_their_step_multiple(tmp_path):
  """Runs <label>_<k>x: one line per label and call count, the multiples in numeric order (16x
  after 4x), each ratio against its own run's DDIM; other names are not part of the study."""
  from experiments.distill import report  # noqa: PLC0415
  def run(name, one, two, ddim=0.5):
    rows = [{"method": "ct", "nfe": 1, "median": one}, {"method": "ct", "nfe": 2, "median": two,
                                                        "renoised": True},
            {"method": "teacher ddim", "nfe": 1, "median": ddim},
            {"method": "teacher ddim", "nfe": 2, "median": 0.3}]
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps({"rows": rows}))
  run("ct_1x", 0.5, 0.4)
  run("ct_16x", 0.15, 0.2)
  run("ct_4x", 0.25, 0.3)
  run("ect_1x", 0.3, 0.35, ddim=0.6)
  run("ct_notes", 9.0, 9.0)
  figure = tmp_path / "fig" / "budget.png"
  text = tables.budget_table(str(tmp_path), figure=str(figure))
  assert "| method | calls | 1x | 4x | 16x | teacher DDIM | last / DDIM |" in text
  assert "| ct | 1 | 0.500 | 0.250 | 0.150 | 0.500 | 0.30x |" in text
  assert "| ect | 1 | 0.300 | – | – | 0.600 | 0.50x |" in text
  assert "| ct | 2 | 0.400† | 0.300† | 0.200† | 0.300 | 0.67x† |" in text
  assert report.RENOISED_NOTE in text and "9.000" not in text and figure.exists()
  drawn = tables._budget_figure(tables.budget_curves(str(tmp_path)), [1.0, 4.0, 16.0],
                                str(figure), title="t")
  assert drawn["xticks"] == ["1x", "4x", "16x"]
  np.testing.assert_allclose(drawn["points"]["ct"], [(1, 1.0), (4, 0.5), (16, 0.3)])
  np.testing.assert_allclose(drawn["points"]["ect"], [(1, 0.5)])
  with pytest.raises(FileNotFoundError, match="named <label>_<k>x"):
    tables.budget_table(str(tmp_path / "ct_notes"))


def test_budget_table_pools_the_seeds_of_a_point(tmp_path):
  """<label>_<k>x_seed<N> runs pool with <label>_<k>x into mean ± sample std (the figure's error
  bars); an unfinished seed is left out; two runs of one seed, or a sweep with runs beside it, are
  refused rather than counted twice."""
  def run(name, one, seed):
    rows = [{"method": "meanflow", "nfe": 1, "median": one},
            {"method": "teacher ddim", "nfe": 1, "median": 0.5}]
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / name / "config.json").write_text(json.dumps({"seed": seed}))
  run("mf_4x", 0.1, 0)
  run("mf_16x", 0.3, 0)
  run("mf_16x_seed1", 0.1, 1)
  run("mf_16x_seed2", 0.2, 2)
  (tmp_path / "mf_16x_seed3").mkdir()  # still running: no results.json
  text = tables.budget_table(str(tmp_path))
  assert "| mf | 1 | 0.100 | 0.200 ± 0.100 | 0.500 | 0.40x |" in text
  drawn = tables._budget_figure(tables.budget_curves(str(tmp_path)), [4.0, 16.0],
                                str(tmp_path / "f.png"), title="t")
  np.testing.assert_allclose(drawn["points"]["mf"], [(4, 0.2), (16, 0.4)])
  np.testing.assert_allclose(drawn["errors"]["mf"], [0.0, 0.2])  # std 0.1 over DDIM's 0.5
  run("mf_4x_seed1", 0.1, 0)
  with pytest.raises(ValueError, match="both ran seed 0"):
    tables.budget_table(str(tmp_path))
  (tmp_path / "mf_4x_seed1" / "config.json").write_text(json.dumps({"seed": 1}))
  (tmp_path / "mf_16x" / "seeds.json").write_text(json.dumps({"rows": []}))
  with pytest.raises(ValueError, match="a seed sweep .mf_16x. is already one point"):
    tables.budget_table(str(tmp_path))
