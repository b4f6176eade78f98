"""Time (noise-level) embeddings: sinusoidal (transformer "positional") and random Fourier features.

Both map a scalar network time input s (shape [B]) to a [B, dim] feature vector:

    positional:  f_i = scale * max_positions^(-i / (dim/2 - 1)),  i = 0 .. dim/2 - 1
                 emb = [sin(f s), cos(f s)]
                 (endpoint=False: the exponent -i / (dim/2), EDM's ADM embedding)
    fourier:     f_i ~ N(0, scale^2) drawn once at init (a non-trainable constant),
                 emb = [sin(2 pi f s), cos(2 pi f s)]

Time scaling. The network sees whatever `parametrization.net_inputs` gives it: t itself for the
kinds x0/eps/v/flow/score (t in [0, 1] for VP, VE and rectified flow; [0, pi/2] for TrigFlow),
and c_noise = log(sigma/alpha) / 4 = -lambda / 8 for kind 'edm' (about [-1.55, 1.1] over EDM's
sigma range [0.002, 80]). Both are O(1)-wide ranges, so one default works for both:

  * positional, scale = 1000: on t in [0, 1] these are exactly DDPM's embedding of the step index
    1000 t (Ho et al. 2020; EDM's VP preconditioning uses 999 t); on c_noise the phases span a range
    2.6x wider with the same resolution per unit, so neighbouring noise levels stay distinguishable
    and the slowest frequency (1e-4 * 1000 = 0.1 rad per unit) still varies monotonically.
  * fourier, scale = 16: the value of Song et al. (2021) and EDM's NCSN++ (applied there to
    log-sigma-like inputs of the same O(1) width).

The EDM schedule used with a non-'edm' kind feeds t = sigma in [0.002, 80], which is not O(1):
use kind 'edm' there (which feeds c_noise), or lower `scale`.

References:
  Vaswani et al., Attention Is All You Need, 2017 (sinusoidal embedding).
  Ho et al., Denoising Diffusion Probabilistic Models, NeurIPS 2020 (embedding of the step index).
  Tancik et al., Fourier Features Let Networks Learn High Frequency Functions, NeurIPS 2020.
  Song et al., Score-Based Generative Modeling through SDEs, ICLR 2021 (Gaussian Fourier projection).
  Karras et al., Elucidating the Design Space of Diffusion Models, NeurIPS 2022 (PositionalEmbedding
  with endpoint, FourierEmbedding; c_noise = ln(sigma) / 4).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _as_batch_times(t: Array) -> Array:
  t = jnp.asarray(t, jnp.float32)
  if t.ndim != 1:
    raise ValueError(f"time input must have shape [B], got shape {t.shape}.")
  return t


class SinusoidalEmbedding(nn.Module):
  """emb = [sin(f s), cos(f s)], f_i = scale * max_positions^(-i/(dim/2 - 1)); [B] -> [B, dim].

  endpoint=False divides by dim/2 instead (the slowest frequency stops short of
  scale / max_positions), as EDM's PositionalEmbedding does by default (its DhariwalUNet).
  """

  dim: int
  scale: float = 1000.0
  max_positions: float = 10000.0
  endpoint: bool = True

  @nn.compact
  def __call__(self, t: Array) -> Array:
    if self.dim < 4 or self.dim % 2:
      raise ValueError(f"SinusoidalEmbedding: dim must be even and >= 4, got dim={self.dim}.")
    t = _as_batch_times(t)
    half = self.dim // 2
    denom = half - 1 if self.endpoint else half
    freqs = self.scale * jnp.exp(-math.log(self.max_positions) * jnp.arange(half) / denom)
    phase = t[:, None] * freqs[None, :]  # [B, dim/2]
    return jnp.concatenate([jnp.sin(phase), jnp.cos(phase)], axis=-1)


class FourierEmbedding(nn.Module):
  """Random Fourier features emb = [sin(2 pi f s), cos(2 pi f s)], f ~ N(0, scale^2); [B] -> [B, dim].

  The frequencies are drawn from `seed` when the module is traced, not stored as a variable: they
  are part of the architecture (like EDM's registered buffer), never trained, and never seen by an
  optimizer's weight decay. `freqs` gives them explicitly instead (dim/2 values; an imported
  checkpoint's buffer, e.g. EDM's NCSN++ `map_noise.freqs`; `scale` and `seed` are then unused).
  The phase is computed as t (2 pi f), 2 pi f rounded to float32 first, as EDM does.
  """

  dim: int
  scale: float = 16.0
  seed: int = 0
  freqs: tuple[float, ...] | None = None

  @nn.compact
  def __call__(self, t: Array) -> Array:
    if self.dim < 2 or self.dim % 2:
      raise ValueError(f"FourierEmbedding: dim must be even and >= 2, got dim={self.dim}.")
    t = _as_batch_times(t)
    if self.freqs is None:
      freqs = self.scale * jax.random.normal(jax.random.key(self.seed), (self.dim // 2,),
                                             jnp.float32)
    elif len(self.freqs) != self.dim // 2:
      raise ValueError(f"FourierEmbedding: freqs must hold dim/2 = {self.dim // 2} values, got "
                       f"{len(self.freqs)}.")
    else:
      freqs = jnp.asarray(self.freqs, jnp.float32)
    phase = t[:, None] * (2.0 * math.pi * freqs)[None, :]  # [B, dim/2]
    return jnp.concatenate([jnp.sin(phase), jnp.cos(phase)], axis=-1)


LABEL_POSITIONS = ("input", "output")
TIME_EMBEDDINGS = {"positional": SinusoidalEmbedding, "fourier": FourierEmbedding}
DEFAULT_SCALES = {"positional": 1000.0, "fourier": 16.0}


def time_embedding(kind: str, dim: int, scale: float | None = None, *,
                   endpoint: bool = True, freqs: tuple[float, ...] | None = None) -> nn.Module:
  """Builds a time embedding by name ('positional' or 'fourier'); scale=None takes its default;
  endpoint: the positional embedding's (SinusoidalEmbedding), ignored by 'fourier'; freqs: the
  Fourier embedding's explicit frequencies (FourierEmbedding), refused for 'positional'."""
  if kind not in TIME_EMBEDDINGS:
    raise ValueError(f"Unknown time embedding {kind!r}; expected one of {sorted(TIME_EMBEDDINGS)}.")
  scale = DEFAULT_SCALES[kind] if scale is None else scale
  if kind == "positional":
    if freqs is not None:
      raise ValueError("time_embedding: freqs is for the 'fourier' embedding, not 'positional'.")
    return SinusoidalEmbedding(dim=dim, scale=scale, endpoint=endpoint)
  return FourierEmbedding(dim=dim, scale=scale, freqs=freqs)


class ConditionEmbedding(nn.Module):
  """The shared conditioning vector of the MLP and the U-Net (EDM's SongUNet mapping network):

      e = time_embedding(s) [+ Embed(label)],   emb = silu(W2 silu(W1 e))        [B] -> [B, emb_dim]

  With `num_classes` = K > 0 the label table has K + 1 rows; row K is the null label of
  classifier-free guidance (Ho & Salimans 2022), trained by conditioning dropout in the loss.

  `extra` names further scalar inputs a distilled student is conditioned on (MeanFlow's r,
  a shortcut model's step size d, guided distillation's w, CTM's target time s). Each gets the
  same kind of embedding as t and a zero-initialized projection, e += W_n embed(c_n), so a student
  with extra inputs starts as the network it is initialized from (its params are a superset).

  `label_at` places the label: "input" adds Embed(label) (noise_dim wide) to the time embedding,
  as above (EDM's SongUNet); "output" adds it (emb_dim wide) after W2, before the last silu,
  emb = silu(W2 silu(W1 e) + Embed(label)) (EDM's DhariwalUNet, the ADM network). `endpoint`:
  the positional embedding's (SinusoidalEmbedding); `freqs`: the Fourier embedding's
  (FourierEmbedding).
  """

  noise_dim: int
  emb_dim: int
  embedding: str = "positional"
  scale: float | None = None
  num_classes: int = 0
  dtype: jnp.dtype = jnp.float32
  extra: tuple[str, ...] = ()
  label_at: str = "input"
  endpoint: bool = True
  freqs: tuple[float, ...] | None = None

  @nn.compact
  def __call__(self, t: Array, label: Array | None = None,
               extra: dict[str, Array] | None = None) -> Array:
    if self.label_at not in LABEL_POSITIONS:
      raise ValueError(f"label_at must be one of {LABEL_POSITIONS}, got {self.label_at!r}.")
    embed = lambda s: time_embedding(self.embedding, self.noise_dim, self.scale,  # noqa: E731
                                     endpoint=self.endpoint, freqs=self.freqs)(s)
    e = embed(t)  # [B, noise_dim]
    extra = extra or {}
    if set(extra) != set(self.extra):
      raise ValueError(f"extra conditioning inputs {sorted(extra)} do not match the network's "
                       f"extra_cond {sorted(self.extra)}.")
    for name in self.extra:
      c = embed(extra[name])
      e = e + nn.Dense(self.noise_dim, dtype=self.dtype, name=f"{name}_embed",
                       kernel_init=nn.initializers.zeros)(c)
    if not self.num_classes and label is not None:
      raise ValueError("label given to an unconditional network (num_classes=0).")
    if self.num_classes:
      if label is None or label.shape != t.shape:
        raise ValueError(f"a class-conditional network needs label of shape {t.shape} (use the null "
                         f"label {self.num_classes} for unconditional), got "
                         f"{None if label is None else label.shape}.")
    label_embed = lambda width: nn.Embed(self.num_classes + 1, width,  # noqa: E731
                                         name="label_embed")(label)
    if self.num_classes and self.label_at == "input":
      e = e + label_embed(self.noise_dim)
    dense = lambda name: nn.Dense(self.emb_dim, dtype=self.dtype, name=name,  # noqa: E731
                                  kernel_init=nn.initializers.xavier_uniform())  # as EDM's SongUNet
    e = dense("map1")(nn.silu(dense("map0")(e)))
    if self.num_classes and self.label_at == "output":
      e = e + label_embed(self.emb_dim)
    return nn.silu(e)  # [B, emb_dim]


__all__ = ["SinusoidalEmbedding", "FourierEmbedding", "TIME_EMBEDDINGS", "DEFAULT_SCALES",
           "time_embedding", "ConditionEmbedding"]
