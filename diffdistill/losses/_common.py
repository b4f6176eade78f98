"""Pieces every distillation loss needs: the data of a batch and the forward noising.

    x0 = data(batch)                          # batch["x"] in at least float32
    cond = condition(batch)                   # {"label": batch["label"]} or {} (unconditional)
    x_t = noised(schedule, x0, t, eps)        # alpha(t) x0 + sigma(t) eps, t of shape [B]
    x_end = pushforward(flow_map, params, x, times=[1.0, 0.5, 0.0])   # a flow map's few-step sampler
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

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


def condition(batch: Mapping[str, Array]) -> dict[str, Array]:
  """The network conditioning a batch carries: {"label": batch["label"]} when it holds labels
  (a class-conditional teacher distilled over its labels), else {}; passed on as **cond."""
  return {"label": jnp.asarray(batch["label"])} if "label" in batch else {}


def noised(schedule: schedules_lib.Schedule, x0: Array, t: Array, eps: Array) -> Array:
  """x_t = alpha(t) x0 + sigma(t) eps, with t [B] (or scalar) broadcast against x0 [B, ...]."""
  tb = schedules_lib.broadcast_to(t, x0)
  return schedule.alpha(tb) * x0 + schedule.sigma(tb) * eps


def pushforward(flow_map: Callable[..., Array], params: Any, x: Array, *, times: Sequence[float],
                **cond) -> Array:
  """x <- flow_map(params, x, t_i, t_{i+1}, **cond) along the decreasing `times` (len - 1 calls,
  t and s passed as [B] arrays): the few-step sampler of every flow-map student (IMM's f(x; s, t),
  MeanFlow's z - (t - r) u, CTM's G at gamma = 0)."""
  times = [float(t) for t in times]
  if len(times) < 2 or any(b >= a for a, b in zip(times, times[1:])):
    raise ValueError(f"times must be decreasing with at least two entries, got {times}.")
  n = x.shape[0]
  for t, s in zip(times, times[1:]):
    x = flow_map(params, x, jnp.full((n,), t, x.dtype), jnp.full((n,), s, x.dtype), **cond)
  return x


__all__ = ["data", "noised", "pushforward"]
