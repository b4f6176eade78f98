"""experiments/distill on an imported checkpoint (`--config.teacher.kind=import`, the `import`
testbed): a random-weight diffusers DiT folder written here (no torch, no download) is the
teacher; its students start from its weights and train on its own samples.

The EDM-format snapshot's run is in test_interop_edm.py (it needs torch to write the pickle)."""

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
  with pytest.raises(ValueError, match="an imported teacher is distilled on its own"):
    setup_lib.make_setup(_config("meanflow", dit_folder))
  with pytest.raises(ValueError, match=r"label must be in \[0, 5\]"):
    teachers.load(kind="import", path=dit_folder, label=6)
  with pytest.raises(ValueError, match="needs path="):
    teachers.load(kind="import")
  with pytest.raises(ValueError, match="brings its own schedule"):
    teachers.load(kind="import", path=dit_folder, schedule=setup_lib.schedules_lib.VPLinear())


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
