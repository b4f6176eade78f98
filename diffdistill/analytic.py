"""Exact teachers: Gaussian-mixture data, whose noised marginals and denoisers are closed forms.

For p0 = sum_k pi_k N(mu_k, Sigma_k) and x_t = alpha x0 + sigma eps,

    p_t(x)       = sum_k pi_k N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I),
    E[x0 | x_t]  = sum_k r_k(x) m_k(x),   m_k = mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k),
                   C_k = alpha^2 Sigma_k + sigma^2 I,  r_k = softmax_k(log pi_k + log N_k(x)),

computed in the eigenbasis Sigma_k = U_k diag(s_k) U_k^T, where every C_k is diagonal, with the
responsibilities in log space. A denoiser here is `apply(mix, x, t)`: its params are the mixture,
so analytic and trained teachers are interchangeable everywhere.

`flow_map` integrates the probability-flow ODE of any denoiser with diffrax (adaptive, 8th order);
it is the reference every solver and distilled generator is measured against. It integrates in
the angle theta = arctan(sigma / alpha) on the rescaled state y = x / sqrt(alpha^2 + sigma^2):

    y = cos(theta) x0 + sin(theta) eps,   dy/dtheta = cos(theta) eps_hat - sin(theta) x0_hat,

which is finite at both ends (also where alpha = 0, e.g. rectified flow at t = 1) and is the
same ODE for every schedule, since the probability-flow ODE depends on the schedule only through
the log-SNR. The ODE and its two delicate ends (alpha = 0, sigma = 0) are written once, in
diffdistill/_pf_ode.py, shared with solvers.adaptive_sample.

References:
  Song et al., Score SDE, ICLR 2021 (probability-flow ODE); Karras et al., EDM, 2022 (App. B);
  Lu & Song, sCM, 2025 (the trigonometric form); Kidger, On Neural Differential Equations, 2021.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import _pf_ode
from diffdistill import _validate
from diffdistill import schedules as schedules_lib

Array = jax.Array


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


@jax.tree_util.register_pytree_node_class
class GaussianMixture:
  """p0 = sum_k weights_k N(means_k, covs_k), stored by the eigendecomposition of each covariance.

  Args:
    weights: [K], positive; normalized here.
    means: [K, d].
    covs: [K, d, d] full covariances, or [K, d] diagonal variances, or [K] isotropic variances.
      Diagonal and isotropic covariances skip the rotations (same results, cheaper).
  """

  def __init__(self, weights, means, covs):
    if _is_concrete(weights, means, covs):
      weights, means, eigvals, eigvecs = _validate_and_factor(weights, means, covs)
    else:
      eigvals, eigvecs = jnp.linalg.eigh(covs)
      weights = weights / jnp.sum(weights)
    self.log_weights = jnp.log(jnp.asarray(weights))
    self.means = jnp.asarray(means)
    self.eigvals = jnp.asarray(eigvals)
    self.eigvecs = None if eigvecs is None else jnp.asarray(eigvecs)

  @property
  def weights(self) -> Array:
    return jnp.exp(self.log_weights)

  @property
  def num_components(self) -> int:
    return self.means.shape[0]

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def covs(self) -> Array:
    """The [K, d, d] covariances."""
    if self.eigvecs is None:
      return jax.vmap(jnp.diag)(self.eigvals)
    return jnp.einsum("kij,kj,klj->kil", self.eigvecs, self.eigvals, self.eigvecs)

  def mean(self) -> Array:
    """E[x0], [d]."""
    return self.weights @ self.means

  def covariance(self) -> Array:
    """Cov[x0], [d, d]: the within-component part plus the spread of the means."""
    mu = self.mean()
    dm = self.means - mu
    return jnp.einsum("k,kij->ij", self.weights, self.covs) + jnp.einsum("k,ki,kj->ij", self.weights, dm, dm)

  def tree_flatten(self):
    return (self.log_weights, self.means, self.eigvals, self.eigvecs), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    obj = object.__new__(cls)
    obj.log_weights, obj.means, obj.eigvals, obj.eigvecs = children
    return obj

  def __repr__(self):
    return f"GaussianMixture(K={self.num_components}, d={self.dim}, diagonal={self.eigvecs is None})"


def _validate_and_factor(weights, means, covs):
  w = np.asarray(weights, np.float64)
  mu = np.asarray(means, np.float64)
  c = np.asarray(covs, np.float64)
  if w.ndim != 1 or w.size < 1:
    raise ValueError(f"GaussianMixture: weights must have shape [K], got {w.shape}.")
  k = w.size
  if mu.ndim != 2 or mu.shape[0] != k:
    raise ValueError(f"GaussianMixture: means must have shape [K, d] = [{k}, d], got {mu.shape}.")
  d = mu.shape[1]
  if not np.all(np.isfinite(w)) or np.any(w <= 0):
    raise ValueError("GaussianMixture: weights must be finite and > 0.")
  if not np.all(np.isfinite(mu)):
    raise ValueError(f"GaussianMixture: means must be finite; component "
                     f"{int(np.argmin(np.all(np.isfinite(mu), axis=1)))} has {mu[~np.isfinite(mu)][0]}.")
  if not np.all(np.isfinite(c)):
    raise ValueError(f"GaussianMixture: covs must be finite, got {c[~np.isfinite(c)][0]}.")
  w = w / w.sum()
  if c.shape == (k,):
    c = np.repeat(c[:, None], d, axis=1)
  if c.shape == (k, d):
    if not np.all(c > 0):
      raise ValueError("GaussianMixture: covs must be positive definite (diagonal variances > 0).")
    return w, mu, c, None
  if c.shape != (k, d, d):
    raise ValueError(f"GaussianMixture: covs must have shape [K, d, d], [K, d] or [K] with "
                     f"K={k}, d={d}; got {c.shape}.")
  if not np.allclose(c, np.swapaxes(c, 1, 2), rtol=1e-6, atol=1e-9):
    raise ValueError("GaussianMixture: covs must be symmetric.")
  c = 0.5 * (c + np.swapaxes(c, 1, 2))
  s, u = np.linalg.eigh(c)
  if not np.all(s > 0):
    bad = int(np.argmin(s.min(axis=1)))
    raise ValueError(f"GaussianMixture: covs must be positive definite; component {bad} has "
                     f"smallest eigenvalue {s[bad].min():.3g}.")
  return w, mu, s, u


def _check_x(mix: GaussianMixture, x: Array) -> None:
  if x.ndim != 2 or x.shape[-1] != mix.dim:
    raise ValueError(f"x must have shape [B, d] with d = {mix.dim}, got {x.shape}.")
  # alpha, sigma and the result take x's dtype: integers would truncate them.
  _validate.check_floating("x", x)


def _component_terms(mix: GaussianMixture, x: Array, alpha: Array, sigma: Array):
  """log N_k(x) [B, K] and posterior means m_k(x) [B, K, d]; alpha, sigma: [B, 1] or scalars."""
  alpha = jnp.asarray(alpha, x.dtype)[..., None]  # [B, 1, 1]
  sigma = jnp.asarray(sigma, x.dtype)[..., None]
  s = mix.eigvals.astype(x.dtype)[None]  # [1, K, d]
  mu = mix.means.astype(x.dtype)[None]  # [1, K, d]
  y = x[:, None, :] - alpha * mu  # [B, K, d]
  if mix.eigvecs is not None:
    u = mix.eigvecs.astype(x.dtype)
    y = jnp.einsum("kji,bkj->bki", u, y)  # U_k^T (x - alpha mu_k)
  var = alpha * alpha * s + sigma * sigma  # [B, K, d]
  log_n = -0.5 * jnp.sum(y * y / var + jnp.log(var), axis=-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)
  shift = alpha * s / var * y
  if mix.eigvecs is not None:
    shift = jnp.einsum("kij,bkj->bki", u, shift)
  return log_n, mu + shift


def _alpha_sigma(schedule, x, t):
  t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
  return schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]


def denoise(mix: GaussianMixture, x: Array, t: Array, *, schedule: schedules_lib.Schedule) -> Array:
  """E[x0 | x_t = x], [B, d], exactly; x floating, t (scalar or [B]) in [t_min, t_max]."""
  schedule = schedules_lib.resolve(schedule)
  _check_x(mix, x)
  alpha, sigma = _alpha_sigma(schedule, x, t)
  log_n, m = _component_terms(mix, x, alpha, sigma)
  r = jax.nn.softmax(mix.log_weights.astype(x.dtype) + log_n, axis=-1)  # [B, K]
  return jnp.einsum("bk,bkd->bd", r, m)


def log_prob(mix: GaussianMixture, x: Array, t: Array, *, schedule: schedules_lib.Schedule) -> Array:
  """log p_t(x), [B], of the noised marginal."""
  schedule = schedules_lib.resolve(schedule)
  _check_x(mix, x)
  alpha, sigma = _alpha_sigma(schedule, x, t)
  log_n, _ = _component_terms(mix, x, alpha, sigma)
  return jax.nn.logsumexp(mix.log_weights.astype(x.dtype) + log_n, axis=-1)


def score(mix: GaussianMixture, x: Array, t: Array, *, schedule: schedules_lib.Schedule) -> Array:
  """grad_x log p_t(x) = (alpha E[x0 | x] - x) / sigma^2 (Tweedie), [B, d]."""
  schedule = schedules_lib.resolve(schedule)
  _check_x(mix, x)
  alpha, sigma = _alpha_sigma(schedule, x, t)
  return (alpha * denoise(mix, x, t, schedule=schedule) - x) / (sigma * sigma)


def data_log_prob(mix: GaussianMixture, x: Array) -> Array:
  """log p0(x), [B], under the clean data distribution."""
  _check_x(mix, x)
  log_n, _ = _component_terms(mix, x, jnp.ones((x.shape[0], 1), x.dtype), jnp.zeros((x.shape[0], 1), x.dtype))
  return jax.nn.logsumexp(mix.log_weights.astype(x.dtype) + log_n, axis=-1)


def component_logits(mix: GaussianMixture, x: Array) -> Array:
  """log pi_k + log N(x; mu_k, Sigma_k), [B, K]: the logits of the exact component classifier
  of clean data (softmax gives `responsibilities`); a classifier `logits(params, x)` with the
  mixture as its params."""
  _check_x(mix, x)
  log_n, _ = _component_terms(mix, x, jnp.ones((x.shape[0], 1), x.dtype), jnp.zeros((x.shape[0], 1), x.dtype))
  return mix.log_weights.astype(x.dtype) + log_n


def responsibilities(mix: GaussianMixture, x: Array) -> Array:
  """p(component k | x0 = x), [B, K], under the clean data distribution."""
  return jax.nn.softmax(component_logits(mix, x), axis=-1)


def sample(mix: GaussianMixture, rng: Array, n: int, dtype=None) -> Array:
  """n exact samples of p0, [n, d]; rng a PRNG key, n >= 0 an integer, dtype floating."""
  rng = _validate.check_key("rng", rng)
  n = _validate.check_int("n", n, min=0)
  dtype = dtype or mix.means.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}.")
  k_rng, e_rng = jax.random.split(rng)
  k = jax.random.categorical(k_rng, mix.log_weights, shape=(n,))
  z = jax.random.normal(e_rng, (n, mix.dim), dtype) * jnp.sqrt(mix.eigvals[k]).astype(dtype)
  if mix.eigvecs is not None:
    z = jnp.einsum("bij,bj->bi", mix.eigvecs[k].astype(dtype), z)
  return mix.means[k].astype(dtype) + z


@dataclasses.dataclass(frozen=True)
class ExactDenoiser:
  """The exact teacher of `schedule` as `apply(mix, x, t) -> E[x0 | x_t = x]` (`denoise`).

  A value, not a closure: hashable and equal for equal schedules, so functions that take the
  denoiser as a static argument (`flow_map`, `solvers.make_sampler` under jit) compile once for
  every `denoiser(schedule)` built from an equal schedule. It has the signature of every
  denoiser, `apply(params, x, t, **cond)`, and takes no conditioning.
  """

  schedule: schedules_lib.Schedule

  def __call__(self, mix: GaussianMixture, x: Array, t: Array, **cond) -> Array:
    if cond:
      raise ValueError(f"The analytic denoiser takes no conditioning inputs; got {sorted(cond)}.")
    return denoise(mix, x, t, schedule=self.schedule)


def denoiser(schedule: schedules_lib.Schedule) -> ExactDenoiser:
  """The exact denoiser as `apply(mix, x, t) -> x0_hat` for `schedule` (a hashable value)."""
  return ExactDenoiser(schedule)


def class_mixtures(mix: GaussianMixture, classes) -> tuple[GaussianMixture, ...]:
  """The class-conditional laws of a mixture whose classes are subsets of its components.

  Args:
    mix: the mixture p(x) = sum_k pi_k N(mu_k, C_k).
    classes: [K] ints in 0..C-1, the class of each component; every class needs a component.
  Returns:
    (p(x | 0), ..., p(x | C-1), p(x)): each class's mixture (its components, their weights
    renormalized) and, last, the whole mixture, the law of the null label C.
  """
  classes = np.asarray(classes)
  if classes.shape != (mix.num_components,) or not np.issubdtype(classes.dtype, np.integer):
    raise ValueError(f"classes must be [K] = [{mix.num_components}] integers (one class per "
                     f"component), got shape {classes.shape} dtype {classes.dtype}.")
  num = int(classes.max()) + 1
  empty = sorted(set(range(num)) - set(classes.tolist()))
  if classes.min() < 0 or empty:
    raise ValueError(f"classes must cover 0..C-1 with every class non-empty; got {classes.tolist()}.")
  weights, means, covs = (np.asarray(a, np.float64) for a in (mix.weights, mix.means, mix.covs))
  subsets = tuple(GaussianMixture(weights[classes == c], means[classes == c], covs[classes == c])
                  for c in range(num))
  return (*subsets, mix)


@dataclasses.dataclass(frozen=True)
class GuidedDenoiser:
  """The exact class-conditional teacher with classifier-free guidance.

  `apply(mixtures, x, t, *, label, w=None)` with `mixtures = class_mixtures(mix, classes)`:
  D(x | c) = E[x0 | x_t = x, c] for each example's label c in 0..C-1, the unconditional D(x)
  for the null label C, and with a guidance weight w [B] (or a scalar) the guided denoiser
  D_w = D(x) + w (D(x | c) - D(x)) of Ho & Salimans (2022): w = 1 is the conditional teacher,
  w = 0 the unconditional one. Hashable, like `ExactDenoiser`.
  """

  schedule: schedules_lib.Schedule

  def __call__(self, mixtures, x: Array, t: Array, *, label: Array, w: Array | None = None) -> Array:
    flat = x.reshape(x.shape[0], -1)
    ds = jnp.stack([denoise(m, flat, t, schedule=self.schedule) for m in mixtures])  # [C+1, B, d]
    label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), x.shape[:1])
    d_c = jnp.take_along_axis(ds, label[None, :, None], axis=0)[0]
    if w is not None:
      w = jnp.broadcast_to(jnp.asarray(w, x.dtype), x.shape[:1])[:, None]
      d_c = ds[-1] + w * (d_c - ds[-1])
    return d_c.reshape(x.shape)


def gaussian_flow_map(mix: GaussianMixture, x: Array, *, schedule: schedules_lib.Schedule,
                      t_start: float, t_end: float) -> Array:
  """Closed-form probability-flow map of single-Gaussian data (K = 1) from t_start to t_end.

  In the eigenbasis of Sigma = U diag(s) U^T each coordinate of x - alpha mu is rescaled by
  sqrt((alpha_e^2 s + sigma_e^2) / (alpha_s^2 s + sigma_s^2)): the flow is linear.
  """
  if mix.num_components != 1:
    raise ValueError(f"gaussian_flow_map needs K = 1 components, got K = {mix.num_components}.")
  schedule = schedules_lib.resolve(schedule)
  _check_x(mix, x)
  a0, s0 = schedule.alpha(jnp.asarray(t_start, x.dtype)), schedule.sigma(jnp.asarray(t_start, x.dtype))
  a1, s1 = schedule.alpha(jnp.asarray(t_end, x.dtype)), schedule.sigma(jnp.asarray(t_end, x.dtype))
  s = mix.eigvals[0].astype(x.dtype)
  mu = mix.means[0].astype(x.dtype)
  scale = jnp.sqrt((a1 * a1 * s + s1 * s1) / (a0 * a0 * s + s0 * s0))
  y = x - a0 * mu
  if mix.eigvecs is None:
    return a1 * mu + scale * y
  u = mix.eigvecs[0].astype(x.dtype)
  return a1 * mu + ((y @ u) * scale) @ u.T


@functools.partial(jax.jit, static_argnames=("apply", "schedule", "rtol", "atol", "max_steps",
                                             "return_stats"))
def _flow_map(apply: Callable, params, x: Array, *, schedule: schedules_lib.Schedule, t_start,
              t_end, rtol: float = 1e-6, atol: float = 1e-6, max_steps: int = 100_000,
              return_stats: bool = False):
  """Integrates the probability-flow ODE of denoiser `apply(params, x, t)` from t_start to t_end.

  The ODE is integrated in theta = arctan(sigma / alpha) by diffrax's Dopri8 (diffdistill/_pf_ode.py,
  shared with solvers.adaptive_sample); an end at sigma = 0 is reached by one exact-limit DDIM
  step from theta = sqrt(machine epsilon).

  Args:
    apply: a denoiser `apply(params, x, t) -> x0_hat`, static: it must be hashable and compare
      equal across calls to reuse the compilation (a module-level function, or
      `analytic.denoiser(schedule)`, which is a value; a fresh lambda per call recompiles).
    params: its parameters (for the analytic teacher: the GaussianMixture).
    x: the state at t_start, [B, ...].
    schedule: the forward process the denoiser was built for.
    t_start, t_end: the two times (either order; both in [t_min, t_max]).
    rtol, atol: diffrax PID-controller tolerances on the rescaled state.
    max_steps: the step cap of the adaptive solver.
    return_stats: also return {"nfe": denoiser evaluations, "num_steps": accepted steps}.
  Returns:
    The state at t_end, [B, ...], and optionally the stats.
  """
  x_end, stats = _pf_ode.solve(apply, params, x, schedule=schedule, t_start=t_start,
                               t_end=t_end, solver=diffrax.Dopri8(), rtol=rtol, atol=atol,
                               max_steps=max_steps)
  return (x_end, stats) if return_stats else x_end


@functools.wraps(_flow_map)
def flow_map(apply: Callable, params, x: Array, *, schedule: schedules_lib.Schedule, t_start,
             t_end, **options):
  # The checks run before the jitted solve: inside it t_start and t_end are traced, and a time
  # out of range ends, after seconds, in diffrax's "maximum number of solver steps".
  schedule = schedules_lib.resolve(schedule)
  for name, t in (("t_start", t_start), ("t_end", t_end)):
    _validate.check_time(name, t, t_min=schedule.t_min, t_max=schedule.t_max,
                         what=type(schedule).__name__)
  _validate.check_floating("x", x)
  return _flow_map(apply, params, x, schedule=schedule, t_start=t_start, t_end=t_end, **options)


# ----------------------------------------------------------------------------------------------
# Ready-made mixtures (fixed seeds: the same on every machine).
# ----------------------------------------------------------------------------------------------


def ring2d(num_modes: int = 8, radius: float = 1.0, std: float = 0.1) -> GaussianMixture:
  """`num_modes` isotropic Gaussians evenly spaced on a circle, equal weights."""
  num_modes = _validate.check_int("num_modes", num_modes, min=1)
  ang = 2 * np.pi * np.arange(num_modes) / num_modes
  means = radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)
  return GaussianMixture(np.ones(num_modes), means, np.full(num_modes, std ** 2))


def grid2d(size: int = 4, extent: float = 1.5, std: float = 0.15) -> GaussianMixture:
  """A checkerboard: Gaussians at the centres of the dark cells of a size x size board on [-extent, extent]^2."""
  size = _validate.check_int("size", size, min=1)
  centres = np.linspace(-extent, extent, 2 * size + 1)[1::2]
  means = np.array([(centres[i], centres[j]) for i in range(size) for j in range(size) if (i + j) % 2 == 0])
  return GaussianMixture(np.ones(len(means)), means, np.full(len(means), std ** 2))


def mixture64(dim: int = 64, num_components: int = 16, seed: int = 0) -> GaussianMixture:
  """16 anisotropic, randomly rotated Gaussians in 64-D with uneven weights (per-coordinate std ~0.55).

  Means ~ N(0, 0.25 I); each component's standard deviations are log-uniform in [0.05, 0.5]
  along the axes of a random rotation (QR of a Gaussian matrix); weights ~ Dirichlet(4).
  """
  dim = _validate.check_int("dim", dim, min=1)
  num_components = _validate.check_int("num_components", num_components, min=1)
  rng = np.random.default_rng(_validate.check_int("seed", seed, min=0))
  means = 0.5 * rng.standard_normal((num_components, dim))
  stds = np.exp(rng.uniform(np.log(0.05), np.log(0.5), (num_components, dim)))
  q, r = np.linalg.qr(rng.standard_normal((num_components, dim, dim)))
  q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
  covs = np.einsum("kij,kj,klj->kil", q, stds ** 2, q)
  weights = rng.dirichlet(np.full(num_components, 4.0))
  return GaussianMixture(weights, means, covs)


MIXTURES = {"ring2d": ring2d, "grid2d": grid2d, "mixture64": mixture64}


def get_mixture(name: str, **kwargs) -> GaussianMixture:
  """A ready-made mixture by name: 'ring2d', 'grid2d', 'mixture64'."""
  if name not in MIXTURES:
    raise ValueError(f"Unknown mixture {name!r}; expected one of {sorted(MIXTURES)}.")
  return MIXTURES[name](**kwargs)


__all__ = ["GaussianMixture", "denoise", "log_prob", "score", "data_log_prob", "component_logits", "responsibilities",
           "sample", "denoiser", "ExactDenoiser", "class_mixtures", "GuidedDenoiser", "gaussian_flow_map", "flow_map", "ring2d", "grid2d", "mixture64",
           "MIXTURES", "get_mixture"]
