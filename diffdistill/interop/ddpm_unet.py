"""diffusers `UNet2DModel` folders (the DDPM CIFAR-10 / CelebA-HQ / LSUN models) into
`nets.DDPMUNet`, wrapped with their scheduler's betas and prediction type.

The teacher: VP-discrete betas from the pipeline's scheduler/scheduler_config.json when the folder
sits in a pipeline (else DDPM's 1000 linear betas 1e-4 .. 0.02), the network's output read as its
`prediction_type` (epsilon -> eps, v_prediction -> v, sample -> x0) at the integer step
i = N t - 1 (`schedules.VPDiscrete` puts step i at t = (i + 1) / N).

References:
  Ho et al., Denoising Diffusion Probabilistic Models, NeurIPS 2020.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from diffdistill import nets, parametrization, schedules
from diffdistill.interop import _checkpoint as ckpt
from diffdistill.interop._network import network_apply
from diffdistill.interop.vae import ATTENTION_NAMES

# UNet2DModel's defaults (a key absent from config.json takes these, as in diffusers).
DEFAULTS = dict(in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
                time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                mid_block_type="UNetMidBlock2D",
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
                downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0,
                act_fn="silu", attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
                norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True,
                class_embed_type=None, num_class_embeds=None)
SUPPORTED = dict(time_embedding_type="positional", downsample_type="conv", upsample_type="conv",
                 act_fn="silu", resnet_time_scale_shift="default", class_embed_type=None)
PREDICTION_KINDS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _conv(path, key, c_out, c_in, k=3):
  return [ckpt.Leaf((*path, "kernel"), (f"{key}.weight",), ((c_out, c_in, k, k),),
                    lambda w: w.transpose(2, 3, 1, 0)),
          ckpt.Leaf((*path, "bias"), (f"{key}.bias",), ((c_out,),), lambda b: b)]


def _norm(path, key, c):
  return [ckpt.Leaf((*path, "scale"), (f"{key}.weight",), ((c,),), lambda w: w),
          ckpt.Leaf((*path, "bias"), (f"{key}.bias",), ((c,),), lambda b: b)]


def _resnet(path, key, c_in, c_out, emb_dim):
  leaves = _norm((*path, "norm1"), f"{key}.norm1", c_in) + _conv((*path, "conv1"), f"{key}.conv1", c_out, c_in)
  leaves += ckpt.linear((*path, "time_emb_proj"), f"{key}.time_emb_proj", c_out, emb_dim)
  leaves += _norm((*path, "norm2"), f"{key}.norm2", c_out)
  leaves += _conv((*path, "conv2"), f"{key}.conv2", c_out, c_out)
  if c_in != c_out:
    leaves += _conv((*path, "conv_shortcut"), f"{key}.conv_shortcut", c_out, c_in, k=1)
  return leaves


def _attention(path, key, c, names):
  leaves = _norm((*path, "group_norm"), f"{key}.group_norm", c)
  for flax_name, name in zip(("to_q", "to_k", "to_v", "to_out"), names):
    leaves += ckpt.linear((*path, flax_name), f"{key}.{name}", c, c)
  return leaves


def unet_leaves(cfg, *, attention_names=ATTENTION_NAMES["current"]):
  """Every tensor of a diffusers UNet2DModel, mapped onto nets.DDPMUNet's params."""
  widths, n = tuple(cfg["block_out_channels"]), cfg["layers_per_block"]
  emb = cfg["time_embedding_dim"] or 4 * widths[0]
  leaves = _conv(("conv_in",), "conv_in", widths[0], cfg["in_channels"])
  leaves += ckpt.linear(("time_linear_1",), "time_embedding.linear_1", emb, widths[0])
  leaves += ckpt.linear(("time_linear_2",), "time_embedding.linear_2", emb, emb)
  if cfg["num_class_embeds"]:
    leaves.append(ckpt.Leaf(("class_embedding", "embedding"), ("class_embedding.weight",),
                            ((cfg["num_class_embeds"], emb),), lambda w: w))
  c, skips = widths[0], [widths[0]]
  for i, (w, kind) in enumerate(zip(widths, cfg["down_block_types"])):
    for j in range(n):
      leaves += _resnet((f"down_{i}_resnets_{j}",), f"down_blocks.{i}.resnets.{j}", c, w, emb)
      if kind == "AttnDownBlock2D":
        leaves += _attention((f"down_{i}_attentions_{j}",), f"down_blocks.{i}.attentions.{j}", w,
                             attention_names)
      c = w
      skips.append(w)
    if i < len(widths) - 1:
      leaves += _conv((f"down_{i}_downsample",), f"down_blocks.{i}.downsamplers.0.conv", w, w)
      skips.append(w)
  if cfg["mid_block_type"]:
    leaves += _resnet(("mid_resnets_0",), "mid_block.resnets.0", c, c, emb)
    if cfg["add_attention"]:
      leaves += _attention(("mid_attentions_0",), "mid_block.attentions.0", c, attention_names)
    leaves += _resnet(("mid_resnets_1",), "mid_block.resnets.1", c, c, emb)
  for i, (w, kind) in enumerate(zip(reversed(widths), cfg["up_block_types"])):
    for j in range(n + 1):
      leaves += _resnet((f"up_{i}_resnets_{j}",), f"up_blocks.{i}.resnets.{j}", c + skips.pop(), w, emb)
      if kind == "AttnUpBlock2D":
        leaves += _attention((f"up_{i}_attentions_{j}",), f"up_blocks.{i}.attentions.{j}", w, attention_names)
      c = w
    if i < len(widths) - 1:
      leaves += _conv((f"up_{i}_upsample",), f"up_blocks.{i}.upsamplers.0.conv", w, w)
  leaves += _norm(("conv_norm_out",), "conv_norm_out", c)
  leaves += _conv(("conv_out",), "conv_out", cfg["out_channels"], c)
  return leaves


def read_config(folder):
  with open(os.path.join(folder, "config.json")) as f:
    cfg = {**DEFAULTS, **json.load(f)}
  for name, value in SUPPORTED.items():
    if cfg[name] != value:
      raise ValueError(f"{folder}: config {name}={cfg[name]!r} is not supported (only {value!r}).")
  if cfg["mid_block_type"] not in (None, "UNetMidBlock2D"):
    raise ValueError(f"{folder}: config mid_block_type={cfg['mid_block_type']!r} is not supported.")
  return cfg


def scheduler_of(folder):
  """(VPDiscrete, prediction kind) from the pipeline's scheduler config, if the folder has one."""
  cfg = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
             prediction_type="epsilon")
  for root in (folder, os.path.dirname(os.path.normpath(folder))):
    path = os.path.join(root, "scheduler", "scheduler_config.json")
    if os.path.exists(path):
      with open(path) as f:
        cfg.update({k: v for k, v in json.load(f).items() if k in cfg})
      break
  n, start, end = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
  if cfg["beta_schedule"] == "linear":
    betas = np.linspace(start, end, n, dtype=np.float64)
  elif cfg["beta_schedule"] == "scaled_linear":
    betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
  elif cfg["beta_schedule"] == "squaredcos_cap_v2":
    betas = np.asarray(schedules.VPDiscrete.from_name("cosine", n).betas)
  else:
    raise ValueError(f"{path}: beta_schedule={cfg['beta_schedule']!r} is not supported "
                     "('linear', 'scaled_linear', 'squaredcos_cap_v2').")
  if cfg["prediction_type"] not in PREDICTION_KINDS:
    raise ValueError(f"{path}: prediction_type={cfg['prediction_type']!r} is not supported "
                     f"({sorted(PREDICTION_KINDS)}).")
  return schedules.VPDiscrete(betas=tuple(betas)), PREDICTION_KINDS[cfg["prediction_type"]]


def load_diffusers_unet(folder: str, pipeline_root: str):
  """(module, params, raw, apply, schedule, kind, info, make_net_apply) of a UNet2DModel folder."""
  cfg = read_config(folder)
  state = ckpt.read_safetensors_folder(folder)
  style = "deprecated" if any(k.endswith(".query.weight") for k in state) else "current"
  params = ckpt.assemble(state, unet_leaves(cfg, attention_names=ATTENTION_NAMES[style]), source=folder)
  module = nets.DDPMUNet(
      block_out_channels=tuple(cfg["block_out_channels"]), down_block_types=tuple(cfg["down_block_types"]),
      up_block_types=tuple(cfg["up_block_types"]), layers_per_block=cfg["layers_per_block"],
      attention_head_dim=cfg["attention_head_dim"], norm_num_groups=cfg["norm_num_groups"],
      attn_norm_num_groups=cfg["attn_norm_num_groups"], norm_eps=cfg["norm_eps"],
      mid_block=cfg["mid_block_type"] is not None, add_attention=cfg["add_attention"],
      mid_block_scale_factor=cfg["mid_block_scale_factor"], downsample_padding=cfg["downsample_padding"],
      flip_sin_to_cos=cfg["flip_sin_to_cos"], freq_shift=cfg["freq_shift"],
      time_embedding_dim=cfg["time_embedding_dim"], num_classes=cfg["num_class_embeds"] or 0,
      center_input_sample=cfg["center_input_sample"], out_channels=cfg["out_channels"],
      dropout=cfg["dropout"], time_scale=1.0)
  schedule, kind = scheduler_of(pipeline_root)
  if cfg["out_channels"] != cfg["in_channels"]:
    raise ValueError(f"{folder}: out_channels={cfg['out_channels']} != in_channels={cfg['in_channels']}; "
                     "a denoiser needs the output in the input's shape.")
  net = nets.make_apply(module)
  steps = len(schedule.betas)

  def raw(params, x, timestep, *, class_labels=None):
    return net(params, x, jnp.asarray(timestep, jnp.float32), label=class_labels)  # [B, H, W, C]

  def make_net_apply(m):  # the library's time t in [0, 1] -> the step index
    return network_apply(m, time_input=lambda t: steps * t - 1.0)

  denoise = parametrization.as_denoiser(make_net_apply(module), kind=kind, schedule=schedule)

  def apply(params, x, t, *, label=None):
    return denoise(params, x, t, label=label)

  info = dict(format="diffusers", in_channels=cfg["in_channels"], sample_size=cfg.get("sample_size"),
              attention_names=style)
  return module, params, raw, apply, schedule, kind, info, make_net_apply


__all__ = ["load_diffusers_unet", "unet_leaves", "read_config", "scheduler_of", "DEFAULTS",
           "PREDICTION_KINDS"]
