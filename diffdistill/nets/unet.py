"""A U-Net in the DDPM++ style of Song et al. (2021) as configured by Karras et al. (EDM, 2022).

Inputs are NHWC images x [B, H, W, C] and times t [B]; the output has x's shape. The architecture
follows EDM's `SongUNet` (by default DDPM++: standard encoder/decoder, resample filter [1, 1]):

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

`layout="adm"` is the ADM network of Dhariwal & Nichol (2021) as EDM writes it (`DhariwalUNet`,
the ImageNet-64 model): the same skeleton with adaptive group norm in the block,
h = silu(GN(h) (1 + s) + b) with (s, b) = W emb, skip scale 1, GroupNorm eps 1e-5, a resampled
skip without a projection when the width is kept, attention (one head per `channels_per_head`
channels; none below that width, as EDM) in every block of an attention resolution, decoder
included, the positional embedding without endpoint, and the label added after the mapping
network's second layer (nets.embeddings.ConditionEmbedding, label_at="output").
`PRESETS["adm_imagenet64"]` is EDM's ImageNet-64 configuration (about 296M parameters).

NCSN++ (Song et al.'s VE network as EDM writes it, `PRESETS["ncsnpp_cifar10"]`) is layout
"ddpmpp" with a Fourier embedding (`embedding="fourier"`, `channel_mult_noise=2`), the resample
filter (1, 3, 3, 1) (stride-2 filtering by outer(f, f) / sum(f)^2 and its transpose) and
`encoder="residual"`: the input image travels down beside the features, and after each
down-sampling block aux = h = (h + conv_down(aux)) / sqrt(2), conv_down a 3x3 conv padded by
1 + (len(f) - 1) / 2 then the filter at stride 2 without padding (EDM's fused resample).

References:
  Ho et al., Denoising Diffusion Probabilistic Models, NeurIPS 2020 (the U-Net).
  Song et al., Score-Based Generative Modeling through SDEs, ICLR 2021 (DDPM++, skip scale 1/sqrt 2).
  Karras et al., Elucidating the Design Space of Diffusion Models, NeurIPS 2022 (Table 7, App. F.2).
  Wu & He, Group Normalization, ECCV 2018.
  Dhariwal & Nichol, Diffusion Models Beat GANs on Image Synthesis, NeurIPS 2021 (ADM).
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
# what a layout fixes (module docstring): the skip scale, the GroupNorm eps, scale-shift norm,
# a 1x1 projection on every resampled skip, attention in every decoder block of an attention
# resolution (not only the last), the embedding's endpoint, where the label enters it, and the
# stem's width (model_channels, or model_channels * channel_mult[0])
LAYOUTS = {
    "ddpmpp": dict(skip_scale=SKIP_SCALE, eps=1e-6, adaptive_scale=False, resample_proj=True,
                   decoder_attention="last", endpoint=True, label_at="input", stem_mult=False),
    "adm": dict(skip_scale=1.0, eps=1e-5, adaptive_scale=True, resample_proj=False,
                decoder_attention="all", endpoint=False, label_at="output", stem_mult=True),
}


def _group_norm(channels: int, dtype, eps: float = 1e-6) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=min(32, max(channels // 4, 1)), epsilon=eps, dtype=dtype)


def _filter2d(taps: tuple[int, ...], channels: int, dtype) -> Array:
  """The separable resample filter outer(f, f) / sum(f)^2 as a depthwise HWIO kernel."""
  f = jnp.asarray(taps, jnp.float32)
  k = jnp.outer(f, f) / jnp.sum(f) ** 2
  return jnp.tile(k[:, :, None, None], (1, 1, 1, channels)).astype(dtype)


def check_resample_filter(taps: tuple[int, ...]) -> None:
  if len(taps) < 2 or len(taps) % 2 or tuple(taps) != tuple(reversed(taps)) or sum(taps) <= 0:
    raise ValueError(f"UNet: resample_filter must be a symmetric filter of even length >= 2 with a "
                     f"positive sum, e.g. (1, 1) (DDPM++) or (1, 3, 3, 1) (NCSN++); got {taps}.")


def _downsample(x: Array, taps: tuple[int, ...] = (1, 1), *, pad: int | None = None) -> Array:
  """Stride-2 filtering by outer(f, f) / sum(f)^2, zero padding (len(f) - 1) // 2 (EDM's Conv2d
  with down=True); [B, H, W, C] -> [B, H/2, W/2, C]. f = (1, 1) is 2x2 average pooling."""
  b, h, w, c = x.shape
  if tuple(taps) == (1, 1) and not pad:
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  p = (len(taps) - 1) // 2 if pad is None else pad
  return jax.lax.conv_general_dilated(x, _filter2d(taps, c, x.dtype), (2, 2), ((p, p), (p, p)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=c)


def _upsample(x: Array, taps: tuple[int, ...] = (1, 1)) -> Array:
  """The transposed filtering: stride-2 transposed convolution by 4 outer(f, f) / sum(f)^2,
  padding (len(f) - 1) // 2 (EDM's Conv2d with up=True); [B, H, W, C] -> [B, 2H, 2W, C].
  f = (1, 1) is nearest-neighbour upsampling."""
  if tuple(taps) == (1, 1):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  c, k = x.shape[-1], len(taps)
  q = k - 1 - (k - 1) // 2  # a transposed conv with padding p is a dilated conv padded k - 1 - p
  kernel = 4.0 * _filter2d(taps, c, x.dtype)[::-1, ::-1]
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((q, q), (q, q)), lhs_dilation=(2, 2),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=c)


class SelfAttention(nn.Module):
  """x + proj(softmax(q k^T / sqrt(c)) v) over the H*W positions, then the skip scale."""

  num_heads: int = 1
  dtype: jnp.dtype = jnp.float32
  skip_scale: float = SKIP_SCALE
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"SelfAttention: {c} channels do not split into num_heads={self.num_heads}.")
    ch = c // self.num_heads
    qkv = nn.Conv(3 * c, (1, 1), dtype=self.dtype,
                  kernel_init=_ATTN_INIT)(_group_norm(c, self.dtype, self.eps)(x))
    q, k, v = jnp.split(qkv.reshape(b, h * w, 3, self.num_heads, ch), 3, axis=2)  # [B, HW, 1, heads, ch]
    logits = jnp.einsum("bqhc,bkhc->bhqk", q[:, :, 0], k[:, :, 0]).astype(jnp.float32) / math.sqrt(ch)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, heads, HW, HW]
    a = jnp.einsum("bhqk,bkhc->bqhc", weights, v[:, :, 0]).reshape(b, h, w, c)
    return (x + nn.Conv(c, (1, 1), dtype=self.dtype, kernel_init=_ZERO)(a)) * self.skip_scale


class UNetBlock(nn.Module):
  """DDPM++ (or ADM) residual block (module docstring), optionally resampling and with
  self-attention (num_heads = 0: none)."""

  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: int = 1
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  layout: str = "ddpmpp"
  resample_filter: tuple[int, ...] = (1, 1)

  @nn.compact
  def __call__(self, x: Array, emb: Array, deterministic: bool = True) -> Array:
    lay = LAYOUTS[self.layout]
    norm = lambda c: _group_norm(c, self.dtype, lay["eps"])  # noqa: E731
    f = self.resample_filter
    resample = ((lambda a: _upsample(a, f)) if self.up else  # noqa: E731
                (lambda a: _downsample(a, f)) if self.down else (lambda a: a))
    c_in, c_out = x.shape[-1], self.out_channels
    h = nn.silu(norm(c_in)(x))
    h = nn.Conv(c_out, (3, 3), dtype=self.dtype, kernel_init=_XAVIER)(resample(h))
    width = 2 * c_out if lay["adaptive_scale"] else c_out
    p = nn.Dense(width, dtype=self.dtype, kernel_init=_XAVIER)(emb)[:, None, None, :]
    if lay["adaptive_scale"]:
      scale, shift = jnp.split(p, 2, axis=-1)
      h = nn.silu(norm(c_out)(h) * (scale + 1.0) + shift)
    else:
      h = nn.silu(norm(c_out)(h + p))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = nn.Conv(c_out, (3, 3), dtype=self.dtype, kernel_init=_ZERO)(h)
    skip = x
    if c_out != c_in or self.up or self.down:
      skip = resample(x)
      if lay["resample_proj"] or c_out != c_in:
        skip = nn.Conv(c_out, (1, 1), dtype=self.dtype, kernel_init=_XAVIER)(skip)
    x = (h + skip) * lay["skip_scale"]
    if self.attention and self.num_heads:
      x = SelfAttention(self.num_heads, self.dtype, lay["skip_scale"], lay["eps"])(x)
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
    channels_per_head: if set, each attention layer has width // channels_per_head heads
      instead (ADM: 64; a layer narrower than that has none, as in EDM's DhariwalUNet).
    layout: "ddpmpp" (EDM's SongUNet) or "adm" (EDM's DhariwalUNet); module docstring.
    channel_mult_noise: the time embedding is model_channels * channel_mult_noise wide (NCSN++: 2).
    encoder: "standard", or "residual" (NCSN++: the input image, filtered down level by level
      through a fused 3x3 conv + resample, is added to the features after each down-sampling
      block, aux = h = (h + conv_down(aux)) / sqrt(2); module docstring).
    resample_filter: the separable up/down-sampling filter ((1, 1): average pooling / nearest
      neighbour, DDPM++ and ADM; (1, 3, 3, 1): NCSN++).
    fourier_freqs: the Fourier embedding's explicit frequencies (an imported checkpoint's buffer;
      nets.embeddings.FourierEmbedding).
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
  channels_per_head: int | None = None
  layout: str = "ddpmpp"
  dtype: jnp.dtype = jnp.float32
  extra_cond: tuple[str, ...] = ()
  remat: str = "none"
  channel_mult_noise: int = 1
  encoder: str = "standard"
  resample_filter: tuple[int, ...] = (1, 1)
  fourier_freqs: tuple[float, ...] | None = None

  @nn.compact
  def __call__(self, x: Array, t: Array, label: Array | None = None, *,
               extra: dict[str, Array] | None = None, deterministic: bool = True) -> Array:
    check_remat(self.remat)
    if self.layout not in LAYOUTS:
      raise ValueError(f"UNet: layout must be one of {sorted(LAYOUTS)}, got {self.layout!r}.")
    lay = LAYOUTS[self.layout]
    if self.encoder not in ENCODERS:
      raise ValueError(f"UNet: encoder must be one of {ENCODERS}, got {self.encoder!r}.")
    check_resample_filter(self.resample_filter)
    if x.ndim != 4:
      raise ValueError(f"UNet: x must be NHWC images [B, H, W, C], got shape {x.shape}.")
    factor = 2 ** (len(self.channel_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"UNet: H and W must be divisible by 2^(len(channel_mult) - 1) = {factor}, "
                       f"got {x.shape[1:3]}.")
    cls = nn.remat(UNetBlock, static_argnums=(3,)) if self.remat == "block" else UNetBlock
    count = iter(range(10 ** 6))
    # explicit names: the remat'd class would otherwise rename every block's params
    heads = lambda c: (c // self.channels_per_head if self.channels_per_head  # noqa: E731
                       else self.num_heads)
    block = lambda c, **kw: cls(c, num_heads=heads(c), dropout=self.dropout,  # noqa: E731
                                dtype=self.dtype, layout=self.layout,
                                resample_filter=tuple(self.resample_filter),
                                name=f"UNetBlock_{next(count)}", **kw)
    emb = ConditionEmbedding(self.model_channels * self.channel_mult_noise,
                             self.model_channels * self.channel_mult_emb,
                             self.embedding, self.embedding_scale, self.num_classes,
                             self.dtype, self.extra_cond, label_at=lay["label_at"],
                             endpoint=lay["endpoint"],
                             freqs=self.fourier_freqs)(t, label, extra)  # [B, E]
    det = (deterministic,)

    stem = self.model_channels * (self.channel_mult[0] if lay["stem_mult"] else 1)
    h = nn.Conv(stem, (3, 3), dtype=self.dtype, kernel_init=_XAVIER)(x)
    skips, aux = [h], x
    for level, mult in enumerate(self.channel_mult):
      res = x.shape[1] >> level
      if level > 0:
        h = block(h.shape[-1], down=True)(h, emb, *det)
        if self.encoder == "residual":  # EDM's fused down conv: 3x3 conv padded 1 + f_pad, filter
          pad = 1 + (len(self.resample_filter) - 1) // 2
          a = nn.Conv(h.shape[-1], (3, 3), padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                      kernel_init=_XAVIER, name=f"aux_residual_{level}")(aux)
          h = aux = (h + _downsample(a, tuple(self.resample_filter), pad=0)) * SKIP_SCALE
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
        last_only = lay["decoder_attention"] == "last"
        attention = (idx == self.num_blocks or not last_only) and res in self.attn_resolutions
        h = block(self.model_channels * mult, attention=attention)(h, emb, *det)

    h = nn.silu(_group_norm(h.shape[-1], self.dtype, lay["eps"])(h))
    out = nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype, kernel_init=_ZERO)(h)
    return out.astype(x.dtype)  # [B, H, W, C]


ENCODERS = ("standard", "residual")

PRESETS = {
    # Karras et al. 2022, CIFAR-10 32x32 DDPM++ (about 56M parameters).
    "ddpmpp_cifar10": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                           attn_resolutions=(16,), dropout=0.13),
    # Karras et al. 2022's ImageNet-64 ADM (Dhariwal & Nichol's architecture; about 296M params).
    "adm_imagenet64": dict(layout="adm", model_channels=192, channel_mult=(1, 2, 3, 4),
                           num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.1,
                           channels_per_head=64),
    # Karras et al. 2022's CIFAR-10 NCSN++ (the VE baselines): Song et al. 2021's NCSN++ as EDM
    # writes it: Fourier embedding 256 wide, residual encoder, resample filter [1, 3, 3, 1].
    "ncsnpp_cifar10": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                           attn_resolutions=(16,), dropout=0.13, embedding="fourier",
                           channel_mult_noise=2, encoder="residual", resample_filter=(1, 3, 3, 1)),
    # A CPU-sized net for 8x8 digits: levels 8x8 and 4x4, attention at 4x4.
    "digits8": dict(model_channels=32, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,),
                    dropout=0.1),
}

__all__ = ["UNet", "UNetBlock", "SelfAttention", "PRESETS", "SKIP_SCALE", "LAYOUTS", "ENCODERS",
           "check_resample_filter"]
