"""The diffusers UNet2DModel importer against diffusers on random weights (float32, <= 1e-4)."""

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

SMALL = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
# The layout of google/ddpm-cifar10-32's config: one attention head per block, bottom-right
# padded downsampling, [sin, cos] features with frequencies 10000^(-k/(half-1)), eps 1e-6.
DDPM_STYLE = dict(attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                  norm_eps=1e-6)


def _unet(folder, seed=0, **kw):
  model = diffusers.UNet2DModel(**{**SMALL, **kw})
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # N(0, 1/fan_in) kernels, N(0, 0.5^2) norms and biases
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.5))
  model.eval().save_pretrained(folder)
  return model


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.abs(out - ref).max() / np.abs(ref).max()


def _compare(model, teacher, labels=None, seed=0):
  x = np.random.default_rng(seed).standard_normal((3, 8, 8, 3)).astype(np.float32)
  timesteps = np.array([0, 999, 417])
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps),
                class_labels=None if labels is None else torch.from_numpy(labels)).sample
  ref = ref.numpy().transpose(0, 2, 3, 1)
  cond = {} if labels is None else dict(class_labels=jnp.asarray(labels))
  out = jax.jit(teacher.raw)(teacher.params, jnp.asarray(x), jnp.asarray(timesteps), **cond)
  return x, timesteps, ref, _rel_err(out, ref)


@pytest.mark.parametrize("kw", [dict(attention_head_dim=4, num_class_embeds=3), DDPM_STYLE,
                                dict(DDPM_STYLE, add_attention=False, center_input_sample=True)])
def test_unet2d_matches_diffusers(tmp_path, kw):
  model = _unet(tmp_path, **kw)
  teacher = interop.load(tmp_path)
  labels = np.array([0, 2, 1]) if kw.get("num_class_embeds") else None
  _, _, _, err = _compare(model, teacher, labels)
  assert err <= 1e-4, err


def test_unet2d_pipeline_uses_its_scheduler(tmp_path):
  """A pipeline folder (unet/ + scheduler/): the denoiser reads the output as the scheduler's
  prediction type on its betas; here v on scaled-linear betas, x0 = sqrt(abar) x - sqrt(1 - abar) v."""
  model = _unet(tmp_path / "unet", **DDPM_STYLE)
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(
      _class_name="DDPMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule="scaled_linear", prediction_type="v_prediction")))
  teacher = interop.load(tmp_path)
  assert teacher.kind == "v" and teacher.family == "ddpm"
  x, timesteps, v, err = _compare(model, teacher)
  assert err <= 1e-4, err
  abar = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)[timesteps][:, None, None, None]
  expected = np.sqrt(abar) * x - np.sqrt(1 - abar) * v
  x0 = jax.jit(teacher.apply)(teacher.params, jnp.asarray(x), jnp.asarray((timesteps + 1) / 1000))
  assert _rel_err(x0, expected) <= 1e-4, _rel_err(x0, expected)


def test_unet2d_refusals_name_the_key(tmp_path):
  _unet(tmp_path, **DDPM_STYLE)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, block_out_channels=[8, 16, 32])))
  with pytest.raises(ValueError, match=r"key 'down_blocks\.2\.resnets\.0\.conv1\.weight' has shape \(16, 16, 3, 3\)"):
    interop.load(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(config, add_attention=False)))
  with pytest.raises(ValueError, match=r"unexpected key 'mid_block\.attentions\.0\.group_norm\.bias'"):
    interop.load(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(config, time_embedding_type="fourier")))
  with pytest.raises(ValueError, match="time_embedding_type='fourier' is not supported"):
    interop.load(tmp_path)
