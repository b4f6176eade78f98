"""Training-time distributions of t on a schedule's [t_min, t_max], with densities (importance
weights between two of them), and the resolver that takes one or its name.

References:
  Karras et al., Elucidating the Design Space of Diffusion Models (EDM), NeurIPS 2022 (lognormal).
  Esser et al., Scaling Rectified Flow Transformers (logit-normal times), ICML 2024.
  Kingma et al., Variational Diffusion Models, NeurIPS 2021 (uniform in log-SNR).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri

from diffdistill.schedules.processes import Schedule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TimeSampler(abc.ABC):
  """A distribution over t in [t_min, t_max]; `log_density` is with respect to dt.

  Importance weights between two samplers for the same schedule follow as
  `importance_weight(t, target=..., proposal=..., schedule=...)`.
  """

  name: ClassVar[str] = "time_sampler"

  @abc.abstractmethod
  def sample(self, rng: Array, shape, *, schedule: Schedule, dtype=jnp.float32) -> Array:
    ...

  @abc.abstractmethod
  def log_density(self, t: Array, *, schedule: Schedule) -> Array:
    ...


def _abs_dlogsnr(schedule, t):
  return jnp.abs(schedule.d_logsnr(t))


@dataclasses.dataclass(frozen=True)
class UniformTime(TimeSampler):
  """t ~ U(t_min, t_max)."""

  name: ClassVar[str] = "uniform"

  def sample(self, rng, shape, *, schedule, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, schedule.t_min, schedule.t_max)

  def log_density(self, t, *, schedule):
    return jnp.full_like(jnp.asarray(t), -math.log(schedule.t_max - schedule.t_min))


@dataclasses.dataclass(frozen=True)
class LogNormalSigma(TimeSampler):
  """EDM training: ln(sigma / alpha) ~ N(p_mean, p_std^2), truncated to the schedule's range.

  Truncation is exact (inverse-CDF sampling between the two ends), so `log_density` is a true density.
  """

  p_mean: float = -1.2
  p_std: float = 1.2
  name: ClassVar[str] = "lognormal"

  def __post_init__(self):
    if self.p_std <= 0:
      raise ValueError(f"LogNormalSigma: p_std must be > 0, got {self.p_std}.")

  def _cdf_range(self, schedule, dtype):
    # ln sigma_hat = -lambda / 2; it grows with t.
    lo = (-0.5 * schedule.logsnr(jnp.asarray(schedule.t_min, dtype)) - self.p_mean) / self.p_std
    hi = (-0.5 * schedule.logsnr(jnp.asarray(schedule.t_max, dtype)) - self.p_mean) / self.p_std
    return ndtr(lo), ndtr(hi)

  def sample(self, rng, shape, *, schedule, dtype=jnp.float32):
    c_lo, c_hi = self._cdf_range(schedule, jnp.float32)
    u = jax.random.uniform(rng, shape, jnp.float32, c_lo, c_hi)
    log_sigma_hat = self.p_mean + self.p_std * ndtri(u)
    t = schedule.t_from_logsnr(-2.0 * log_sigma_hat)
    return jnp.clip(t, schedule.t_min, schedule.t_max).astype(dtype)

  def log_density(self, t, *, schedule):
    t = jnp.asarray(t)
    c_lo, c_hi = self._cdf_range(schedule, t.dtype)
    z = (-0.5 * schedule.logsnr(t) - self.p_mean) / self.p_std
    log_n = -0.5 * z * z - 0.5 * math.log(2 * math.pi) - math.log(self.p_std)
    return log_n - jnp.log(c_hi - c_lo) + jnp.log(0.5 * _abs_dlogsnr(schedule, t))


@dataclasses.dataclass(frozen=True)
class LogitNormalTime(TimeSampler):
  """SD3: u ~ N(mean, std^2), t = t_min + (t_max - t_min) * sigmoid(u)."""

  mean: float = 0.0
  std: float = 1.0
  name: ClassVar[str] = "logit_normal"

  def __post_init__(self):
    if self.std <= 0:
      raise ValueError(f"LogitNormalTime: std must be > 0, got {self.std}.")

  def sample(self, rng, shape, *, schedule, dtype=jnp.float32):
    u = self.mean + self.std * jax.random.normal(rng, shape, jnp.float32)
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * jax.nn.sigmoid(u)
    return t.astype(dtype)

  def log_density(self, t, *, schedule):
    t = jnp.asarray(t)
    width = schedule.t_max - schedule.t_min
    r = (t - schedule.t_min) / width
    u = jnp.log(r) - jnp.log1p(-r)
    z = (u - self.mean) / self.std
    log_n = -0.5 * z * z - 0.5 * math.log(2 * math.pi) - math.log(self.std)
    return log_n - jnp.log(r) - jnp.log1p(-r) - math.log(width)


@dataclasses.dataclass(frozen=True)
class UniformLogSNR(TimeSampler):
  """lambda ~ U(lambda(t_max), lambda(t_min)), t = t_from_logsnr(lambda)."""

  name: ClassVar[str] = "logsnr_uniform"

  def _range(self, schedule, dtype):
    return (schedule.logsnr(jnp.asarray(schedule.t_max, dtype)),
            schedule.logsnr(jnp.asarray(schedule.t_min, dtype)))

  def sample(self, rng, shape, *, schedule, dtype=jnp.float32):
    lo, hi = schedule.logsnr_min, schedule.logsnr_max
    if not np.isfinite(lo):
      raise ValueError(f"UniformLogSNR needs a finite logsnr at t_max; {schedule} has "
                       f"logsnr(t_max) = {lo}. Lower t_max.")
    lam = jax.random.uniform(rng, shape, jnp.float32, lo, hi)
    return jnp.clip(schedule.t_from_logsnr(lam), schedule.t_min, schedule.t_max).astype(dtype)

  def log_density(self, t, *, schedule):
    t = jnp.asarray(t)
    lo, hi = self._range(schedule, t.dtype)
    return jnp.log(_abs_dlogsnr(schedule, t)) - jnp.log(hi - lo)


TIME_SAMPLERS: dict[str, type[TimeSampler]] = {
    cls.name: cls for cls in (UniformTime, LogNormalSigma, LogitNormalTime, UniformLogSNR)
}


def get_time_sampler(name: str, **kwargs) -> TimeSampler:
  """Builds a training-time distribution by name: 'uniform', 'lognormal', 'logit_normal', 'logsnr_uniform'."""
  if name not in TIME_SAMPLERS:
    raise ValueError(f"Unknown time sampler {name!r}; expected one of {sorted(TIME_SAMPLERS)}.")
  try:
    return TIME_SAMPLERS[name](**kwargs)
  except TypeError as e:
    fields = [f.name for f in dataclasses.fields(TIME_SAMPLERS[name])]
    raise ValueError(f"Bad arguments for time sampler {name!r}: {e}. Accepted: {fields}.") from None


def resolve_time_sampler(sampler: "TimeSampler | str", argname: str = "time_sampler") -> TimeSampler:
  """A TimeSampler as given, or the one named (`get_time_sampler`); ValueError naming `argname`."""
  if isinstance(sampler, TimeSampler):
    return sampler
  if isinstance(sampler, str):
    return get_time_sampler(sampler)
  raise ValueError(f"{argname} must be a schedules.TimeSampler or one of "
                   f"{sorted(TIME_SAMPLERS)}, got {sampler!r}.")


def importance_weight(t: Array, *, target: TimeSampler, proposal: TimeSampler,
                      schedule: Schedule) -> Array:
  """p_target(t) / p_proposal(t): reweights a loss drawn with `proposal` times to `target`'s."""
  return jnp.exp(target.log_density(t, schedule=schedule) - proposal.log_density(t, schedule=schedule))


__all__ = ["TimeSampler", "UniformTime", "LogNormalSigma", "LogitNormalTime", "UniformLogSNR",
           "TIME_SAMPLERS", "get_time_sampler", "resolve_time_sampler", "importance_weight"]
