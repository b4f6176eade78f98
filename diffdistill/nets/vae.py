"""The KL autoencoder of latent diffusion (the SD-VAE), encoder and decoder, in Flax.

Images x [B, H, W, C] in [-1, 1] map to the moments of a diagonal Gaussian posterior over latents
z [B, H/f, W/f, L] (f = 2^(levels - 1)), and latents back to images:

    encode:  (mean, logvar) = split(quant_conv(E(x))),  logvar clipped to [-30, 20]
    decode:  x_hat = D(post_quant_conv(z))

with E: conv3x3, then per level `layers_per_block` residual blocks and (but at the last level)
a stride-2 conv3x3 after padding the bottom and right by one; a middle of residual block,
single-head self-attention, residual block; GroupNorm, SiLU, conv3x3 to 2L channels. D mirrors it:
conv3x3, the middle, per level (widest first) layers_per_block + 1 residual blocks and (but at
the last level) nearest-neighbour 2x upsampling followed by a conv3x3; GroupNorm, SiLU, conv3x3.
A residual block is  h = conv(silu(GN(conv(silu(GN(x)))))),  out = skip(x) + h  (skip a 1x1 conv
when the width changes); attention is  x + W_o softmax(q k^T / sqrt(C)) v  on q, k, v = W GN(x).
GroupNorms have `norm_num_groups` groups and eps 1e-6. Latent diffusion trains on
z' = scaling_factor (z - shift_factor) (SD's 0.18215, no shift); that scaling belongs to the
teacher's wrapper (`diffdistill.interop`), not to this network.

References:
  Rombach et al., High-Resolution Image Synthesis with Latent Diffusion Models, CVPR 2022.
  Kingma & Welling, Auto-Encoding Variational Bayes, ICLR 2014.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

LOGVAR_RANGE = (-30.0, 20.0)


def _group_norm(groups: int, dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


def _conv(c: int, dtype, name: str, k: int = 3) -> nn.Conv:
  return nn.Conv(c, (k, k), padding=((k // 2, k // 2),) * 2, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """out = skip(x) + conv2(silu(GN2(conv1(silu(GN1(x))))))."""

  out_channels: int
  groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _conv(self.out_channels, self.dtype, "conv1")(nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x)))
    h = _conv(self.out_channels, self.dtype, "conv2")(nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, self.dtype, "conv_shortcut", k=1)(x)
    return x + h


class AttentionBlock(nn.Module):
  """x + W_o Attn(W_q GN(x), W_k GN(x), W_v GN(x)) over the H W positions, one head."""

  groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    a = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, h * w, 1, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)  # noqa: E731
    a = jax.nn.dot_product_attention(dense("to_q")(a), dense("to_k")(a), dense("to_v")(a),
                                     scale=1.0 / math.sqrt(c))  # [B, HW, 1, C]
    return x + dense("to_out")(a).reshape(b, h, w, c)


class MidBlock(nn.Module):
  """Residual block, self-attention (if `attention`), residual block; the width is kept."""

  groups: int = 32
  attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = AttentionBlock(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """x [B, H, W, C] -> the posterior moments [B, H/f, W/f, 2L] (before quant_conv)."""

  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  groups: int = 32
  mid_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _conv(self.block_out_channels[0], self.dtype, "conv_in")(x)
    for i, c in enumerate(self.block_out_channels):
      for j in range(self.layers_per_block):
        h = ResnetBlock(c, self.groups, self.dtype, name=f"down_{i}_resnets_{j}")(h)
      if i < len(self.block_out_channels) - 1:
        h = nn.Conv(c, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype,
                    name=f"down_{i}_downsample")(h)
    h = MidBlock(self.groups, self.mid_attention, self.dtype, name="mid")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(h))
    return _conv(2 * self.latent_channels, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
  """z [B, h, w, L] -> images [B, h f, w f, out_channels] (after post_quant_conv)."""

  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  out_channels: int = 3
  groups: int = 32
  mid_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    widths = tuple(reversed(self.block_out_channels))
    h = _conv(widths[0], self.dtype, "conv_in")(z)
    h = MidBlock(self.groups, self.mid_attention, self.dtype, name="mid")(h)
    for i, c in enumerate(widths):
      for j in range(self.layers_per_block + 1):
        h = ResnetBlock(c, self.groups, self.dtype, name=f"up_{i}_resnets_{j}")(h)
      if i < len(widths) - 1:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = _conv(c, self.dtype, f"up_{i}_upsample")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(h))
    return _conv(self.out_channels, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """The SD-VAE: `encode(x) -> (mean, logvar)`, `decode(z) -> x_hat` (module docstring).

  Call a method with `module.apply({"params": p}, x, method="encode")` (or "decode"); calling
  the module itself runs decode(mean of encode(x)), which `init` uses to build every parameter.

  Attributes:
    block_out_channels: widths per level (SD: (128, 256, 512, 512), f = 8).
    layers_per_block: residual blocks per encoder level (the decoder has one more).
    latent_channels: L (SD: 4).
    in_channels / out_channels: image channels.
    norm_num_groups: GroupNorm groups (SD: 32).
    mid_attention: self-attention in the middle blocks.
    use_quant_conv / use_post_quant_conv: the 1x1 convs around the latent (SD: both).
    dtype: computation dtype (params stay float32).
  """

  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  in_channels: int = 3
  out_channels: int = 3
  norm_num_groups: int = 32
  mid_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
              groups=self.norm_num_groups, mid_attention=self.mid_attention, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
    self.decoder = Decoder(out_channels=self.out_channels, **kw)
    if self.use_quant_conv:
      self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

  def encode(self, x: Array) -> tuple[Array, Array]:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"AutoencoderKL.encode: x must be [B, H, W, {self.in_channels}], got {x.shape}.")
    factor = 2 ** (len(self.block_out_channels) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"AutoencoderKL.encode: H and W must be divisible by {factor}, got {x.shape[1:3]}.")
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)  # each [B, H/f, W/f, L]
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: Array) -> Array:
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"AutoencoderKL.decode: z must be [B, h, w, {self.latent_channels}], got {z.shape}.")
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)  # [B, h f, w f, out_channels]

  def __call__(self, x: Array) -> Array:
    return self.decode(self.encode(x)[0])


__all__ = ["AutoencoderKL", "Encoder", "Decoder", "ResnetBlock", "AttentionBlock", "MidBlock",
           "LOGVAR_RANGE"]
