"""Per-example distances between a student's output and its target, shared by the distillation losses.

For x, y of shape [B, ...] with D entries per example:

    l2            mean_D (x - y)^2
    l1            mean_D |x - y|
    pseudo_huber  sqrt(|x - y|^2 + c^2) - c,   c = c_scale * sqrt(D)   (iCT: c = 0.00054 sqrt(D))

`get(name)` resolves a name (or passes a callable `fn(x, y) -> [B]` through: a feature distance
such as LPIPS plugs in there) before any tracing.

References:
  Song & Dhariwal, Improved Techniques for Training Consistency Models, ICLR 2024 (pseudo-Huber);
  Luhman & Luhman, Knowledge Distillation in Iterative Generative Models, 2021 (L1/L2).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Distance = Callable[[Array, Array], Array]
ICT_C_SCALE = 0.00054


def _flat(d: Array) -> Array:
  return d.reshape(d.shape[0], -1)


def l2(x: Array, y: Array) -> Array:
  """mean_D (x - y)^2, [B]."""
  return jnp.mean(jnp.square(_flat(x - y)), axis=1)


def l1(x: Array, y: Array) -> Array:
  """mean_D |x - y|, [B]."""
  return jnp.mean(jnp.abs(_flat(x - y)), axis=1)


def pseudo_huber(x: Array, y: Array, *, c_scale: float = ICT_C_SCALE) -> Array:
  """sqrt(|x - y|^2 + c^2) - c with c = c_scale sqrt(D), [B]."""
  d = _flat(x - y)
  c = c_scale * math.sqrt(d.shape[1])
  return jnp.sqrt(jnp.sum(jnp.square(d), axis=1) + c * c) - c


DISTANCES: dict[str, Distance] = {"l2": l2, "l1": l1, "pseudo_huber": pseudo_huber}


def get(distance: str | Distance, **kwargs) -> Distance:
  """A distance by name (DISTANCES; kwargs e.g. c_scale for pseudo_huber) or a callable as is."""
  if callable(distance):
    if kwargs:
      raise ValueError(f"distance options {sorted(kwargs)} apply to named distances only.")
    return distance
  if distance not in DISTANCES:
    raise ValueError(f"Unknown distance {distance!r}; expected one of {sorted(DISTANCES)} or a "
                     "callable fn(x, y) -> [B].")
  fn = DISTANCES[distance]
  if kwargs:
    if distance != "pseudo_huber":
      raise ValueError(f"distance {distance!r} takes no options, got {sorted(kwargs)}.")
    if kwargs.get("c_scale", ICT_C_SCALE) <= 0:
      raise ValueError(f"pseudo_huber c_scale must be > 0, got {kwargs['c_scale']}.")
    fn = functools.partial(fn, **kwargs)
  return fn


__all__ = ["l2", "l1", "pseudo_huber", "DISTANCES", "get", "ICT_C_SCALE"]
