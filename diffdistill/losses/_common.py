"""Pieces every distillation loss needs: the data of a batch and the forward noising.

    x0 = data(batch)                          # batch["x"] in at least float32
    x_t = noised(schedule, x0, t, eps)        # alpha(t) x0 + sigma(t) eps, t of shape [B]
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from diffdistill import schedules as schedules_lib

Array = jax.Array


def data(batch: Mapping[str, Array]) -> Array:
  """batch["x"] [B, ...] cast to at least float32; ValueError naming the keys if it is missing."""
  if "x" not in batch:
    raise ValueError(f"batch must hold 'x' (data samples); got keys {sorted(batch)}.")
  x0 = jnp.asarray(batch["x"])
  return x0.astype(jnp.promote_types(x0.dtype, jnp.float32))


def noised(schedule: schedules_lib.Schedule, x0: Array, t: Array, eps: Array) -> Array:
  """x_t = alpha(t) x0 + sigma(t) eps, with t [B] (or scalar) broadcast against x0 [B, ...]."""
  tb = schedules_lib.broadcast_to(t, x0)
  return schedule.alpha(tb) * x0 + schedule.sigma(tb) * eps


__all__ = ["data", "noised"]
