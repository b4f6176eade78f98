"""DiT and SiT checkpoints into `nets.DiT`: diffusers `DiTTransformer2DModel` folders and the
original `.pt` state dicts of facebookresearch/DiT and willisma/SiT.

Both formats hold the same network (Peebles & Xie 2023) with different tensor names and two
numerical details (nets/dit.py): diffusers' timestep frequencies use 10000^(-k/127) instead of
10000^(-k/128) and its LayerNorm before the MLP has eps 1e-5 instead of 1e-6; each block of a
diffusers DiT also carries its own timestep / label embedder. The Flax network reproduces each
exactly, so outputs agree with the reference code to float32 rounding.

Teachers (the wrapping is `interop.Teacher`):
  * DiT: VP-discrete, 1000 linear betas 1e-4 .. 0.02 (DDPM); the network predicts eps (and, with
    learned sigma, the variance interpolation in channels C..2C, which the denoiser ignores) at the
    integer step i = 0..999, i.e. i = 1000 t - 1 on `schedules.VPDiscrete`'s time t = (i + 1)/1000.
  * SiT: the linear interpolant x_s = s x0 + (1 - s) eps, s in [0, 1] from noise to data, and the
    network predicts the velocity dx_s/ds = x0 - eps at s. The library's rectified flow runs the
    other way (x_t = (1 - t) x0 + t eps), so t = 1 - s and its flow output is u = -velocity.

References:
  Peebles & Xie, Scalable Diffusion Models with Transformers, ICCV 2023.
  Ma et al., SiT: Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant
  Transformers, ECCV 2024.
  Ho et al., Denoising Diffusion Probabilistic Models, NeurIPS 2020 (the linear betas).
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np

from diffdistill import nets, parametrization, schedules
from diffdistill.interop import _checkpoint as ckpt
from diffdistill.interop._network import network_apply
from diffdistill.nets import dit as dit_lib

# Heads of the published sizes (Peebles & Xie, Table 1), by width; other widths need num_heads.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
NUM_TRAIN_STEPS = 1000


def _conv(path, key, d, c, p):
  """A torch Conv2d (weight [D, C, p, p]) as a Flax Conv (kernel [p, p, C, D])."""
  return [ckpt.Leaf((*path, "kernel"), (f"{key}.weight",), ((d, c, p, p),),
                    lambda w: w.transpose(2, 3, 1, 0)),
          ckpt.Leaf((*path, "bias"), (f"{key}.bias",), ((d,),), lambda b: b)]


def _block_leaves(i, d, hidden, names):
  """One adaLN-Zero block; names maps the Flax layer to the checkpoint key of each format."""
  leaves = []
  path = (f"blocks_{i}",)
  if isinstance(names["attn_qkv"], tuple):  # diffusers: separate to_q, to_k, to_v
    q, k, v = names["attn_qkv"]
    leaves += [ckpt.Leaf((*path, "attn_qkv", "kernel"), (f"{q}.weight", f"{k}.weight", f"{v}.weight"),
                         ((d, d),) * 3, lambda *w: np.concatenate(w, 0).T),
               ckpt.Leaf((*path, "attn_qkv", "bias"), (f"{q}.bias", f"{k}.bias", f"{v}.bias"),
                         ((d,),) * 3, lambda *b: np.concatenate(b, 0))]
  else:
    leaves += ckpt.linear((*path, "attn_qkv"), names["attn_qkv"], 3 * d, d)
  leaves += ckpt.linear((*path, "attn_proj"), names["attn_proj"], d, d)
  leaves += ckpt.linear((*path, "mlp_fc1"), names["mlp_fc1"], hidden, d)
  leaves += ckpt.linear((*path, "mlp_fc2"), names["mlp_fc2"], d, hidden)
  leaves += ckpt.linear((*path, "adaLN_modulation"), names["adaLN_modulation"], 6 * d, d)
  return leaves


def _cond_leaves(path, t_fc1, t_fc2, table, d, num_classes):
  leaves = ckpt.linear((*path, "t_embedder", "fc1"), t_fc1, d, dit_lib.FREQUENCY_DIM)
  leaves += ckpt.linear((*path, "t_embedder", "fc2"), t_fc2, d, d)
  if num_classes:
    leaves.append(ckpt.Leaf((*path, "y_embedder", "embedding"), (f"{table}.weight",),
                            ((num_classes + 1, d),), lambda w: w))
  return leaves


# ---------------------------------------------------------------------------------------------
# The original DiT / SiT state dict.
# ---------------------------------------------------------------------------------------------


def original_leaves(*, d, c, p, depth, hidden, out_channels, num_classes):
  """Every tensor of a facebookresearch/DiT (or SiT) state dict but pos_embed, mapped."""
  leaves = _conv(("x_embedder",), "x_embedder.proj", d, c, p)
  leaves += _cond_leaves(("cond",), "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.embedding_table",
                         d, num_classes)
  for i in range(depth):
    leaves += _block_leaves(i, d, hidden, dict(
        attn_qkv=f"blocks.{i}.attn.qkv", attn_proj=f"blocks.{i}.attn.proj", mlp_fc1=f"blocks.{i}.mlp.fc1",
        mlp_fc2=f"blocks.{i}.mlp.fc2", adaLN_modulation=f"blocks.{i}.adaLN_modulation.1"))
  leaves += ckpt.linear(("final_adaLN_modulation",), "final_layer.adaLN_modulation.1", 2 * d, d)
  leaves += ckpt.linear(("final_linear",), "final_layer.linear", p * p * out_channels, d)
  return leaves


def _shape(state, key, source):
  if key not in state:
    raise ValueError(f"{source}: missing key {key!r}; not a DiT / SiT state dict.")
  return tuple(state[key].shape)


def load_original(path: str, *, num_heads: int | None = None):
  """(module, params, info) of an original DiT or SiT `.pt` state dict (the same network)."""
  state = ckpt.read_torch_state_dict(path)
  d, c, p, _ = _shape(state, "x_embedder.proj.weight", path)
  depth = 0
  while f"blocks.{depth}.attn.qkv.weight" in state:
    depth += 1
  hidden = _shape(state, "blocks.0.mlp.fc1.weight", path)[0]
  table = "y_embedder.embedding_table.weight"
  num_classes = state[table].shape[0] - 1 if table in state else 0
  out_channels = _shape(state, "final_layer.linear.weight", path)[0] // (p * p)
  if out_channels not in (c, 2 * c):
    raise ValueError(f"{path}: key 'final_layer.linear.weight' gives {out_channels} output "
                     f"channels; a DiT has {c} or {2 * c} (learned sigma).")
  num_heads = num_heads or HEADS_BY_WIDTH.get(d)
  if not num_heads:
    raise ValueError(f"{path}: hidden size {d} is not a published DiT size "
                     f"({sorted(HEADS_BY_WIDTH)}); pass num_heads=.")
  tokens = _shape(state, "pos_embed", path)
  grid = int(round(np.sqrt(tokens[1]))) if len(tokens) == 3 else 0
  if len(tokens) != 3 or tokens[0] != 1 or tokens[2] != d or grid * grid != tokens[1]:
    raise ValueError(f"{path}: key 'pos_embed' has shape {tokens}, expected (1, T, {d}) with T a square.")
  if not np.allclose(state["pos_embed"][0], dit_lib.sincos_position_embedding(d, grid, grid), atol=1e-5):
    raise ValueError(f"{path}: key 'pos_embed' is not the fixed 2-D sin-cos embedding the network uses.")
  leaves = original_leaves(d=d, c=c, p=p, depth=depth, hidden=hidden, out_channels=out_channels,
                           num_classes=num_classes)
  params = ckpt.assemble(state, leaves, ignore=("pos_embed",), source=path)
  module = nets.DiT(patch_size=p, hidden_size=d, depth=depth, num_heads=num_heads,
                    mlp_ratio=hidden / d, num_classes=num_classes, learn_sigma=out_channels == 2 * c,
                    time_scale=1.0)
  return module, params, dict(in_channels=c, input_size=grid * p, num_classes=num_classes,
                              learn_sigma=out_channels == 2 * c)


# ---------------------------------------------------------------------------------------------
# The diffusers DiTTransformer2DModel folder.
# ---------------------------------------------------------------------------------------------


def diffusers_leaves(cfg, *, tied):
  d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
  c, p, depth = cfg["in_channels"], cfg["patch_size"], cfg["num_layers"]
  out_channels = cfg.get("out_channels") or c
  k = cfg["num_embeds_ada_norm"]
  leaves = _conv(("x_embedder",), "pos_embed.proj", d, c, p)
  for i in range(depth):
    b = f"transformer_blocks.{i}"
    if i == 0 or not tied:
      e = f"{b}.norm1.emb"
      leaves += _cond_leaves(("cond",) if tied else (f"block_{i}_cond",), f"{e}.timestep_embedder.linear_1",
                             f"{e}.timestep_embedder.linear_2", f"{e}.class_embedder.embedding_table", d, k)
    leaves += _block_leaves(i, d, 4 * d, dict(
        attn_qkv=(f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v"),
        attn_proj=f"{b}.attn1.to_out.0", mlp_fc1=f"{b}.ff.net.0.proj", mlp_fc2=f"{b}.ff.net.2",
        adaLN_modulation=f"{b}.norm1.linear"))
  leaves += ckpt.linear(("final_adaLN_modulation",), "proj_out_1", 2 * d, d)
  leaves += ckpt.linear(("final_linear",), "proj_out_2", p * p * out_channels, d)
  return leaves


_SUPPORTED_CONFIG = dict(norm_type="ada_norm_zero", norm_elementwise_affine=False,
                         activation_fn="gelu-approximate", attention_bias=True)


def load_diffusers(folder: str):
  """(module, params, info) of a diffusers DiTTransformer2DModel folder (no torch needed)."""
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  for name, value in _SUPPORTED_CONFIG.items():
    if cfg.get(name, value) != value:
      raise ValueError(f"{folder}: config {name}={cfg[name]!r} is not supported (only {value!r}).")
  c = cfg.get("in_channels", 4)
  defaults = dict(num_attention_heads=16, attention_head_dim=72, in_channels=c, out_channels=None,
                  num_layers=28, patch_size=2, num_embeds_ada_norm=1000, norm_eps=1e-5, sample_size=32)
  cfg = {**defaults, **{k: v for k, v in cfg.items() if v is not None}}  # diffusers' defaults
  out_channels = cfg["out_channels"] or c
  if out_channels not in (c, 2 * c):
    raise ValueError(f"{folder}: config out_channels={out_channels}; a DiT has {c} or {2 * c}.")
  state = ckpt.read_safetensors_folder(folder)
  emb_keys = sorted(k for k in state if re.match(r"transformer_blocks\.0\.norm1\.emb\.", k))
  # Converted checkpoints repeat one embedder in every block: then it is stored once (the
  # copies are checked equal); otherwise each block keeps its own (block_embeddings).
  copy = lambda k, i: state.get(k.replace(".0.", f".{i}.", 1))  # noqa: E731
  tied = all(copy(k, i) is not None and np.array_equal(state[k], copy(k, i))
             for i in range(1, cfg["num_layers"]) for k in emb_keys)
  leaves = diffusers_leaves(cfg, tied=tied)
  ignore = [k for k in state if tied and re.match(r"transformer_blocks\.[1-9]\d*\.norm1\.emb\.", k)]
  params = ckpt.assemble(state, leaves, ignore=ignore, source=folder)
  d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
  module = nets.DiT(patch_size=cfg["patch_size"], hidden_size=d, depth=cfg["num_layers"],
                    num_heads=cfg["num_attention_heads"], num_classes=cfg["num_embeds_ada_norm"],
                    learn_sigma=out_channels == 2 * c, time_scale=1.0, freq_shift=1,
                    mlp_norm_eps=cfg["norm_eps"], block_embeddings=not tied)
  return module, params, dict(in_channels=c, input_size=cfg["sample_size"],
                              num_classes=cfg["num_embeds_ada_norm"], learn_sigma=out_channels == 2 * c)


# ---------------------------------------------------------------------------------------------
# Teachers.
# ---------------------------------------------------------------------------------------------


def dit_functions(module, info, *, label_name):
  """(raw, apply, schedule, make_net_apply): the network with DiT's conventions, its eps denoiser,
  and the factory of the eps network in the library's time (t in [0, 1] -> the step index
  1000 t - 1, the first C channels; interop._network) that the denoiser is
  `parametrization.as_denoiser` of."""
  net = nets.make_apply(module)
  channels = info["in_channels"]
  schedule = schedules.VPDiscrete.from_name("linear", NUM_TRAIN_STEPS)

  def raw(params, x, timestep, **cond):
    label = cond.pop(label_name, None)
    if cond:
      raise ValueError(f"unknown conditioning {sorted(cond)}; this network takes {label_name!r}.")
    return net(params, x, jnp.asarray(timestep, jnp.float32), label=label)  # [B, H, W, C or 2C]

  def make_net_apply(m):
    return network_apply(m, time_input=lambda t: NUM_TRAIN_STEPS * t - 1.0,
                         output=lambda y: y[..., :channels])

  denoise = parametrization.as_denoiser(make_net_apply(module), kind="eps", schedule=schedule)

  def apply(params, x, t, *, label=None):
    return denoise(params, x, t, label=label)

  return raw, apply, schedule, make_net_apply


def sit_functions(module, info):
  """(raw, apply, schedule, make_net_apply): SiT's velocity network (first C channels), its
  denoiser, and the factory of the velocity in the library's direction and time that the denoiser
  reads."""
  net = nets.make_apply(module)
  channels = info["in_channels"]
  schedule = schedules.RectifiedFlow()

  def raw(params, x, t, *, y=None):
    return net(params, x, jnp.asarray(t, jnp.float32), label=y)[..., :channels]  # [B, H, W, C]

  def make_net_apply(m):  # SiT's time runs the other way: s = 1 - t, u = -v
    return network_apply(m, time_input=lambda t: 1.0 - t, output=lambda y: -y[..., :channels])

  denoise = parametrization.as_denoiser(make_net_apply(module), kind="flow", schedule=schedule)

  def apply(params, x, t, *, label=None):
    return denoise(params, x, t, label=label)

  return raw, apply, schedule, make_net_apply


__all__ = ["load_original", "load_diffusers", "original_leaves", "diffusers_leaves",
           "dit_functions", "sit_functions", "HEADS_BY_WIDTH", "NUM_TRAIN_STEPS"]
