"""The DDPM U-Net as diffusers' `UNet2DModel` lays it out (Ho et al. 2020), in Flax.

This is the network of the public DDPM checkpoints (CIFAR-10, CelebA-HQ, LSUN) that diffusers
distributes; `nets.UNet` is the DDPM++ network of EDM instead. x [B, H, W, C], t [B] (, label [B])
-> [B, H, W, out_channels]:

  * time: phi(time_scale t) with phi = sinusoidal features of width block_out_channels[0]
    (frequencies 10000^(-k / (half - freq_shift)), [sin, cos] or [cos, sin] if flip_sin_to_cos),
    then emb = W2 silu(W1 phi + b1) + b2 [+ Embed(label)];
  * residual block: h = conv(silu(GN(x))) + W silu(emb);  h = conv(dropout(silu(GN(h))));
    out = (skip(x) + h) / output_scale (skip a 1x1 conv when the width changes);
  * attention block (multi-head, head width attention_head_dim or the block width):
    out = (x + W_o MHA(W_q GN(x), W_k GN(x), W_v GN(x))) / output_scale;
  * encoder: conv3x3, then per level `layers_per_block` residual blocks (each followed by attention
    in an 'AttnDownBlock2D') and, but at the last level, a stride-2 conv3x3 (symmetric padding 1,
    or bottom-right padding with downsample_padding 0), every output kept for the skips;
  * middle: residual block, attention (add_attention), residual block, with mid_block_scale_factor;
  * decoder: per level (widest first) layers_per_block + 1 residual blocks, each on the
    concatenation of h and the latest unused skip (with attention in an 'AttnUpBlock2D'), then, but
    at the last level, nearest 2x upsampling and a conv3x3;
  * head: conv3x3(silu(GN(h))).
GroupNorms have norm_num_groups groups and eps norm_eps.

References:
  Ho et al., Denoising Diffusion Probabilistic Models, NeurIPS 2020 (the U-Net, Appendix B).
  von Platen et al., Diffusers: State-of-the-art diffusion models, 2022 (the UNet2DModel layout).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")


def _group_norm(groups, eps, dtype, name):
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def _conv(c, dtype, name, k=3):
  return nn.Conv(c, (k, k), padding=((k // 2, k // 2),) * 2, dtype=dtype, name=name)


class ResBlock(nn.Module):
  """The residual block with the time embedding added after the first conv (module docstring)."""

  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  output_scale: float = 1.0
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, *, deterministic: bool) -> Array:
    c = self.out_channels
    h = _conv(c, self.dtype, "conv1")(nn.silu(_group_norm(self.groups, self.eps, self.dtype, "norm1")(x)))
    h = h + nn.Dense(c, dtype=self.dtype, name="time_emb_proj")(nn.silu(emb))[:, None, None, :]
    h = nn.silu(_group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
    h = _conv(c, self.dtype, "conv2")(nn.Dropout(self.dropout)(h, deterministic=deterministic))
    if x.shape[-1] != c:
      x = _conv(c, self.dtype, "conv_shortcut", k=1)(x)
    return (x + h) / self.output_scale


class AttnBlock(nn.Module):
  """(x + W_o MHA(GN(x))) / output_scale over the H W positions, heads of width head_dim."""

  head_dim: int
  groups: int = 32
  eps: float = 1e-6
  output_scale: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    if c % self.head_dim:
      raise ValueError(f"AttnBlock: {c} channels do not split into heads of width {self.head_dim}.")
    heads = c // self.head_dim
    a = _group_norm(self.groups, self.eps, self.dtype, "group_norm")(x).reshape(b, h * w, c)
    def split(name):  # [B, HW, heads, head_dim]
      return nn.Dense(c, dtype=self.dtype, name=name)(a).reshape(b, h * w, heads, self.head_dim)

    a = jax.nn.dot_product_attention(split("to_q"), split("to_k"), split("to_v"))  # [B, HW, heads, hd]
    a = nn.Dense(c, dtype=self.dtype, name="to_out")(a.reshape(b, h * w, c)).reshape(b, h, w, c)
    return (x + a) / self.output_scale


class DDPMUNet(nn.Module):
  """diffusers' UNet2DModel (positional time embedding, 'default' time shift, conv resampling).

  Attributes mirror UNet2DModel's config: block_out_channels, down_block_types (each 'DownBlock2D'
  or 'AttnDownBlock2D'), up_block_types ('UpBlock2D' / 'AttnUpBlock2D'), layers_per_block,
  attention_head_dim (None: one head per block), norm_num_groups, attn_norm_num_groups (middle
  attention; None: norm_num_groups), norm_eps, mid_block (False: no middle), add_attention,
  mid_block_scale_factor, downsample_padding, flip_sin_to_cos, freq_shift, time_embedding_dim
  (None: 4 block_out_channels[0]), num_classes (a label table of num_classes rows, no null class
  unless the checkpoint has one), center_input_sample (x -> 2x - 1 first), out_channels (None: C),
  dropout. time_scale: the network embeds time_scale * t (1 for a step index).
  """

  block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
  down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
  up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
  layers_per_block: int = 2
  attention_head_dim: int | None = None
  norm_num_groups: int = 32
  attn_norm_num_groups: int | None = None
  norm_eps: float = 1e-6
  mid_block: bool = True
  add_attention: bool = True
  mid_block_scale_factor: float = 1.0
  downsample_padding: int = 0
  flip_sin_to_cos: bool = False
  freq_shift: int = 1
  time_embedding_dim: int | None = None
  num_classes: int = 0
  center_input_sample: bool = False
  out_channels: int | None = None
  dropout: float = 0.0
  time_scale: float = 1000.0
  dtype: jnp.dtype = jnp.float32
  extra_cond: tuple[str, ...] = ()

  def _embed_time(self, t):
    half = self.block_out_channels[0] // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - self.freq_shift))
    phase = (self.time_scale * t.astype(jnp.float32))[:, None] * freqs[None, :]  # [B, half]
    parts = [jnp.cos(phase), jnp.sin(phase)] if self.flip_sin_to_cos else [jnp.sin(phase), jnp.cos(phase)]
    return jnp.concatenate(parts, axis=-1)

  @nn.compact
  def __call__(self, x: Array, t: Array, label: Array | None = None, *,
               extra: dict[str, Array] | None = None, deterministic: bool = True) -> Array:
    levels = len(self.block_out_channels)
    if x.ndim != 4:
      raise ValueError(f"DDPMUNet: x must be NHWC images [B, H, W, C], got shape {x.shape}.")
    if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
      raise ValueError(f"DDPMUNet: H and W must be divisible by {2 ** (levels - 1)}, got {x.shape[1:3]}.")
    if extra:
      raise ValueError(f"DDPMUNet takes no extra conditioning, got {sorted(extra)}.")
    if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
      raise ValueError("DDPMUNet: down_block_types and up_block_types need one entry per block_out_channels.")
    for name, types, known in (("down_block_types", self.down_block_types, DOWN_TYPES),
                               ("up_block_types", self.up_block_types, UP_TYPES)):
      if any(kind not in known for kind in types):
        raise ValueError(f"DDPMUNet: {name}={types}; supported entries {list(known)}.")
    if bool(self.num_classes) != (label is not None):
      raise ValueError(f"DDPMUNet: num_classes={self.num_classes} but label is "
                       f"{'missing' if label is None else 'given'}.")
    widths, g, eps = self.block_out_channels, self.norm_num_groups, self.norm_eps
    res = lambda c, name, scale=1.0: ResBlock(  # noqa: E731
        c, g, eps, scale, self.dropout, self.dtype, name=name)
    attn = lambda c, name, groups=g, scale=1.0: AttnBlock(  # noqa: E731
        self.attention_head_dim or c, groups, eps, scale, self.dtype, name=name)
    det = dict(deterministic=deterministic)

    emb_dim = self.time_embedding_dim or 4 * widths[0]
    emb = nn.Dense(emb_dim, dtype=self.dtype, name="time_linear_1")(self._embed_time(t))
    emb = nn.Dense(emb_dim, dtype=self.dtype, name="time_linear_2")(nn.silu(emb))  # [B, E]
    if self.num_classes:
      emb = emb + nn.Embed(self.num_classes, emb_dim, name="class_embedding")(label).astype(emb.dtype)

    h = 2.0 * x - 1.0 if self.center_input_sample else x
    h = _conv(widths[0], self.dtype, "conv_in")(h)
    skips = [h]
    for i, (c, kind) in enumerate(zip(widths, self.down_block_types)):
      for j in range(self.layers_per_block):
        h = res(c, f"down_{i}_resnets_{j}")(h, emb, **det)
        if kind == "AttnDownBlock2D":
          h = attn(c, f"down_{i}_attentions_{j}")(h)
        skips.append(h)
      if i < levels - 1:
        pad = ((1, 1), (1, 1)) if self.downsample_padding else ((0, 1), (0, 1))
        h = nn.Conv(c, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype, name=f"down_{i}_downsample")(h)
        skips.append(h)

    if self.mid_block:
      s = self.mid_block_scale_factor
      h = res(widths[-1], "mid_resnets_0", s)(h, emb, **det)
      if self.add_attention:
        h = attn(widths[-1], "mid_attentions_0", self.attn_norm_num_groups or g, s)(h)
      h = res(widths[-1], "mid_resnets_1", s)(h, emb, **det)

    for i, (c, kind) in enumerate(zip(reversed(widths), self.up_block_types)):
      for j in range(self.layers_per_block + 1):
        h = res(c, f"up_{i}_resnets_{j}")(jnp.concatenate([h, skips.pop()], axis=-1), emb, **det)
        if kind == "AttnUpBlock2D":
          h = attn(c, f"up_{i}_attentions_{j}")(h)
      if i < levels - 1:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = _conv(c, self.dtype, f"up_{i}_upsample")(h)

    h = nn.silu(_group_norm(g, eps, self.dtype, "conv_norm_out")(h))
    out = _conv(self.out_channels or x.shape[-1], self.dtype, "conv_out")(h)
    return out.astype(x.dtype)  # [B, H, W, C_out]


__all__ = ["DDPMUNet", "ResBlock", "AttnBlock", "DOWN_TYPES", "UP_TYPES"]
