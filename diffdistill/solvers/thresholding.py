"""Dynamic thresholding (Imagen) as a denoiser combinator.

For each sample, s = max(quantile_p(|x0_hat|), data_max) over its coordinates, then

    x0_hat <- clip(x0_hat, -s, s) * data_max / s,

which keeps x0 predictions inside the data range [-data_max, data_max] without the saturation
of static clipping (useful under strong guidance).

References:
  Saharia et al., Photorealistic Text-to-Image Diffusion Models with Deep Language
  Understanding (Imagen), NeurIPS 2022, Sec. 2.3.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp


def dynamic_thresholding(denoise: Callable, *, percentile: float = 0.995,
                         data_max: float = 1.0) -> Callable:
  """Wraps a denoiser (any signature returning x0_hat [B, ...]) with Imagen's dynamic thresholding."""
  if not 0.0 < percentile <= 1.0:
    raise ValueError(f"percentile must lie in (0, 1], got {percentile}.")
  if data_max <= 0:
    raise ValueError(f"data_max must be > 0, got {data_max}.")

  def thresholded(*args, **kwargs):
    x0 = denoise(*args, **kwargs)
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), data_max)  # [B]
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return (jnp.clip(x0, -s, s) * (data_max / s)).astype(x0.dtype)

  return thresholded


__all__ = ["dynamic_thresholding"]
