"""DiT: the diffusion transformer of Peebles & Xie (2023), which also serves SiT (Ma et al. 2024).

Inputs are NHWC images or latents x [B, H, W, C] and times t [B]; the output has x's shape
([B, H, W, 2C] with `learn_sigma`). With p the patch size, D the width and T = HW / p^2 tokens:

  * patchify: z = Conv_pxp/stride p(x) + P, with P the fixed 2-D sin-cos position embedding
        P[(i, j)] = [s(j), s(i)],   s(u) = [sin(u w_k), cos(u w_k)],  w_k = 10000^(-k / (D/4))
    (the first half of the channels encodes the column j, the second the row i: MAE's layout);
  * conditioning: c = MLP(phi(time_scale * t)) [+ Embed(label)] [+ sum_n MLP_n(phi(time_scale * r_n))],
        phi(s) = [cos(s f_k), sin(s f_k)],  f_k = 10000^(-k / (128 - freq_shift)),  k < 128,
    MLP = Dense(D) silu Dense(D); the label table has num_classes + 1 rows, the last being the null
    class of classifier-free guidance; an extra input's MLP ends in a zero-initialized layer, so a
    student with extra_cond starts as the network it is initialized from (its params are a superset);
  * adaLN-Zero block, with LN a LayerNorm without affine parameters and m(h; a, b) = h (1 + b) + a:
        (a1, b1, g1, a2, b2, g2) = W silu(c) + bias           (W, bias zero-initialized)
        h <- h + g1 Attn(m(LN(h); a1, b1)),   h <- h + g2 MLP(m(LN(h); a2, b2))
    with multi-head attention `jax.nn.dot_product_attention` (differentiable forward-mode, so
    sCD and MeanFlow can take jvps through it) and a GELU(tanh) MLP of width mlp_ratio D;
  * final layer: y = W_out m(LN(h); a, b) with (a, b) = W silu(c) (both zero-initialized), then
    unpatchify each token's p x p x C_out values back to the image.

The network is built at init from x's shape: the token grid and position embedding follow
H / p x W / p, so the same params serve any resolution divisible by p.

Two details differ between the reference codes and are attributes here, so both are reproduced
exactly: the timestep frequencies (`freq_shift` 0: the original DiT / SiT code; 1: diffusers'
`DiTTransformer2DModel`) and the epsilon of the LayerNorm before the MLP (`mlp_norm_eps` 1e-6:
the original; 1e-5: diffusers). diffusers also gives each block its own timestep and label
embedder (identical copies in the converted checkpoints); `block_embeddings=True` reproduces that.

Time input. The network embeds time_scale * t. For the library's own training t is in [0, 1]
(`parametrization.net_inputs`), and time_scale = 1000 gives DDPM's embedding of the step index;
a DiT teacher feeds its integer timestep (time_scale = 1) and a SiT teacher its t in [0, 1]
(time_scale = 1); see `diffdistill.interop`.

References:
  Peebles & Xie, Scalable Diffusion Models with Transformers, ICCV 2023 (adaLN-Zero, Table 4).
  Ma et al., SiT: Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant
  Transformers, ECCV 2024.
  He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022 (2-D sin-cos embedding).
  Ho & Salimans, Classifier-Free Diffusion Guidance, 2022 (the null class).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

FREQUENCY_DIM = 256  # width of the sinusoidal timestep features (DiT's frequency_embedding_size)
_XAVIER = nn.initializers.xavier_uniform()
_ZERO = nn.initializers.zeros
_NORMAL = nn.initializers.normal(0.02)
# The patch embedding is initialized as the linear map it is (fan-in C p^2, fan-out D), as in DiT.
_PATCH_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                               out_axis=-1)


def sincos_position_embedding(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """The fixed 2-D sin-cos embedding [grid_h * grid_w, dim] (row-major tokens; module docstring)."""
  if dim % 4:
    raise ValueError(f"sincos_position_embedding: dim must be divisible by 4, got {dim}.")
  omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # [D/4]

  def one_axis(pos):  # [M] -> [M, D/2]
    phase = np.outer(pos, omega)
    return np.concatenate([np.sin(phase), np.cos(phase)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                           indexing="ij")
  return np.concatenate([one_axis(cols.reshape(-1)), one_axis(rows.reshape(-1))], axis=1)


def timestep_features(s: Array, *, dim: int = FREQUENCY_DIM, freq_shift: int = 0) -> Array:
  """phi(s) = [cos(s f_k), sin(s f_k)], f_k = 10000^(-k / (dim/2 - freq_shift)); [B] -> [B, dim].

  In at least float32 (bfloat16 phases would be wrong for s ~ 1000; float64 stays float64)."""
  half = dim // 2
  s = jnp.asarray(s)
  dtype = jnp.promote_types(s.dtype, jnp.float32) if jnp.issubdtype(s.dtype, jnp.floating) else jnp.float32
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=dtype) / (half - freq_shift))
  phase = s.astype(dtype)[:, None] * freqs[None, :]  # [B, dim/2]
  return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1)


def _layer_norm(eps: float, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, use_fast_variance=False,
                      dtype=dtype)


def _modulate(h: Array, shift: Array, scale: Array) -> Array:
  return h * (1.0 + scale[:, None, :]) + shift[:, None, :]


class TimestepEmbedder(nn.Module):
  """MLP(phi(s)) = W2 silu(W1 phi(s) + b1) + b2; [B] -> [B, D]. `zero_out` zero-initializes W2, b2."""

  hidden_size: int
  freq_shift: int = 0
  zero_out: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, s: Array) -> Array:
    h = timestep_features(s, freq_shift=self.freq_shift)
    h = nn.silu(nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_NORMAL, name="fc1")(h))
    last = _ZERO if self.zero_out else _NORMAL
    return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=last, name="fc2")(h)


class Conditioning(nn.Module):
  """c = TimestepEmbedder(time_scale t) [+ Embed(label)], label in [0, num_classes] (K = null)."""

  hidden_size: int
  num_classes: int = 0
  freq_shift: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, s: Array, label: Array | None) -> Array:
    c = TimestepEmbedder(self.hidden_size, self.freq_shift, dtype=self.dtype, name="t_embedder")(s)
    if self.num_classes:
      table = nn.Embed(self.num_classes + 1, self.hidden_size, embedding_init=_NORMAL,
                       name="y_embedder")
      c = c + table(label).astype(c.dtype)
    return c  # [B, D]


class DiTBlock(nn.Module):
  """One adaLN-Zero transformer block (module docstring); h [B, T, D], c [B, D] -> [B, T, D]."""

  num_heads: int
  mlp_ratio: float = 4.0
  mlp_norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, c: Array) -> Array:
    b, t, d = h.shape
    head_dim = d // self.num_heads
    mod = nn.Dense(6 * d, dtype=self.dtype, kernel_init=_ZERO, name="adaLN_modulation")(nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)  # each [B, D]

    a = _modulate(_layer_norm(1e-6, self.dtype)(h), shift1, scale1)
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=_XAVIER, name="attn_qkv")(a)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, self.num_heads, head_dim), 3, axis=2)  # [B, T, 1, N, H]
    a = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])  # [B, T, N, H]
    a = nn.Dense(d, dtype=self.dtype, kernel_init=_XAVIER, name="attn_proj")(a.reshape(b, t, d))
    h = h + gate1[:, None, :] * a

    m = _modulate(_layer_norm(self.mlp_norm_eps, self.dtype)(h), shift2, scale2)
    m = nn.Dense(int(d * self.mlp_ratio), dtype=self.dtype, kernel_init=_XAVIER, name="mlp_fc1")(m)
    m = nn.Dense(d, dtype=self.dtype, kernel_init=_XAVIER, name="mlp_fc2")(nn.gelu(m, approximate=True))
    return h + gate2[:, None, :] * m


class DiT(nn.Module):
  """Diffusion transformer: x [B, H, W, C], t [B] (, label [B]) -> [B, H, W, C] (2C: learn_sigma).

  Attributes:
    patch_size: p; H and W must be divisible by it.
    hidden_size: token width D (divisible by 4 and by num_heads).
    depth: number of adaLN-Zero blocks.
    num_heads: attention heads.
    mlp_ratio: MLP width / D.
    num_classes: K > 0 makes it class-conditional (labels 0..K-1, null class K).
    class_dropout: probability of replacing a label by the null class during training (active only
      when `make_apply` gets a dropout_rng; DiT trains with 0.1). 0 leaves it to the loss.
    learn_sigma: output 2C channels (DiT's eps and the interpolation of the variance).
    time_scale: the network embeds time_scale * t (1000 for t in [0, 1]; 1 for a step index).
    freq_shift: timestep frequencies f_k = 10000^(-k / (128 - freq_shift)) (0 original, 1 diffusers).
    mlp_norm_eps: epsilon of the LayerNorm before the MLP (1e-6 original, 1e-5 diffusers).
    block_embeddings: each block has its own timestep / label embedder; the final layer uses
      block 0's (diffusers' layout).
    dtype: computation dtype (params stay float32).
    extra_cond: names of extra scalar inputs (e.g. ("r",) for MeanFlow), each embedded as t is.
  """

  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 0
  class_dropout: float = 0.0
  learn_sigma: bool = False
  time_scale: float = 1000.0
  freq_shift: int = 0
  mlp_norm_eps: float = 1e-6
  block_embeddings: bool = False
  dtype: jnp.dtype = jnp.float32
  extra_cond: tuple[str, ...] = ()

  def _check(self, x, t, label, extra):
    if x.ndim != 4:
      raise ValueError(f"DiT: x must be NHWC images [B, H, W, C], got shape {x.shape}.")
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"DiT: H and W must be divisible by patch_size={p}, got {x.shape[1:3]}.")
    if self.hidden_size % 4 or self.hidden_size % self.num_heads:
      raise ValueError(f"DiT: hidden_size={self.hidden_size} must be divisible by 4 and by "
                       f"num_heads={self.num_heads}.")
    if set(extra or {}) != set(self.extra_cond):
      raise ValueError(f"extra conditioning inputs {sorted(extra or {})} do not match the network's "
                       f"extra_cond {sorted(self.extra_cond)}.")
    if not self.num_classes and label is not None:
      raise ValueError("label given to an unconditional network (num_classes=0).")
    if self.num_classes and (label is None or label.shape != t.shape):
      raise ValueError(f"a class-conditional network needs label of shape {t.shape} (use the null "
                       f"class {self.num_classes} for unconditional), got "
                       f"{None if label is None else label.shape}.")

  @nn.compact
  def __call__(self, x: Array, t: Array, label: Array | None = None, *,
               extra: dict[str, Array] | None = None, deterministic: bool = True) -> Array:
    self._check(x, t, label, extra)
    b, height, width, channels = x.shape
    p, d = self.patch_size, self.hidden_size
    gh, gw = height // p, width // p
    if self.num_classes and self.class_dropout > 0 and not deterministic:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.class_dropout, label.shape)
      label = jnp.where(drop, self.num_classes, label)

    h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=_PATCH_INIT, name="x_embedder")(x)  # [B, gh, gw, D]
    pos = jnp.asarray(sincos_position_embedding(d, gh, gw), h.dtype)
    h = h.reshape(b, gh * gw, d) + pos[None]  # [B, T, D]

    s = self.time_scale * t
    cond = lambda name: Conditioning(d, self.num_classes, self.freq_shift, self.dtype,  # noqa: E731
                                     name=name)(s, label)
    extra_c = 0.0
    for name in self.extra_cond:
      extra_c = extra_c + TimestepEmbedder(d, self.freq_shift, zero_out=True, dtype=self.dtype,
                                           name=f"{name}_embedder")(self.time_scale * extra[name])
    c_final = cond("block_0_cond" if self.block_embeddings else "cond") + extra_c  # [B, D]
    for i in range(self.depth):
      c = c_final if (i == 0 or not self.block_embeddings) else cond(f"block_{i}_cond") + extra_c
      h = DiTBlock(self.num_heads, self.mlp_ratio, self.mlp_norm_eps, self.dtype,
                   name=f"blocks_{i}")(h, c)

    out_channels = 2 * channels if self.learn_sigma else channels
    shift, scale = jnp.split(nn.Dense(2 * d, dtype=self.dtype, kernel_init=_ZERO,
                                      name="final_adaLN_modulation")(nn.silu(c_final)), 2, axis=-1)
    h = _modulate(_layer_norm(1e-6, self.dtype)(h), shift, scale)
    h = nn.Dense(p * p * out_channels, dtype=self.dtype, kernel_init=_ZERO, name="final_linear")(h)
    h = h.reshape(b, gh, gw, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, height, width, out_channels).astype(x.dtype)  # [B, H, W, C_out]


# Peebles & Xie (2023), Table 1: (depth, hidden_size, num_heads) of S / B / L / XL.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PRESETS = {f"{size}_{p}": dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=p)
           for size, (depth, width, heads) in SIZES.items() for p in (2, 4, 8)}

__all__ = ["DiT", "DiTBlock", "Conditioning", "TimestepEmbedder", "PRESETS", "SIZES",
           "sincos_position_embedding", "timestep_features", "FREQUENCY_DIM"]
