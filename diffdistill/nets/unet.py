"""A U-Net in the DDPM++ style of Song et al. (2021) as configured by Karras et al. (EDM, 2022).

Inputs are NHWC images x [B, H, W, C] and times t [B]; the output has x's shape. The architecture
follows EDM's `SongUNet` with the standard encoder/decoder and resample filter [1, 1]:

  * conditioning: emb = silu(W2 silu(W1 (embed(t) [+ Embed(label)])))  (nets.embeddings), width
    model_channels * channel_mult_emb; labels 0..K-1 and the null label K (classifier-free guidance);
  * residual block (UNetBlock), skip scale 1/sqrt(2):
        h = conv3x3(resample(silu(GN(x))));  h = silu(GN(h + W emb));  h = conv3x3(dropout(h))
        x' = (h + skip(x)) / sqrt(2),   skip = conv1x1(resample(x)) if the shape changes, else x
    and, at the attention resolutions, one self-attention layer (single head by default)
        x'' = (x' + proj(softmax(q k^T / sqrt(c)) v)) / sqrt(2),  q, k, v = conv1x1(GN(x'));
  * encoder: conv3x3 stem; per level, a down-sampling block (2x2 average) after the first level
    and `num_blocks` blocks with model_channels * channel_mult[level] channels;
  * decoder: two blocks at the lowest resolution (the first with attention), then per level an
    up-sampling block (nearest neighbour) after the lowest one and num_blocks + 1 blocks, each
    taking the matching encoder activation concatenated on channels; attention on the last
    block of a level that is an attention resolution;
  * head: conv3x3(silu(GN(h))).
GroupNorm uses min(32, C / 4) groups and eps 1e-6. Kernels are Xavier-uniform; the last conv of
each residual branch, the attention projection and the head start at zero (EDM's init_zero is
1e-5 times Xavier: the same for practical purposes), so each block starts as the identity.
EDM's CIFAR-10 DDPM++ net (model_channels 128, channel_mult (2, 2, 2), 4 blocks, attention at
16x16, dropout 0.13) has about 56M parameters; `PRESETS["ddpmpp_cifar10"]`.

References:
  Ho et al., Denoising Diffusion Probabilistic Models, NeurIPS 2020 (the U-Net).
  Song et al., Score-Based Generative Modeling through SDEs, ICLR 2021 (DDPM++, skip scale 1/sqrt 2).
  Karras et al., Elucidating the Design Space of Diffusion Models, NeurIPS 2022 (Table 7, App. F.2).
  Wu & He, Group Normalization, ECCV 2018.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffdistill.nets.embeddings import ConditionEmbedding
from diffdistill.nets.remat import check_remat

Array = jax.Array

_XAVIER = nn.initializers.xavier_uniform()
_ATTN_INIT = nn.initializers.variance_scaling(0.2, "fan_avg", "uniform")  # EDM: sqrt(0.2) Xavier
_ZERO = nn.initializers.zeros
SKIP_SCALE = 1.0 / math.sqrt(2.0)


def _group_norm(channels: int, dtype) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=min(32, max(channels // 4, 1)), epsilon=1e-6, dtype=dtype)


def _downsample(x: Array) -> Array:
  """2x2 average pooling (EDM's resample filter [1, 1]); [B, H, W, C] -> [B, H/2, W/2, C]."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample(x: Array) -> Array:
  """Nearest-neighbour upsampling (the transpose of the [1, 1] filter); [B, H, W, C] -> [B, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class SelfAttention(nn.Module):
  """x + proj(softmax(q k^T / sqrt(c)) v) over the H*W positions, then the skip scale."""

  num_heads: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"SelfAttention: {c} channels do not split into num_heads={self.num_heads}.")
    ch = c // self.num_heads
    qkv = nn.Conv(3 * c, (1, 1), dtype=self.dtype, kernel_init=_ATTN_INIT)(_group_norm(c, self.dtype)(x))
    q, k, v = jnp.split(qkv.reshape(b, h * w, 3, self.num_heads, ch), 3, axis=2)  # [B, HW, 1, heads, ch]
    logits = jnp.einsum("bqhc,bkhc->bhqk", q[:, :, 0], k[:, :, 0]).astype(jnp.float32) / math.sqrt(ch)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, heads, HW, HW]
    a = jnp.einsum("bhqk,bkhc->bqhc", weights, v[:, :, 0]).reshape(b, h, w, c)
    return (x + nn.Conv(c, (1, 1), dtype=self.dtype, kernel_init=_ZERO)(a)) * SKIP_SCALE


class UNetBlock(nn.Module):
  """DDPM++ residual block (module docstring), optionally resampling and with self-attention."""

  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: int = 1
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, deterministic: bool = True) -> Array:
    resample = _upsample if self.up else (_downsample if self.down else (lambda a: a))
    c_in, c_out = x.shape[-1], self.out_channels
    h = nn.silu(_group_norm(c_in, self.dtype)(x))
    h = nn.Conv(c_out, (3, 3), dtype=self.dtype, kernel_init=_XAVIER)(resample(h))
    h = h + nn.Dense(c_out, dtype=self.dtype, kernel_init=_XAVIER)(emb)[:, None, None, :]
    h = nn.silu(_group_norm(c_out, self.dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = nn.Conv(c_out, (3, 3), dtype=self.dtype, kernel_init=_ZERO)(h)
    skip = x
    if c_out != c_in or self.up or self.down:
      skip = nn.Conv(c_out, (1, 1), dtype=self.dtype, kernel_init=_XAVIER)(resample(x))
    x = (h + skip) * SKIP_SCALE
    if self.attention:
      x = SelfAttention(self.num_heads, self.dtype)(x)
    return x


class UNet(nn.Module):
  """DDPM++ U-Net: x [B, H, W, C], t [B] (, label [B]) -> [B, H, W, C].

  Attributes:
    model_channels: base width (128 for CIFAR-10).
    channel_mult: width multiplier per resolution level; len(channel_mult) - 1 down-samplings.
    num_blocks: residual blocks per level in the encoder (num_blocks + 1 in the decoder).
    attn_resolutions: the spatial sizes (H >> level) at which blocks carry self-attention; the
      lowest level always gets one in the middle (as in DDPM++).
    dropout: dropout rate in the residual blocks (active only with a dropout_rng).
    channel_mult_emb: the conditioning vector has model_channels * channel_mult_emb channels.
    embedding / embedding_scale: the time embedding ('positional' or 'fourier'; nets.embeddings).
    num_classes: K > 0 makes it class-conditional (labels 0..K-1, null label K).
    num_heads: attention heads (EDM's DDPM++: 1).
    dtype: computation dtype (params stay float32; `nets.precision`).
    extra_cond: names of extra scalar inputs (e.g. ("w",) for guided distillation).
    remat: rematerialisation (`nets.remat`): "none", "block" (each residual block's activations
      are recomputed in the backward pass) or "full" (the whole network's, by `make_apply`).
  """

  model_channels: int = 128
  channel_mult: tuple[int, ...] = (2, 2, 2)
  num_blocks: int = 4
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.13
  channel_mult_emb: int = 4
  embedding: str = "positional"
  embedding_scale: float | None = None
  num_classes: int = 0
  num_heads: int = 1
  dtype: jnp.dtype = jnp.float32
  extra_cond: tuple[str, ...] = ()
  remat: str = "none"

  @nn.compact
  def __call__(self, x: Array, t: Array, label: Array | None = None, *,
               extra: dict[str, Array] | None = None, deterministic: bool = True) -> Array:
    check_remat(self.remat)
    if x.ndim != 4:
      raise ValueError(f"UNet: x must be NHWC images [B, H, W, C], got shape {x.shape}.")
    factor = 2 ** (len(self.channel_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"UNet: H and W must be divisible by 2^(len(channel_mult) - 1) = {factor}, "
                       f"got {x.shape[1:3]}.")
    cls = nn.remat(UNetBlock, static_argnums=(3,)) if self.remat == "block" else UNetBlock
    count = iter(range(10 ** 6))
    # explicit names: the remat'd class would otherwise rename every block's params
    block = lambda c, **kw: cls(c, num_heads=self.num_heads, dropout=self.dropout,  # noqa: E731
                                dtype=self.dtype, name=f"UNetBlock_{next(count)}", **kw)
    emb = ConditionEmbedding(self.model_channels, self.model_channels * self.channel_mult_emb,
                             self.embedding, self.embedding_scale, self.num_classes,
                             self.dtype, self.extra_cond)(t, label, extra)  # [B, E]
    det = (deterministic,)

    h = nn.Conv(self.model_channels, (3, 3), dtype=self.dtype, kernel_init=_XAVIER)(x)
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      res = x.shape[1] >> level
      if level > 0:
        h = block(h.shape[-1], down=True)(h, emb, *det)
        skips.append(h)
      for _ in range(self.num_blocks):
        h = block(self.model_channels * mult, attention=res in self.attn_resolutions)(h, emb, *det)
        skips.append(h)

    last = len(self.channel_mult) - 1
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = x.shape[1] >> level
      if level == last:
        h = block(h.shape[-1], attention=True)(h, emb, *det)
        h = block(h.shape[-1])(h, emb, *det)
      else:
        h = block(h.shape[-1], up=True)(h, emb, *det)
      for idx in range(self.num_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        attention = idx == self.num_blocks and res in self.attn_resolutions
        h = block(self.model_channels * mult, attention=attention)(h, emb, *det)

    h = nn.silu(_group_norm(h.shape[-1], self.dtype)(h))
    out = nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype, kernel_init=_ZERO)(h)
    return out.astype(x.dtype)  # [B, H, W, C]


PRESETS = {
    # Karras et al. 2022, CIFAR-10 32x32 DDPM++ (about 56M parameters).
    "ddpmpp_cifar10": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                           attn_resolutions=(16,), dropout=0.13),
    # A CPU-sized net for 8x8 digits: levels 8x8 and 4x4, attention at 4x4.
    "digits8": dict(model_channels=32, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,),
                    dropout=0.1),
}

__all__ = ["UNet", "UNetBlock", "SelfAttention", "PRESETS", "SKIP_SCALE"]
