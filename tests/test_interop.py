"""interop without torch: diffusers safetensors folders written from the importers' own key lists
load with `import torch` blocked, and the loaded networks run; the refusals name the key.

The equivalence with the reference code is in test_interop_dit.py / test_interop_vae.py (torch)."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from diffdistill import interop, parametrization, solvers
from diffdistill.interop import dit as interop_dit
from diffdistill.interop import vae as interop_vae

DIT_CONFIG = dict(_class_name="DiTTransformer2DModel", num_attention_heads=2, attention_head_dim=8,
                  in_channels=4, out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                  num_embeds_ada_norm=5)
VAE_CONFIG = dict(_class_name="AutoencoderKL", block_out_channels=[4, 8], layers_per_block=1,
                  norm_num_groups=2, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def _write(folder, config, leaves, seed=0):
  rng = np.random.default_rng(seed)
  state = {k: (0.1 * rng.standard_normal(s)).astype(np.float32)
           for leaf in leaves for k, s in zip(leaf.keys, leaf.shapes)}
  save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
  (folder / "config.json").write_text(json.dumps(config))
  return state


@pytest.fixture
def no_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError


def test_diffusers_dit_folder_loads_without_torch(tmp_path, no_torch):
  (tmp_path / "transformer").mkdir()  # a pipeline folder: the DiT sits in transformer/
  state = _write(tmp_path / "transformer", DIT_CONFIG,
                 interop_dit.diffusers_leaves(dict(DIT_CONFIG, norm_eps=1e-5), tied=False))
  teacher = interop.load(tmp_path)
  qkv = teacher.params["blocks_1"]["attn_qkv"]["kernel"]
  np.testing.assert_array_equal(qkv[:, 16:32], state["transformer_blocks.1.attn1.to_k.weight"].T)
  # The teacher is a denoiser on its own schedule: guided sampling with a library solver.
  guided = parametrization.guided(teacher.apply, 1.5, null_cond={"label": teacher.num_classes})

  @jax.jit
  def generate(params, x_T):
    denoise = lambda x, t: guided(params, x, t, label=jnp.array([1, 3]))  # noqa: E731
    return solvers.sample(denoise, x_T, schedule=teacher.schedule, solver="ddim", nfe=2)

  x0 = generate(teacher.params, jax.random.normal(jax.random.key(0), (2, 8, 8, 4)))
  assert x0.shape == (2, 8, 8, 4) and bool(jnp.all(jnp.isfinite(x0)))
  with pytest.raises(ImportError, match="needs torch"):
    (tmp_path / "model.pt").write_bytes(b"")
    interop.load(tmp_path / "model.pt")


def test_vae_folder_loads_without_torch_and_refuses_a_missing_key(tmp_path, no_torch):
  leaves = interop_vae.vae_leaves(dict(interop_vae._DEFAULTS, **VAE_CONFIG))
  state = _write(tmp_path, VAE_CONFIG, leaves)
  vae = interop.load(tmp_path)
  z = jax.jit(vae.to_latent)(vae.params, jnp.zeros((1, 8, 8, 3)))
  assert z.shape == (1, 4, 4, 4) and vae.scaling_factor == 0.18215
  del state["decoder.up_blocks.1.resnets.1.conv2.bias"]
  save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ValueError, match=r"missing key 'decoder\.up_blocks\.1\.resnets\.1\.conv2\.bias'"):
    interop.load(tmp_path)
