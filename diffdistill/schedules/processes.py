"""Forward processes x_t = alpha(t) x0 + sigma(t) eps (the training-time distributions of t are
in `time_samplers`; both are exported by `diffdistill.schedules`).

Every schedule is a frozen (hashable) dataclass, so it can be passed as a static argument
to `jax.jit`; its methods take arrays of t and are traceable. Everything a solver needs
follows from `alpha`, `sigma` and the half-log-SNR pair `logsnr` / `t_from_logsnr`:

    logsnr(t) = lambda(t) = 2 log(alpha(t) / sigma(t)),   t_from_logsnr(logsnr(t)) = t.

Time derivatives (`d_alpha`, `d_sigma`, `d_logsnr`) come from `jax.jvp` of the closed forms.

Valid times. Every method of t is defined on [t_min, t_max] only. A concrete t outside it (up to
rounding in t's dtype) is a ValueError; a traced t cannot be checked, and outside the range gives
numbers without meaning (e.g. VPLinear.sigma(-0.5) = 0.955): keep traced times in range.
Functions that take a schedule also take its registry name (`resolve`).

Numerics near the ends. Variance-preserving families are written through
m(t) = -2 log alpha(t) (the integrated beta for VP-linear), so that
sigma^2 = -expm1(-m) and lambda = -m - log(expm1(m)) keep full relative precision both
where alpha -> 1 (m -> 0, sigma -> 0) and where alpha -> 0 (m large).

References:
  Song et al., Score-Based Generative Modeling through SDEs, ICLR 2021 (VP, VE).
  Nichol & Dhariwal, Improved DDPM, ICML 2021 (cosine schedule).
  Lu et al., DPM-Solver, NeurIPS 2022, App. D (discrete schedules interpolated in log alpha).
  Karras et al., Elucidating the Design Space of Diffusion Models (EDM), NeurIPS 2022.
  Liu et al., Flow Straight and Fast (rectified flow), ICLR 2023.
  Lu & Song, Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models
  (sCM, TrigFlow), ICLR 2025.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import _validate

Array = jax.Array

# The methods of t whose concrete arguments are checked against [t_min, t_max].
_METHODS_OF_T = ("alpha", "sigma", "logsnr", "d_alpha", "d_sigma", "d_logsnr")


def _check_range(name: str, t_min: float, t_max: float, lo: float = 0.0, hi: float = math.inf) -> None:
  if not (lo <= t_min < t_max <= hi):
    raise ValueError(
        f"{name}: need {lo} <= t_min < t_max <= {hi}, got t_min={t_min}, t_max={t_max}.")


def _softplus(x: Array) -> Array:
  return jnp.logaddexp(x, 0.0)


def _vp_logsnr_from_m(m: Array) -> Array:
  """lambda = log(alpha^2 / sigma^2) with alpha^2 = exp(-m), sigma^2 = 1 - exp(-m): -log(expm1(m))."""
  # expm1(m) overflows in float32 for large m; there log(expm1(m)) = m + log1p(-exp(-m)) is exact.
  # Both branches are evaluated on clamped inputs so that neither yields inf/NaN gradients.
  big = m > 1.0
  m_big = jnp.maximum(m, 1.0)
  m_small = jnp.minimum(m, 1.0)
  return jnp.where(big, -m_big - jnp.log1p(-jnp.exp(-m_big)), -jnp.log(jnp.expm1(m_small)))


def _checks_t(method):
  """Wraps a method of t with the range check of concrete t (tracers pass through unchecked)."""

  @functools.wraps(method)
  def checked(self, t):
    _validate.check_time("t", t, t_min=self.t_min, t_max=self.t_max, what=type(self).__name__)
    return method(self, t)

  checked.checks_t = True
  return checked


@dataclasses.dataclass(frozen=True)
class Schedule(abc.ABC):
  """A forward process x_t = alpha(t) x0 + sigma(t) eps on t in [t_min, t_max].

  alpha, sigma, logsnr and their derivatives take t in [t_min, t_max]: a concrete t outside it is
  a ValueError, a traced one is not checked (see the module docstring).
  """

  name: ClassVar[str] = "schedule"

  def __init_subclass__(cls, **kwargs):
    # Every family, also one added later, gets the range check on its own methods of t.
    super().__init_subclass__(**kwargs)
    for name in _METHODS_OF_T:
      fn = cls.__dict__.get(name)
      if fn is not None and not getattr(fn, "checks_t", False):
        setattr(cls, name, _checks_t(fn))

  # Subclasses provide `t_min` and `t_max` (dataclass fields or properties). They are not
  # declared here: a declaration in the base would fix their position among the subclass fields.

  @abc.abstractmethod
  def alpha(self, t: Array) -> Array:
    """Signal scale alpha(t)."""

  @abc.abstractmethod
  def sigma(self, t: Array) -> Array:
    """Noise scale sigma(t)."""

  @_checks_t
  def logsnr(self, t: Array) -> Array:
    """lambda(t) = 2 log(alpha(t) / sigma(t))."""
    t = jnp.asarray(t)
    return 2.0 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

  @abc.abstractmethod
  def t_from_logsnr(self, lam: Array) -> Array:
    """The inverse of `logsnr`."""

  @property
  def variance_preserving(self) -> bool:
    """Whether alpha^2 + sigma^2 = 1 for all t."""
    return False

  # Derivatives come from autodiff of the closed forms (DESIGN.md: no hand-written twins).
  @_checks_t
  def d_alpha(self, t: Array) -> Array:
    """d alpha / dt."""
    t = jnp.asarray(t)
    return jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))[1]

  @_checks_t
  def d_sigma(self, t: Array) -> Array:
    """d sigma / dt."""
    t = jnp.asarray(t)
    return jax.jvp(self.sigma, (t,), (jnp.ones_like(t),))[1]

  @_checks_t
  def d_logsnr(self, t: Array) -> Array:
    """d lambda / dt (negative: the SNR falls with t)."""
    t = jnp.asarray(t)
    return jax.jvp(self.logsnr, (t,), (jnp.ones_like(t),))[1]

  # The range is a property of the (static) schedule: evaluate it eagerly even inside a jit trace.
  @property
  def logsnr_min(self) -> float:
    """lambda(t_max), as a Python float."""
    with jax.ensure_compile_time_eval():
      return float(self.logsnr(jnp.asarray(self.t_max, jnp.float32)))

  @property
  def logsnr_max(self) -> float:
    """lambda(t_min), as a Python float."""
    with jax.ensure_compile_time_eval():
      return float(self.logsnr(jnp.asarray(self.t_min, jnp.float32)))


@dataclasses.dataclass(frozen=True)
class VPLinear(Schedule):
  """Continuous VP with beta(t) = beta_min + t (beta_max - beta_min).

  log alpha(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2) / 2, sigma = sqrt(1 - alpha^2).
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  t_min: float = 1e-3
  t_max: float = 1.0
  name: ClassVar[str] = "vp_linear"

  def __post_init__(self):
    if not (0.0 <= self.beta_min <= self.beta_max) or self.beta_max <= 0:
      raise ValueError(f"VPLinear: need 0 <= beta_min <= beta_max and beta_max > 0, got "
                       f"beta_min={self.beta_min}, beta_max={self.beta_max}.")
    _check_range("VPLinear", self.t_min, self.t_max)

  variance_preserving = property(lambda self: True)

  def _m(self, t):
    t = jnp.asarray(t)
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

  def alpha(self, t):
    return jnp.exp(-0.5 * self._m(t))

  def sigma(self, t):
    return jnp.sqrt(-jnp.expm1(-self._m(t)))

  def logsnr(self, t):
    return _vp_logsnr_from_m(self._m(t))

  def t_from_logsnr(self, lam):
    m = _softplus(-jnp.asarray(lam))
    d = self.beta_max - self.beta_min
    # Root of d/2 t^2 + beta_min t - m = 0 in the cancellation-free form.
    return 2.0 * m / (self.beta_min + jnp.sqrt(self.beta_min ** 2 + 2.0 * d * m))


@dataclasses.dataclass(frozen=True)
class VPCosine(Schedule):
  """Improved-DDPM cosine schedule in continuous time.

  alpha(t) = cos(f(t)) / cos(f(0)),  f(t) = (t + s) / (1 + s) * pi / 2,  sigma = sqrt(1 - alpha^2).

  The trap at t = 1: there alpha = 0 and lambda = -inf (the discrete DDPM code clips beta at
  0.999 to hide it). We do not clip; instead t_max must stay below 1 and defaults to 0.9946,
  the value DPM-Solver uses, where lambda(t_max) is about -9.6 (close to the pure-noise end, finite).

  cos(f(t)) is computed as sin(pi/2 - f(t)) = sin((1 - t) / (1 + s) * pi/2): near t = 1 the cosine
  of an angle close to pi/2 cancels (float32 relative error 2e-3 at t = 0.99999), while 1 - t is
  exact there and the sine of a small angle keeps full relative precision.
  """

  s: float = 0.008
  t_min: float = 1e-3
  t_max: float = 0.9946
  name: ClassVar[str] = "vp_cosine"

  def __post_init__(self):
    if self.s <= 0:
      raise ValueError(f"VPCosine: s must be > 0, got s={self.s}.")
    _check_range("VPCosine", self.t_min, self.t_max, hi=1.0)
    if self.t_max >= 1.0:
      raise ValueError(f"VPCosine: t_max must be < 1 (alpha(1) = 0), got t_max={self.t_max}.")

  variance_preserving = property(lambda self: True)

  def _log_alpha(self, t):
    cos_f = jnp.sin((1.0 - jnp.asarray(t)) / (1.0 + self.s) * (math.pi / 2))  # = cos(f(t))
    return jnp.log(cos_f) - math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))

  def alpha(self, t):
    return jnp.exp(self._log_alpha(t))

  def sigma(self, t):
    return jnp.sqrt(-jnp.expm1(2.0 * self._log_alpha(t)))

  def logsnr(self, t):
    return _vp_logsnr_from_m(-2.0 * self._log_alpha(t))

  def t_from_logsnr(self, lam):
    log_alpha = -0.5 * _softplus(-jnp.asarray(lam))
    c0 = math.cos(self.s / (1 + self.s) * math.pi / 2)
    f = jnp.arccos(jnp.exp(log_alpha) * c0)
    return f * 2.0 * (1.0 + self.s) / math.pi - self.s


def _named_betas(kind: str, num_steps: int) -> np.ndarray:
  if kind == "linear":
    scale = 1000.0 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
  if kind == "scaled_linear":
    return np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_steps, dtype=np.float64) ** 2
  if kind == "cosine":
    s = 0.008
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    return np.minimum(1.0 - f(u[1:]) / f(u[:-1]), 0.999)
  raise ValueError(f"VPDiscrete.from_name: unknown beta schedule {kind!r}; "
                   "expected one of 'linear', 'scaled_linear', 'cosine'.")


def _float_dtype(x):
  """x's dtype if floating, else the default float (an integer time 1 gives float32)."""
  dtype = jnp.asarray(x).dtype
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


@dataclasses.dataclass(frozen=True)
class VPDiscrete(Schedule):
  """A DDPM teacher's discrete betas, made continuous as DPM-Solver does.

  Step n = 1..N sits at t_n = n / N with log alpha_n = (1/2) sum_{i<=n} log(1 - beta_i); between
  knots (and on [0, 1/N], with log alpha(0) = 0) log alpha is piecewise linear in t. Network time
  conditioning of such a teacher is usually 1000 * t - 1 (or the step index); that mapping
  belongs to the teacher's wrapper, not to the schedule.
  """

  betas: tuple[float, ...]
  t_min: float | None = None
  t_max: float = 1.0
  name: ClassVar[str] = "vp_discrete"

  def __post_init__(self):
    b = np.asarray(self.betas, np.float64)
    if b.ndim != 1 or b.size < 2:
      raise ValueError(f"VPDiscrete: betas must be a 1-D sequence of >= 2 values, got shape {b.shape}.")
    if not np.all((b > 0) & (b < 1)):
      raise ValueError("VPDiscrete: every beta must lie in (0, 1).")
    object.__setattr__(self, "betas", tuple(float(x) for x in b))
    if self.t_min is None:
      object.__setattr__(self, "t_min", 1.0 / b.size)
    _check_range("VPDiscrete", self.t_min, self.t_max, hi=1.0)

  @classmethod
  def from_name(cls, kind: str = "linear", num_steps: int = 1000, **kwargs) -> "VPDiscrete":
    """The usual beta lists: 'linear' (DDPM), 'scaled_linear' (Stable Diffusion), 'cosine'."""
    return cls(betas=tuple(_named_betas(kind, num_steps)), **kwargs)

  variance_preserving = property(lambda self: True)

  def _knots(self):
    b = np.asarray(self.betas, np.float64)
    log_alpha = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-b))])
    ts = np.linspace(0.0, 1.0, b.size + 1)
    return ts, log_alpha

  # The knot table in bfloat16 would merge neighbouring knots (1000 of them in [0, 1]): the
  # interpolation runs in at least float32 and only its result takes the input's dtype.
  def _log_alpha(self, t):
    ts, la = self._knots()
    t = jnp.asarray(t)
    ct = jnp.promote_types(_float_dtype(t), jnp.float32)
    return jnp.interp(t.astype(ct), jnp.asarray(ts, ct), jnp.asarray(la, ct))

  def alpha(self, t):
    return jnp.exp(self._log_alpha(t)).astype(_float_dtype(t))

  def sigma(self, t):
    return jnp.sqrt(-jnp.expm1(2.0 * self._log_alpha(t))).astype(_float_dtype(t))

  def logsnr(self, t):
    return _vp_logsnr_from_m(-2.0 * self._log_alpha(t)).astype(_float_dtype(t))

  def t_from_logsnr(self, lam):
    ts, la = self._knots()
    lam = jnp.asarray(lam)
    ct = jnp.promote_types(_float_dtype(lam), jnp.float32)
    log_alpha = -0.5 * _softplus(-lam.astype(ct))
    # log alpha decreases with t: interpolate on the reversed (increasing) table.
    return jnp.interp(log_alpha, jnp.asarray(la[::-1], ct),
                      jnp.asarray(ts[::-1], ct)).astype(_float_dtype(lam))


@dataclasses.dataclass(frozen=True)
class VE(Schedule):
  """Variance exploding: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t, t in [t_min, 1]."""

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  t_min: float = 1e-5
  t_max: float = 1.0
  name: ClassVar[str] = "ve"

  def __post_init__(self):
    if not (0 < self.sigma_min < self.sigma_max):
      raise ValueError(f"VE: need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                       f"sigma_max={self.sigma_max}.")
    _check_range("VE", self.t_min, self.t_max)


  def alpha(self, t):
    return jnp.ones_like(jnp.asarray(t))

  def sigma(self, t):
    return jnp.exp(self._log_sigma(t))

  def _log_sigma(self, t):
    a, b = math.log(self.sigma_min), math.log(self.sigma_max)
    return a + jnp.asarray(t) * (b - a)

  def logsnr(self, t):
    return -2.0 * self._log_sigma(t)

  def t_from_logsnr(self, lam):
    a, b = math.log(self.sigma_min), math.log(self.sigma_max)
    return (-0.5 * jnp.asarray(lam) - a) / (b - a)


@dataclasses.dataclass(frozen=True)
class EDM(Schedule):
  """Karras et al.: t = sigma, alpha = 1, on [sigma_min, sigma_max]; sigma_data scales the data."""

  sigma_min: float = 0.002
  sigma_max: float = 80.0
  sigma_data: float = 0.5
  name: ClassVar[str] = "edm"

  def __post_init__(self):
    if not (0 < self.sigma_min < self.sigma_max):
      raise ValueError(f"EDM: need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                       f"sigma_max={self.sigma_max}.")
    if self.sigma_data <= 0:
      raise ValueError(f"EDM: sigma_data must be > 0, got {self.sigma_data}.")

  t_min = property(lambda self: self.sigma_min)
  t_max = property(lambda self: self.sigma_max)

  def alpha(self, t):
    return jnp.ones_like(jnp.asarray(t))

  def sigma(self, t):
    return jnp.asarray(t)

  def logsnr(self, t):
    return -2.0 * jnp.log(jnp.asarray(t))

  def t_from_logsnr(self, lam):
    return jnp.exp(-0.5 * jnp.asarray(lam))


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Schedule):
  """Linear interpolation: alpha = 1 - t, sigma = t. At t = 1 the state is pure noise (lambda = -inf)."""

  t_min: float = 1e-3
  t_max: float = 1.0
  name: ClassVar[str] = "rectified_flow"

  def __post_init__(self):
    _check_range("RectifiedFlow", self.t_min, self.t_max, hi=1.0)
    if self.t_min <= 0:
      raise ValueError(f"RectifiedFlow: t_min must be > 0 (sigma(0) = 0), got t_min={self.t_min}.")


  def alpha(self, t):
    return 1.0 - jnp.asarray(t)

  def sigma(self, t):
    return jnp.asarray(t)

  def logsnr(self, t):
    t = jnp.asarray(t)
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))

  def t_from_logsnr(self, lam):
    return jax.nn.sigmoid(-0.5 * jnp.asarray(lam))


@dataclasses.dataclass(frozen=True)
class TrigFlow(Schedule):
  """sCM's TrigFlow: alpha = cos t, sigma = sigma_data sin t, t in [t_min, t_max] within [0, pi/2].

  The defaults are the EDM range mapped through t = arctan(sigma / sigma_data):
  sigma in [0.002, 80]. t_max may be pi/2 (pure noise); alpha is clamped at 0 there because
  cos(float32(pi/2)) is slightly negative.
  """

  sigma_data: float = 0.5
  t_min: float | None = None
  t_max: float | None = None
  name: ClassVar[str] = "trigflow"

  def __post_init__(self):
    if self.sigma_data <= 0:
      raise ValueError(f"TrigFlow: sigma_data must be > 0, got {self.sigma_data}.")
    if self.t_min is None:
      object.__setattr__(self, "t_min", math.atan(0.002 / self.sigma_data))
    if self.t_max is None:
      object.__setattr__(self, "t_max", math.atan(80.0 / self.sigma_data))
    _check_range("TrigFlow", self.t_min, self.t_max, hi=math.pi / 2)
    if self.t_min <= 0:
      raise ValueError(f"TrigFlow: t_min must be > 0, got t_min={self.t_min}.")


  def alpha(self, t):
    return jnp.maximum(jnp.cos(jnp.asarray(t)), 0.0)

  def sigma(self, t):
    return self.sigma_data * jnp.sin(jnp.asarray(t))

  def logsnr(self, t):
    return -2.0 * (jnp.log(jnp.tan(jnp.asarray(t))) + math.log(self.sigma_data))

  def t_from_logsnr(self, lam):
    return jnp.arctan(jnp.exp(-0.5 * jnp.asarray(lam)) / self.sigma_data)


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (VPLinear, VPCosine, VPDiscrete, VE, EDM, RectifiedFlow, TrigFlow)
}


def get(name: str, **kwargs) -> Schedule:
  """Builds a schedule from its registry name, e.g. `get("vp_linear", t_min=1e-4)`.

  `get("vp_discrete", beta_schedule="linear", num_steps=1000)` builds from a named beta list.
  """
  if not isinstance(name, str) or name not in SCHEDULES:
    raise ValueError(f"Unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}.")
  cls = SCHEDULES[name]
  if cls is VPDiscrete and "betas" not in kwargs:
    kind = kwargs.pop("beta_schedule", "linear")
    num_steps = kwargs.pop("num_steps", 1000)
    return VPDiscrete.from_name(kind, num_steps, **kwargs)
  if cls is EDM and ("t_min" in kwargs or "t_max" in kwargs):
    raise ValueError("EDM: set the range with sigma_min / sigma_max (t = sigma), not t_min / t_max.")
  try:
    return cls(**kwargs)
  except TypeError as e:
    fields = [f.name for f in dataclasses.fields(cls)]
    raise ValueError(f"Bad arguments for schedule {name!r}: {e}. Accepted: {fields}.") from None


def resolve(schedule: "Schedule | str", *, argname: str = "schedule") -> Schedule:
  """A Schedule as given, or the one `get(name)` builds (with its defaults) from a registry name."""
  if isinstance(schedule, Schedule):
    return schedule
  if isinstance(schedule, str):
    return get(schedule)
  raise ValueError(f"{argname} must be a schedules.Schedule or one of the names "
                   f"{sorted(SCHEDULES)}, got {schedule!r}.")


def broadcast_to(t: Array, x: Array) -> Array:
  """Reshapes t of shape [B] (or scalar) to broadcast against x of shape [B, ...]."""
  t = jnp.asarray(t)
  if t.ndim == 0:
    return t
  if t.ndim != 1 or t.shape[0] != x.shape[0]:
    raise ValueError(f"t must be a scalar or have shape [B] = [{x.shape[0]}] to match x of shape "
                     f"{x.shape}; got t of shape {t.shape}.")
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


__all__ = [
    "Schedule", "VPLinear", "VPCosine", "VPDiscrete", "VE", "EDM", "RectifiedFlow", "TrigFlow",
    "SCHEDULES", "get", "resolve", "broadcast_to",
]
