"""The SD-VAE: a diffusers `AutoencoderKL` folder into `nets.AutoencoderKL` (no torch needed).

Latent teachers (DiT, SiT) run on z' = scaling_factor (z - shift_factor), z the posterior mean
(or a sample) of the encoder; images come back as decode(z' / scaling_factor + shift_factor).
The folder's config gives the architecture and the two factors (SD 1.x / DiT: 0.18215, no shift).

References:
  Rombach et al., High-Resolution Image Synthesis with Latent Diffusion Models, CVPR 2022.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffdistill import nets
from diffdistill.interop import _checkpoint as ckpt


def _conv(path, key, c_out, c_in, k=3):
  return [ckpt.Leaf((*path, "kernel"), (f"{key}.weight",), ((c_out, c_in, k, k),),
                    lambda w: w.transpose(2, 3, 1, 0)),
          ckpt.Leaf((*path, "bias"), (f"{key}.bias",), ((c_out,),), lambda b: b)]


def _norm(path, key, c):
  return [ckpt.Leaf((*path, "scale"), (f"{key}.weight",), ((c,),), lambda w: w),
          ckpt.Leaf((*path, "bias"), (f"{key}.bias",), ((c,),), lambda b: b)]


def _resnet(path, key, c_in, c_out):
  leaves = _norm((*path, "norm1"), f"{key}.norm1", c_in) + _conv((*path, "conv1"), f"{key}.conv1", c_out, c_in)
  leaves += _norm((*path, "norm2"), f"{key}.norm2", c_out)
  leaves += _conv((*path, "conv2"), f"{key}.conv2", c_out, c_out)
  if c_in != c_out:
    leaves += _conv((*path, "conv_shortcut"), f"{key}.conv_shortcut", c_out, c_in, k=1)
  return leaves


# diffusers' attention names, and those of folders saved before diffusers 0.14 (still on the Hub).
ATTENTION_NAMES = {"current": ("to_q", "to_k", "to_v", "to_out.0"),
                   "deprecated": ("query", "key", "value", "proj_attn")}


def _mid(path, key, c, attention, names):
  leaves = _resnet((*path, "resnets_0"), f"{key}.resnets.0", c, c)
  if attention:
    a = f"{key}.attentions.0"
    leaves += _norm((*path, "attentions_0", "group_norm"), f"{a}.group_norm", c)
    for flax_name, name in zip(("to_q", "to_k", "to_v", "to_out"), names):
      leaves += ckpt.linear((*path, "attentions_0", flax_name), f"{a}.{name}", c, c)
  return leaves + _resnet((*path, "resnets_1"), f"{key}.resnets.1", c, c)


def vae_leaves(cfg, *, attention_names=ATTENTION_NAMES["current"]):
  """Every tensor of a diffusers AutoencoderKL, mapped onto nets.AutoencoderKL's params."""
  widths, n = tuple(cfg["block_out_channels"]), cfg["layers_per_block"]
  lat, attn = cfg["latent_channels"], cfg["mid_block_add_attention"]
  e, d = ("encoder",), ("decoder",)
  leaves = _conv((*e, "conv_in"), "encoder.conv_in", widths[0], cfg["in_channels"])
  c = widths[0]
  for i, w in enumerate(widths):
    for j in range(n):
      leaves += _resnet((*e, f"down_{i}_resnets_{j}"), f"encoder.down_blocks.{i}.resnets.{j}", c, w)
      c = w
    if i < len(widths) - 1:
      leaves += _conv((*e, f"down_{i}_downsample"), f"encoder.down_blocks.{i}.downsamplers.0.conv", w, w)
  leaves += _mid((*e, "mid"), "encoder.mid_block", c, attn, attention_names)
  leaves += _norm((*e, "conv_norm_out"), "encoder.conv_norm_out", c)
  leaves += _conv((*e, "conv_out"), "encoder.conv_out", 2 * lat, c)
  if cfg["use_quant_conv"]:
    leaves += _conv(("quant_conv",), "quant_conv", 2 * lat, 2 * lat, k=1)
  if cfg["use_post_quant_conv"]:
    leaves += _conv(("post_quant_conv",), "post_quant_conv", lat, lat, k=1)
  c = widths[-1]
  leaves += _conv((*d, "conv_in"), "decoder.conv_in", c, lat)
  leaves += _mid((*d, "mid"), "decoder.mid_block", c, attn, attention_names)
  for i, w in enumerate(reversed(widths)):
    for j in range(n + 1):
      leaves += _resnet((*d, f"up_{i}_resnets_{j}"), f"decoder.up_blocks.{i}.resnets.{j}", c, w)
      c = w
    if i < len(widths) - 1:
      leaves += _conv((*d, f"up_{i}_upsample"), f"decoder.up_blocks.{i}.upsamplers.0.conv", w, w)
  leaves += _norm((*d, "conv_norm_out"), "decoder.conv_norm_out", c)
  leaves += _conv((*d, "conv_out"), "decoder.conv_out", cfg["out_channels"], c)
  return leaves


@dataclasses.dataclass(frozen=True)
class Autoencoder:
  """A loaded SD-VAE.

  encode(params, x) -> (mean, logvar): the posterior moments, [B, H/f, W/f, L] each (x NHWC in
    [-1, 1]); diffusers' `encode(x).latent_dist.mean / .logvar`.
  decode(params, z) -> x_hat: diffusers' `decode(z).sample`, NHWC.
  to_latent(params, x, rng=None) -> z' = scaling_factor (z - shift_factor), z the mean, or a
    posterior sample when rng is given: what a latent teacher is trained on.
  from_latent(params, z') -> decode(z' / scaling_factor + shift_factor): what metrics score.
  """

  params: Any
  encode: Callable[..., Any]
  decode: Callable[..., Any]
  to_latent: Callable[..., Any]
  from_latent: Callable[..., Any]
  scaling_factor: float
  shift_factor: float
  network: Any
  info: dict


_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1,
                 latent_channels=4, norm_num_groups=32, scaling_factor=0.18215, shift_factor=None,
                 use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
                 act_fn="silu")


def load_diffusers_vae(folder: str) -> Autoencoder:
  """An Autoencoder from a diffusers AutoencoderKL folder (config.json + safetensors)."""
  with open(os.path.join(folder, "config.json")) as f:
    cfg = {**_DEFAULTS, **{k: v for k, v in json.load(f).items() if v is not None}}
  if cfg["act_fn"] != "silu":
    raise ValueError(f"{folder}: config act_fn={cfg['act_fn']!r} is not supported (only 'silu').")
  for name, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    if any(t != kind for t in cfg.get(name, ())) or len(cfg.get(name, ())) != len(cfg["block_out_channels"]):
      raise ValueError(f"{folder}: config {name}={cfg.get(name)} is not supported (one {kind!r} "
                       "per entry of block_out_channels).")
  if cfg.get("latents_mean") is not None:
    raise ValueError(f"{folder}: per-channel latents_mean / latents_std are not supported.")
  state = ckpt.read_safetensors_folder(folder)
  style = "deprecated" if "encoder.mid_block.attentions.0.query.weight" in state else "current"
  params = ckpt.assemble(state, vae_leaves(cfg, attention_names=ATTENTION_NAMES[style]), source=folder)
  module = nets.AutoencoderKL(
      block_out_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
      latent_channels=cfg["latent_channels"], in_channels=cfg["in_channels"],
      out_channels=cfg["out_channels"], norm_num_groups=cfg["norm_num_groups"],
      mid_attention=cfg["mid_block_add_attention"], use_quant_conv=cfg["use_quant_conv"],
      use_post_quant_conv=cfg["use_post_quant_conv"])
  scale, shift = float(cfg["scaling_factor"]), float(cfg["shift_factor"] or 0.0)

  def encode(params, x):
    return module.apply({"params": params}, x, method="encode")

  def decode(params, z):
    return module.apply({"params": params}, z, method="decode")

  def to_latent(params, x, rng=None):
    mean, logvar = encode(params, x)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return scale * (z - shift)

  def from_latent(params, z):
    return decode(params, z / scale + shift)

  info = dict(format="diffusers", downsampling=2 ** (len(cfg["block_out_channels"]) - 1),
              latent_channels=cfg["latent_channels"], attention_names=style)
  return Autoencoder(params, encode, decode, to_latent, from_latent, scale, shift, module, info)


__all__ = ["Autoencoder", "load_diffusers_vae", "vae_leaves", "ATTENTION_NAMES"]
