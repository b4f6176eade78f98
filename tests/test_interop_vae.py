"""The SD-VAE importer against diffusers' AutoencoderKL on random weights (float32, <= 1e-4)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_imports import import_diffusers

torch = pytest.importorskip("torch")
diffusers = import_diffusers()

from diffdistill import interop  # noqa: E402

pytestmark = pytest.mark.torch

CONFIG = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def _vae(tmp_path, seed=0, **kw):
  model = diffusers.AutoencoderKL(**{**CONFIG, **kw})
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # N(0, 1/fan_in) kernels, N(0, 0.5^2) norms and biases: nothing at its init
    for p in model.parameters():
      scale = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.5
      p.copy_(torch.randn(p.shape, generator=gen) * scale)
  model.eval().save_pretrained(tmp_path)
  return model


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.abs(out - ref).max() / np.abs(ref).max()


def _nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("kw", [{}, dict(mid_block_add_attention=False, use_quant_conv=False,
                                         use_post_quant_conv=False, scaling_factor=0.5, shift_factor=0.1)])
def test_vae_matches_diffusers(tmp_path, kw):
  model = _vae(tmp_path, **kw)
  vae = interop.load(tmp_path)
  assert isinstance(vae, interop.Autoencoder)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    decoded = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
  mean, logvar = jax.jit(vae.encode)(vae.params, jnp.asarray(x))
  out = jax.jit(vae.decode)(vae.params, jnp.asarray(z))
  errors = [_rel_err(mean, _nhwc(posterior.mean)), _rel_err(logvar, _nhwc(posterior.logvar)),
            _rel_err(out, _nhwc(decoded))]
  assert max(errors) <= 1e-4, errors
  scale, shift = model.config.scaling_factor, model.config.shift_factor or 0.0
  ref_latent = scale * (_nhwc(posterior.mean) - shift)
  assert _rel_err(vae.to_latent(vae.params, jnp.asarray(x)), ref_latent) <= 1e-4
  assert _rel_err(vae.from_latent(vae.params, scale * (jnp.asarray(z) - shift)), _nhwc(decoded)) <= 1e-4


def test_vae_reads_the_deprecated_attention_names(tmp_path):
  """Folders saved before diffusers 0.14 (some still on the Hub) name the mid attention
  query / key / value / proj_attn."""
  from safetensors.numpy import load_file, save_file
  _vae(tmp_path)
  path = tmp_path / "diffusion_pytorch_model.safetensors"
  reference = interop.load(tmp_path)
  renamed = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
             .replace("to_out.0", "proj_attn"): v for k, v in load_file(path).items()}
  save_file(renamed, path)
  vae = interop.load(tmp_path)
  assert vae.info["attention_names"] == "deprecated"
  jax.tree.map(np.testing.assert_array_equal, vae.params, reference.params)


def test_vae_refusals_name_the_key(tmp_path):
  from safetensors.numpy import load_file, save_file
  _vae(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, layers_per_block=2)))
  with pytest.raises(ValueError, match=r"missing key 'encoder\.down_blocks\.0\.resnets\.1\.norm1\.weight'"):
    interop.load(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(config, latent_channels=8)))
  with pytest.raises(ValueError, match=r"key 'encoder\.conv_out\.weight' has shape \(8, 16, 3, 3\)"):
    interop.load(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(config))
  path = tmp_path / "diffusion_pytorch_model.safetensors"
  state = load_file(path)
  state["decoder.extra.weight"] = np.zeros(2, np.float32)
  save_file(state, path)
  with pytest.raises(ValueError, match=r"unexpected key 'decoder\.extra\.weight'"):
    interop.load(tmp_path)
