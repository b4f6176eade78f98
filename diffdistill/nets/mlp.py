"""A residual MLP score network for low-dimensional data (2-D toys, the 64-D mixture).

    h_0 = W_in x
    h_{k+1} = h_k + W_k2 dropout(silu(LN(W_k1 silu(LN(h_k)) + U_k emb)))      k = 0 .. num_blocks-1
    out = W_out silu(LN(h_K))

with emb the conditioning vector of `ConditionEmbedding` (time, optional class label). W_k2 and
W_out start at zero, so every block starts as the identity and the network's first output is 0
(the usual zero-initialized residual branch: Goyal et al. 2017; EDM's init_zero). The output has
the input's shape [B, d]; what it means (eps, v, x0, flow, EDM's F) is the parametrization's
business (`parametrization.as_denoiser`).

References:
  He et al., Identity Mappings in Deep Residual Networks, ECCV 2016 (pre-activation blocks).
  Ba et al., Layer Normalization, 2016.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffdistill.nets.embeddings import ConditionEmbedding
from diffdistill.nets.remat import check_remat

Array = jax.Array


class MLPBlock(nn.Module):
  """One pre-activation residual block with the conditioning added between its two layers."""

  features: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, emb: Array, deterministic: bool = True) -> Array:
    r = nn.Dense(self.features, dtype=self.dtype)(nn.silu(nn.LayerNorm(dtype=self.dtype)(h)))
    r = r + nn.Dense(self.features, dtype=self.dtype)(emb)
    r = nn.silu(nn.LayerNorm(dtype=self.dtype)(r))
    r = nn.Dropout(self.dropout)(r, deterministic=deterministic)
    return h + nn.Dense(self.features, dtype=self.dtype, kernel_init=nn.initializers.zeros)(r)


class ScoreMLP(nn.Module):
  """Residual MLP: x [B, d], t [B] (-> [B, d]).

  Attributes:
    features: hidden width.
    num_blocks: number of residual blocks.
    emb_dim: width of the conditioning vector (time embedding: emb_dim as well).
    embedding: 'positional' or 'fourier' (see nets.embeddings for the time scaling).
    embedding_scale: None for the embedding's default (1000 positional, 16 fourier).
    num_classes: K > 0 makes it class-conditional with K + 1 labels (the last is the null label).
    dropout: dropout rate inside the blocks (active only when `make_apply` gets a dropout_rng).
    dtype: computation dtype (params stay float32).
    extra_cond: names of extra scalar inputs (e.g. ("r",) for MeanFlow; nets.embeddings).
    remat: rematerialisation (`nets.remat`): "none", "block" or "full".
  """

  features: int = 256
  num_blocks: int = 4
  emb_dim: int = 128
  embedding: str = "positional"
  embedding_scale: float | None = None
  num_classes: int = 0
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  extra_cond: tuple[str, ...] = ()
  remat: str = "none"

  @nn.compact
  def __call__(self, x: Array, t: Array, label: Array | None = None, *,
               extra: dict[str, Array] | None = None, deterministic: bool = True) -> Array:
    check_remat(self.remat)
    if x.ndim != 2:
      raise ValueError(f"ScoreMLP: x must have shape [B, d], got {x.shape}.")
    emb = ConditionEmbedding(self.emb_dim, self.emb_dim, self.embedding, self.embedding_scale,
                             self.num_classes, self.dtype, self.extra_cond)(t, label, extra)
    h = nn.Dense(self.features, dtype=self.dtype)(x)  # [B, features]
    cls = nn.remat(MLPBlock, static_argnums=(3,)) if self.remat == "block" else MLPBlock
    for i in range(self.num_blocks):  # explicit names: remat must not rename the params
      h = cls(self.features, self.dropout, self.dtype, name=f"MLPBlock_{i}")(h, emb, deterministic)
    h = nn.silu(nn.LayerNorm(dtype=self.dtype)(h))
    out = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
    return out.astype(x.dtype)  # [B, d]


__all__ = ["MLPBlock", "ScoreMLP"]
