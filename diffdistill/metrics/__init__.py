"""Sample-quality and accuracy measures, all jit-able and chunked so that 50k samples fit in memory.

Distances between sample sets x [N, d] and y [M, d]:
  sliced_wasserstein   sqrt(E_theta W2^2(theta^T x, theta^T y)) over fixed random unit directions;
  mmd2                 unbiased MMD^2 (U-statistic) with a sum of RBF kernels;
  energy_distance      2 E|X - Y| - E|X - X'| - E|Y - Y'| (U-statistics within sets);
  frechet_distance     |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2) (FID's formula).
Paired errors against a reference map: per_sample_error (median and RMS).
For Gaussian-mixture data (analytic teachers): mean exact log-likelihood, mode coverage and
mode-weight error; `mixture_sample_quality` / `mixture_scores` (metrics/mixture.py) score samples
against exact draws, each measure with its floor (what the experiments' tables report).

References:
  Bonneel et al., Sliced and Radon Wasserstein Barycenters, 2015; Gretton et al., A Kernel
  Two-Sample Test, JMLR 2012; Szekely & Rizzo, Energy statistics, 2013; Heusel et al., GANs
  Trained by a Two Time-Scale Update Rule (FID), NeurIPS 2017.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import _validate
from diffdistill import analytic
# FID's Frechet distance, streaming moments and reference files, the other image metrics and the
# PF-ODE likelihood live in submodules; their public names are metrics.<name> too.
from diffdistill.metrics.frechet import (StreamingMoments, _frechet_from_moments,
                                         frechet_distance_float64, frechet_distance_from_moments,
                                         load_statistics, save_statistics)
from diffdistill.metrics.image import (density_coverage, inception_score, kernel_inception_distance,
                                       precision_recall)
from diffdistill.metrics.likelihood import pf_ode_bits_per_dim, pf_ode_nll

Array = jax.Array


def _samples(name: str, x, *, min_samples: int) -> Array:
  """x [N, ...] as a floating [N, D] array (integers and bools promoted to float32: pixel values
  and counts are fine inputs); at least `min_samples` rows."""
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"{name} must have shape [N, ...] (one row per sample), got a scalar.")
  if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    x = x.astype(jnp.float32)
  elif not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a real array, got dtype {x.dtype}.")
  if x.shape[0] < min_samples:
    raise ValueError(f"{name} needs at least {min_samples} sample{'s' * (min_samples > 1)} "
                     f"(rows), got shape {x.shape}.")
  # An explicit row length: reshape(N, -1) cannot infer it when N = 0.
  return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _check_pair(x, y) -> tuple[Array, Array]:
  """x [N, ...] and y [M, ...] flattened to [N, D] and [M, D], checked: same D, N, M >= 2."""
  x, y = _samples("x", x, min_samples=2), _samples("y", y, min_samples=2)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"x and y must be [N, d] and [M, d] (after flattening) with the same d; "
                     f"got {x.shape} and {y.shape}.")
  dtype = jnp.result_type(x.dtype, y.dtype)
  return x.astype(dtype), y.astype(dtype)


def _block_sum(x: Array, y: Array, fn: Callable[[Array], Array], block: int) -> Array:
  """sum_{i, j} fn(|x_i - y_j|^2) over all pairs, in row blocks of x (fn maps [b, M] -> [b, M, ...])."""
  n = x.shape[0]
  nb = -(-n // block)
  pad = nb * block - n
  xp = jnp.concatenate([x, jnp.zeros((pad, x.shape[1]), x.dtype)]).reshape(nb, block, -1)
  valid = (jnp.arange(nb * block) < n).reshape(nb, block)
  y2 = jnp.sum(y * y, axis=1)

  def one(args):
    xb, vb = args
    d2 = jnp.sum(xb * xb, axis=1)[:, None] + y2[None, :] - 2.0 * xb @ y.T
    d2 = jnp.maximum(d2, 0.0)
    vals = fn(d2)  # [b, M, ...]
    mask = vb.reshape((-1,) + (1,) * (vals.ndim - 1))
    return jnp.sum(jnp.where(mask, vals, 0.0), axis=(0, 1))

  return jnp.sum(jax.lax.map(one, (xp, valid)), axis=0)


@functools.partial(jax.jit, static_argnames=("num_projections", "seed"))
def sliced_wasserstein(x: Array, y: Array, *, num_projections: int = 256, seed: int = 0) -> Array:
  """Sliced Wasserstein-2 distance over `num_projections` (>= 1) fixed (seeded) random unit directions.

  Unequal sample counts are compared through their quantile functions at the midpoints
  of the larger sample's ranks.
  """
  _validate.check_int("num_projections", num_projections, min=1)
  _validate.check_int("seed", seed, min=0)
  x, y = _check_pair(x, y)
  theta = jax.random.normal(jax.random.PRNGKey(seed), (x.shape[1], num_projections), x.dtype)
  theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
  px = jnp.sort(x @ theta, axis=0)  # [N, P]
  py = jnp.sort(y @ theta, axis=0)  # [M, P]
  if px.shape[0] != py.shape[0]:
    n = max(px.shape[0], py.shape[0])
    q = (jnp.arange(n, dtype=x.dtype) + 0.5) / n
    quantile = lambda p: jax.vmap(lambda col: jnp.interp(q, (jnp.arange(p.shape[0]) + 0.5) / p.shape[0], col),
                                  in_axes=1, out_axes=1)(p)
    px, py = quantile(px), quantile(py)
  return jnp.sqrt(jnp.mean((px - py) ** 2))


def default_bandwidths(x: Array, y: Array, factors: Sequence[float] = (0.25, 1.0, 4.0)) -> Array:
  """RBF scales h^2 = f * E|X - X'|^2, the expected squared distance of the pooled samples.

  E|X - X'|^2 = 2 tr(Cov) is computed from moments, without pairwise distances.
  """
  x, y = _check_pair(x, y)
  z = jnp.concatenate([x, y])
  scale = 2.0 * jnp.sum(jnp.var(z, axis=0))
  return scale * jnp.asarray(factors, z.dtype)


def mmd2(x: Array, y: Array, *, bandwidths: Array | None = None, block: int = 512) -> Array:
  """Unbiased MMD^2 with k(a, b) = sum_h exp(-|a - b|^2 / h) (h: squared bandwidths).

  Args:
    x: [N, d]; y: [M, d], finite (a NaN or inf is a ValueError where concrete; under jit it
      makes the estimate NaN).
    bandwidths: squared scales h > 0, [H]; default `default_bandwidths(x, y)`. Checked where
      concrete; a traced h <= 0 gives a meaningless number.
    block: rows per chunk of the pairwise kernel sums (>= 1).
  Returns:
    The U-statistic estimate (can be slightly negative when the distributions agree).
  """
  _validate.check_finite("x", x)
  _validate.check_finite("y", y)
  if bandwidths is not None and _validate.is_concrete(bandwidths):
    h = np.asarray(bandwidths, np.float64)
    if h.ndim > 1 or h.size == 0 or not np.all(np.isfinite(h) & (h > 0)):
      raise ValueError(f"bandwidths must be a non-empty [H] array of finite squared scales > 0, "
                       f"got {bandwidths!r}.")
  return _mmd2(x, y, bandwidths=bandwidths, block=block)


@functools.partial(jax.jit, static_argnames=("block",))
def _mmd2(x, y, *, bandwidths, block):
  _validate.check_int("block", block, min=1)
  x, y = _check_pair(x, y)
  h = default_bandwidths(x, y) if bandwidths is None else jnp.asarray(bandwidths, x.dtype)
  h = jnp.atleast_1d(h)
  kern = lambda d2: jnp.sum(jnp.exp(-d2[..., None] / h), axis=-1)
  n, m = x.shape[0], y.shape[0]
  nh = h.shape[0]  # k(a, a) = number of kernels, removed from the within-set sums.
  kxx = (_block_sum(x, x, kern, block) - n * nh) / (n * (n - 1))
  kyy = (_block_sum(y, y, kern, block) - m * nh) / (m * (m - 1))
  kxy = _block_sum(x, y, kern, block) / (n * m)
  return kxx + kyy - 2.0 * kxy


@functools.partial(jax.jit, static_argnames=("block",))
def energy_distance(x: Array, y: Array, *, block: int = 512) -> Array:
  """2 E|X - Y| - E|X - X'| - E|Y - Y'|, with unbiased within-set means; >= 0, = 0 iff equal laws.

  block: rows per chunk of the pairwise sums (>= 1).
  """
  _validate.check_int("block", block, min=1)
  x, y = _check_pair(x, y)
  dist = lambda d2: jnp.sqrt(d2 + 1e-30) - jnp.sqrt(jnp.asarray(1e-30, d2.dtype))
  n, m = x.shape[0], y.shape[0]
  exy = _block_sum(x, y, dist, block) / (n * m)
  exx = _block_sum(x, x, dist, block) / (n * (n - 1))
  eyy = _block_sum(y, y, dist, block) / (m * (m - 1))
  return 2.0 * exy - exx - eyy


def gaussian_moments(x: Array) -> tuple[Array, Array]:
  """Mean [d] and unbiased covariance [d, d] of samples x [N, d] (N >= 2)."""
  x = _samples("x", x, min_samples=2)
  mu = jnp.mean(x, axis=0)
  xc = x - mu
  return mu, xc.T @ xc / (x.shape[0] - 1)


@jax.jit
def frechet_distance(x: Array, y: Array) -> Array:
  """The Frechet (FID-formula) distance between Gaussian fits of two sample sets."""
  x, y = _check_pair(x, y)
  return _frechet_from_moments(*gaussian_moments(x), *gaussian_moments(y))


@jax.jit
def per_sample_error(x: Array, ref: Array) -> dict[str, Array]:
  """Paired error e_i = |x_i - ref_i|_2 / sqrt(d) (the per-coordinate RMS of sample i).

  Returns {"median": median_i e_i, "rms": sqrt(mean_i e_i^2), "max": max_i e_i}. Report the
  median beside the RMS: a few samples that switch modes dominate the RMS.
  """
  if x.shape != ref.shape:
    raise ValueError(f"x and ref must have the same shape, got {x.shape} and {ref.shape}.")
  x, ref = _samples("x", x, min_samples=1), _samples("ref", ref, min_samples=1)
  e = jnp.sqrt(jnp.mean((x - ref) ** 2, axis=1))
  return {"median": jnp.median(e), "rms": jnp.sqrt(jnp.mean(e * e)), "max": jnp.max(e)}


@jax.jit
def mixture_log_likelihood(mix: analytic.GaussianMixture, x: Array) -> Array:
  """Mean exact log p0(x_i) under the mixture (the data distribution); x [N, d], N >= 1."""
  x = _mixture_samples(mix, x)
  return jnp.mean(analytic.data_log_prob(mix, x))


def _mixture_samples(mix: analytic.GaussianMixture, x) -> Array:
  """x [N, d] with the mixture's d and N >= 1, as a floating array."""
  x = jnp.asarray(x)
  if x.ndim != 2 or x.shape[1] != mix.dim:
    raise ValueError(f"x must have shape [N, d] with the mixture's d = {mix.dim}, got {x.shape}.")
  return _samples("x", x, min_samples=1)


@functools.partial(jax.jit, static_argnames=("block",))
def mode_counts(mix: analytic.GaussianMixture, x: Array, *, block: int = 4096) -> Array:
  """How many samples fall to each component (hard assignment by responsibility), [K].

  x: [N, d], N >= 1; block: rows per chunk (>= 1).
  """
  _validate.check_int("block", block, min=1)
  x = _mixture_samples(mix, x)
  n = x.shape[0]
  nb = -(-n // block)
  xp = jnp.concatenate([x, jnp.broadcast_to(mix.means[0], (nb * block - n, x.shape[1])).astype(x.dtype)])
  valid = (jnp.arange(nb * block) < n).reshape(nb, block)

  def one(args):
    xb, vb = args
    k = jnp.argmax(analytic.responsibilities(mix, xb), axis=1)
    return jnp.sum(jax.nn.one_hot(k, mix.num_components, dtype=jnp.int32) * vb[:, None], axis=0)

  return jnp.sum(jax.lax.map(one, (xp.reshape(nb, block, -1), valid)), axis=0)


def mode_stats(mix: analytic.GaussianMixture, x: Array, *, min_fraction: float = 0.1,
               tail_radius: float = 1.5) -> dict[str, Array]:
  """Mode coverage, mode-weight error and per-mode covariance error of samples x under the mixture.

  Each sample is assigned to its most responsible component. A component is covered when it
  receives at least `min_fraction` of its expected count weights_k * N. The weight error is the
  total variation 0.5 sum_k |f_k - weights_k| between the empirical assignment frequencies f and
  the true weights. The covariance error is sum_k weights_k ||C_k - Sigma_k||_F / ||Sigma_k||_F,
  with C_k the sample covariance of the samples assigned to k (0 when fewer than 2 are): a
  generator that shrinks each mode (mode seeking within a component) shows here even when its
  weights are right; an empty mode counts as error 1. It is not zero for exact samples (about
  sqrt((d + 1) / N_k) for a d-dimensional mode with N_k samples), so compare with the same
  statistic of N exact samples. Also returned: `cov_errors` [K], the per-component errors.

  The covariance error splits in two (docs/distribution_matching.md, "Why one-step generators
  stretch their modes"): `tail_share`, sum_k weights_k of the share of k's samples farther than
  `tail_radius` sqrt(tr Sigma_k) from its mean (mass smeared towards other modes; in high
  dimension an exact sample lies at ~1.0 of that radius), and `core_cov_error`, the covariance
  error of the other samples (the shape of the mode itself). Both have floors too (exact samples
  in 2-D do reach 1.5 radii): compare with `metrics.mode_floor`.
  x: [N, d], N >= 1; min_fraction in [0, 1]; tail_radius > 0.
  """
  x = _mixture_samples(mix, x)
  if not 0.0 <= min_fraction <= 1.0:
    raise ValueError(f"min_fraction must lie in [0, 1], got {min_fraction}.")
  if not tail_radius > 0:
    raise ValueError(f"tail_radius must be > 0, got {tail_radius}.")
  counts = mode_counts(mix, x)
  n = x.shape[0]
  freq = counts / n
  covered = counts >= min_fraction * mix.weights * n
  cov_errors, core_cov_errors, tail_shares = _mode_cov_errors(mix, x, tail_radius)
  return {"coverage": jnp.mean(covered.astype(jnp.float32)),
          "weight_tv": 0.5 * jnp.sum(jnp.abs(freq - mix.weights)),
          "cov_error": jnp.sum(mix.weights * cov_errors), "cov_errors": cov_errors,
          "tail_share": jnp.sum(mix.weights * tail_shares),
          "core_cov_error": jnp.sum(mix.weights * core_cov_errors)}


@jax.jit
def _mode_cov_errors(mix: analytic.GaussianMixture, x: Array,
                     tail_radius: float) -> tuple[Array, Array, Array]:
  """Each [K]: ||C_k - Sigma_k||_F / ||Sigma_k||_F over all samples assigned to k (hard
  assignment, as in `mode_counts`) and over those within tail_radius sqrt(tr Sigma_k) of mu_k
  (C_k unbiased, 0 for fewer than 2 samples), and the share of k's samples beyond that radius."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(dtype)
  assign = jnp.argmax(analytic.responsibilities(mix, x), axis=1)
  onehot = jax.nn.one_hot(assign, mix.num_components, dtype=dtype)  # [N, K]
  true = mix.covs.astype(dtype)
  radius = jnp.sqrt(jnp.trace(true, axis1=1, axis2=2))  # [K]
  dist = jnp.linalg.norm(x - mix.means.astype(dtype)[assign], axis=1) / radius[assign]  # [N]
  core = onehot * (dist <= tail_radius)[:, None].astype(dtype)

  def errors(member):
    nk = jnp.sum(member, axis=0)
    mean = (member.T @ x) / jnp.maximum(nk, 1.0)[:, None]  # [K, d]
    centred = x[:, None, :] - mean[None]  # [N, K, d]
    scatter = jnp.einsum("nk,nki,nkj->kij", member, centred, centred)
    cov = jnp.where((nk >= 2)[:, None, None], scatter / jnp.maximum(nk - 1.0, 1.0)[:, None, None],
                    0.0)
    return (jnp.linalg.norm((cov - true).reshape(len(nk), -1), axis=1)
            / jnp.linalg.norm(true.reshape(len(nk), -1), axis=1))

  nk = jnp.sum(onehot, axis=0)
  tail = 1.0 - jnp.sum(core, axis=0) / jnp.maximum(nk, 1.0)
  return errors(onehot), errors(core), jnp.where(nk > 0, tail, 0.0)


# scores against a known mixture build on the functions above, so they are imported last
from diffdistill.metrics.mixture import (mixture_sample_quality, mixture_scores,  # noqa: E402
                                         mode_floor)

__all__ = ["sliced_wasserstein", "default_bandwidths", "mmd2", "energy_distance", "frechet_distance",
           "frechet_distance_from_moments", "gaussian_moments", "per_sample_error",
           "mixture_log_likelihood", "mode_counts", "mode_stats",
           "mixture_sample_quality", "mixture_scores", "mode_floor",
           # image metrics and the likelihood (submodules)
           "StreamingMoments", "frechet_distance_float64", "load_statistics", "save_statistics",
           "inception_score", "kernel_inception_distance", "precision_recall", "density_coverage",
           "pf_ode_nll", "pf_ode_bits_per_dim"]
