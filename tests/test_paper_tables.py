"""experiments/paper_tables: every table is complete and builds its distill config; the runnable
ones run end to end at their tiny size on a random EDM-format snapshot (the latent one on a random
SiT and VAE), FID included (torch, to write the checkpoints; slow: Inception compiles for minutes
on 2 cores)."""

import json

import numpy as np
import pytest

from experiments.paper_tables import main as paper_main, tables


@pytest.mark.parametrize("name", tables.names())
def test_every_table_names_its_source_files_budget_and_builds_its_config(name):
  table = tables.get(name)
  assert table.paper and table.where and table.metric and table.budget and table.numbers
  assert {"checkpoint", "fid_reference", "inception"} <= set(table.files)
  files = dict(checkpoint="teacher.pkl", inception="inception.npz", fid_reference="ref.npz",
               dataset="cifar10")
  if table.blocked:
    with pytest.raises(ValueError, match=f"{name} cannot run yet: "):
      paper_main.make_config(table, **files)
    return
  config = paper_main.make_config(table, **files)
  assert f"{config.method}_{config.testbed}" == table.variant
  assert config.teacher.path == "teacher.pkl" and config.eval.fid.num_samples == 50_000
  for key, value in {**table.method, **table.scale}.items():
    node = config
    for part in key.split("."):
      node = node[part]
    assert node == value, key
  tiny = paper_main.make_config(table, **files, tiny=True)
  for key, value in table.method.items():  # the paper's method settings survive --tiny
    node = tiny
    for part in key.split("."):
      node = node[part]
    assert node == value, key
  assert tiny.eval.fid.num_samples == 8 and tiny.batch_size == 64


def test_config_refusals_name_the_missing_file_or_key():
  sid = tables.get("sid_cifar10_uncond")
  with pytest.raises(ValueError, match="needs --checkpoint: edm-cifar10-32x32-uncond-vp.pkl"):
    paper_main.make_config(sid, checkpoint="")
  with pytest.raises(ValueError, match="needs --dataset: cifar10"):
    paper_main.make_config(tables.get("ect_cifar10_uncond"), checkpoint="t.pkl")
  with pytest.raises(KeyError, match="'dm.sid_alpah' is not a key"):
    paper_main.make_config(sid, checkpoint="t.pkl", overrides={"dm.sid_alpah": 1.0})
  with pytest.raises(ValueError, match="Unknown paper table 'sid'"):
    tables.get("sid")
  listing = paper_main.listing()
  assert all(f"| {name} |" in listing for name in tables.names())


def test_command_line_overrides_are_read_as_json_where_they_parse():
  from experiments.distill import config as config_lib
  assert config_lib.parse_overrides(["dm.num_steps=100", "optim.name=adam", "pd.eval_steps=[2, 1]",
                                     "progress=false"]) == {
      "dm.num_steps": 100, "optim.name": "adam", "pd.eval_steps": [2, 1], "progress": False}
  with pytest.raises(ValueError, match="--config takes KEY=VALUE, got 'dm.num_steps'"):
    config_lib.parse_overrides(["dm.num_steps"])


def test_compare_sets_the_students_fid_beside_the_papers():
  table = tables.get("pd_cifar10")
  rows = [{"method": "pd", "nfe": 1, "fid": 11.0}, {"method": "pd", "nfe": 2, "fid": 6.0},
          {"method": "teacher ddim", "nfe": 1, "fid": 300.0}]
  result = paper_main.compare(table, rows)
  assert result["rows"] == [{"nfe": 1, "paper": 9.12, "ours": 11.0},
                            {"nfe": 2, "paper": 4.51, "ours": 6.0},
                            {"nfe": 4, "paper": 3.00, "ours": None},
                            {"nfe": 8, "paper": 2.57, "ours": None}]
  assert "| 1 | 9.12 | 11.000 |" in paper_main.markdown(result)
  assert "| 4 | 3.0 | not run |" in paper_main.markdown(result)


@pytest.mark.slow
@pytest.mark.torch
def test_runnable_tables_run_tiny_on_a_random_edm_snapshot(tmp_path, monkeypatch):
  """Each runnable table, --tiny, on a random-weight EDM-format snapshot written the way EDM's
  persistence writes one, with random Inception weights and reference statistics: it trains,
  samples, scores FID on 8 samples and writes paper.json with ours beside the paper's."""
  from diffdistill.nets import inception as inception_net
  from tests.test_evaluate import _random_weights
  from tests.test_interop_edm import _snapshot
  _, checkpoint = _snapshot(tmp_path, monkeypatch)
  # a class-conditional table: EDM's ADM over 10 labels, on the 8x8 digits with their labels
  # (widths 16 and 32: no attention, which the equivalence tests cover; a small compile)
  arch = dict(model_channels=16, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
              attn_resolutions=[4], dropout=0.0)
  _, adm = _snapshot(tmp_path, monkeypatch, network="DhariwalUNet", label_dim=10, img_channels=1,
                     name="edm-adm.pkl", arch=arch)
  # a latent table: a SiT (published width 384, one block) on 8x8x4 latents of a random VAE
  from diffdistill.interop import vae as interop_vae
  from tests.test_distill_import import VAE, _write_folder
  from tests.test_interop_dit import _original
  _, sit = _original(tmp_path, "SiT-tiny.pt", seed=2, d=384, heads=6, depth=1)
  (tmp_path / "vae").mkdir()
  vae = _write_folder(tmp_path / "vae", VAE,
                      interop_vae.vae_leaves(dict(interop_vae._DEFAULTS, **VAE)), seed=1)
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "inception.npz",
           **inception_net.state_dict_from_variables(_random_weights(rng)))
  np.savez(tmp_path / "ref.npz", mu=rng.normal(size=2048), sigma=np.eye(2048))
  for name in tables.names():
    table = tables.get(name)
    if table.blocked:
      continue
    workdir = tmp_path / name
    conditional = table.method.get("teacher.conditional", False)
    if "vae" in table.files:  # the teacher's own samples at drawn labels: no dataset
      files = dict(checkpoint=sit, vae=vae)
    elif conditional:
      files = dict(checkpoint=adm, dataset="digits8")
    else:
      files = dict(checkpoint=checkpoint)
    result = paper_main.run(table, str(workdir), tiny=True, **files,
                            inception=str(tmp_path / "inception.npz"),
                            fid_reference=str(tmp_path / "ref.npz"))
    rows = json.loads((workdir / "results.json").read_text())["rows"]
    assert any(r["method"] == table.student_row for r in rows), name  # the row compare reads
    ours = [r["ours"] for r in result["rows"] if r["ours"] is not None]
    assert ours and all(np.isfinite(v) and v > 0 for v in ours), (name, result)
    assert json.loads((workdir / "paper.json").read_text())["rows"] == result["rows"]
    assert (workdir / "paper.md").is_file()
