"""Feature-space image metrics beside FID: Inception Score, KID, precision/recall, density/coverage.

With p(y|x) = softmax(logits(x)) over Inception's 1008 classes, real features R [N, d] and
generated features G [M, d] (pool3, 2048-D):

  IS   = exp(E_x KL(p(y|x) || p(y))), p(y) = E_x p(y|x), on each of `num_splits` contiguous
         splits; mean and standard deviation over splits (10 splits, as the papers).
  KID  = unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 on random subsets of m samples of each
         set (without replacement); mean and standard deviation over subsets.
  precision = (1/M) sum_j 1[exists i: |g_j - r_i| <= NND_k(r_i)],
  recall    = (1/N) sum_i 1[exists j: |r_i - g_j| <= NND_k(g_j)]            (k = 3),
  density   = 1/(k M) sum_j sum_i 1[|g_j - r_i| <= NND_k(r_i)],
  coverage  = (1/N) sum_i 1[exists j: |g_j - r_i| <= NND_k(r_i)]           (k = 5),
  NND_k(x) the distance from x to its k-th nearest neighbour in its own set (itself excluded).

Pairwise distances are computed in row blocks (memory O(block * N)), never as an [N, M] array.

References:
  Salimans et al., Improved Techniques for Training GANs, NeurIPS 2016 (IS).
  Binkowski et al., Demystifying MMD GANs, ICLR 2018 (KID).
  Kynkaanniemi et al., Improved Precision and Recall Metric for Assessing Generative Models,
  NeurIPS 2019.  Naeem et al., Reliable Fidelity and Diversity Metrics for Generative Models,
  ICML 2020.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffdistill import _validate

Array = jax.Array


def _features(name: str, x, *, min_rows: int) -> Array:
  x = jnp.asarray(x)
  if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a float array [N, d], got shape {x.shape} dtype {x.dtype}.")
  if x.shape[0] < min_rows:
    raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}.")
  return x


def inception_score(logits: Array, *, num_splits: int = 10) -> tuple[Array, Array]:
  """(mean, std) over `num_splits` contiguous splits of exp(E KL(p(y|x) || p(y))); logits [N, C]."""
  _validate.check_int("num_splits", num_splits, min=1)
  logits = _features("logits", logits, min_rows=num_splits)
  n = logits.shape[0] - logits.shape[0] % num_splits  # equal splits; a remainder < num_splits is dropped
  return _inception_score(logits[:n], num_splits)


@functools.partial(jax.jit, static_argnums=1)
def _inception_score(logits, num_splits):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logp = logp.reshape(num_splits, -1, logp.shape[-1])  # [S, N/S, C]
  log_py = jax.nn.logsumexp(logp, axis=1, keepdims=True) - jnp.log(logp.shape[1])
  kl = jnp.sum(jnp.exp(logp) * (logp - log_py), axis=-1)  # [S, N/S]
  scores = jnp.exp(jnp.mean(kl, axis=1))
  return jnp.mean(scores), jnp.std(scores)


def kernel_inception_distance(real: Array, fake: Array, *, rng: Array, num_subsets: int = 100,
                              subset_size: int = 1000) -> tuple[Array, Array]:
  """(mean, std) over subsets of the unbiased MMD^2 with the cubic kernel (a.b / d + 1)^3.

  real [N, d], fake [M, d]; each subset draws min(subset_size, N, M) rows of each set without
  replacement (jax.random.choice with `rng`).
  """
  rng = _validate.check_key("rng", rng)
  _validate.check_int("num_subsets", num_subsets, min=1)
  _validate.check_int("subset_size", subset_size, min=2)
  real, fake = _features("real", real, min_rows=2), _features("fake", fake, min_rows=2)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real and fake must have the same d, got {real.shape} and {fake.shape}.")
  m = min(subset_size, real.shape[0], fake.shape[0])
  return _kid(real, fake, rng, num_subsets, m)


def _mmd2_cubic(x, y):
  d = x.shape[1]
  kxx = (x @ x.T / d + 1.0) ** 3
  kyy = (y @ y.T / d + 1.0) ** 3
  kxy = (x @ y.T / d + 1.0) ** 3
  m = x.shape[0]
  off = lambda k: (jnp.sum(k) - jnp.trace(k)) / (m * (m - 1))
  return off(kxx) + off(kyy) - 2.0 * jnp.mean(kxy)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _kid(real, fake, rng, num_subsets, m):
  def one(key):
    kr, kf = jax.random.split(key)
    x = real[jax.random.choice(kr, real.shape[0], (m,), replace=False)]
    y = fake[jax.random.choice(kf, fake.shape[0], (m,), replace=False)]
    return _mmd2_cubic(x.astype(jnp.float32), y.astype(jnp.float32))

  values = jax.lax.map(one, jax.random.split(rng, num_subsets))
  return jnp.mean(values), jnp.std(values)


def _row_blocks(fn, x, block):
  """fn applied to row blocks of x [N, d] (padded with x's first row), results concatenated [N, ...]."""
  n = x.shape[0]
  nb = -(-n // block)
  xp = jnp.concatenate([x, jnp.broadcast_to(x[:1], (nb * block - n, x.shape[1]))])
  out = jax.lax.map(fn, xp.reshape(nb, block, -1))
  return out.reshape((nb * block,) + out.shape[2:])[:n]


def _sq_dist(a, b):
  d2 = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * jnp.matmul(
      a, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(d2, 0.0)


def _knn_radii2(x, k, block):
  """Squared distance from each row of x to its k-th nearest other row, [N]."""
  # The k + 1 smallest distances include the row itself (0).
  return _row_blocks(lambda xb: -jax.lax.top_k(-_sq_dist(xb, x), k + 1)[0][:, k], x, block)


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _precision_recall(real, fake, *, k, block):
  r_real, r_fake = _knn_radii2(real, k, block), _knn_radii2(fake, k, block)
  precision = _row_blocks(lambda fb: jnp.any(_sq_dist(fb, real) <= r_real[None], axis=1), fake, block)
  recall = _row_blocks(lambda rb: jnp.any(_sq_dist(rb, fake) <= r_fake[None], axis=1), real, block)
  return jnp.mean(precision.astype(jnp.float32)), jnp.mean(recall.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("k", "block"))
def _density_coverage(real, fake, *, k, block):
  r_real = _knn_radii2(real, k, block)
  counts = _row_blocks(lambda fb: jnp.sum(_sq_dist(fb, real) <= r_real[None], axis=1), fake, block)
  nearest = _row_blocks(lambda rb: jnp.min(_sq_dist(rb, fake), axis=1), real, block)
  density = jnp.sum(counts) / (k * fake.shape[0])
  return density, jnp.mean((nearest <= r_real).astype(jnp.float32))


def _pair(real, fake, k):
  _validate.check_int("k", k, min=1)
  real = _features("real", real, min_rows=k + 1)
  fake = _features("fake", fake, min_rows=k + 1)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real and fake must have the same d, got {real.shape} and {fake.shape}.")
  dtype = jnp.promote_types(jnp.result_type(real, fake), jnp.float32)
  return real.astype(dtype), fake.astype(dtype)


def precision_recall(real: Array, fake: Array, *, k: int = 3, block: int = 1024) -> dict[str, Array]:
  """Kynkaanniemi et al.'s improved precision and recall (k-NN balls); real [N, d], fake [M, d]."""
  _validate.check_int("block", block, min=1)
  p, r = _precision_recall(*_pair(real, fake, k), k=k, block=block)
  return {"precision": p, "recall": r}


def density_coverage(real: Array, fake: Array, *, k: int = 5, block: int = 1024) -> dict[str, Array]:
  """Naeem et al.'s density and coverage (k-NN balls around real samples); real [N, d], fake [M, d]."""
  _validate.check_int("block", block, min=1)
  d, c = _density_coverage(*_pair(real, fake, k), k=k, block=block)
  return {"density": d, "coverage": c}


__all__ = ["inception_score", "kernel_inception_distance", "precision_recall", "density_coverage"]
