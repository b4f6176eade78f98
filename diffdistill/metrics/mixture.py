"""Sample quality against a Gaussian mixture whose law is known exactly (the analytic teachers):
distances to exact samples, and the mode statistics, each with its floor (the same measure
between exact samples of the same size, which is not zero for a finite set).

    q = metrics.mixture_sample_quality(samples, mix)    # sliced W2, MMD^2 and their floors
    s = metrics.mixture_scores(samples, mix)            # + mode weight TV, per-mode covariance error

Both draw their exact samples from fixed keys, so two sample sets of the same size are scored
against the same reference (a table's rows are comparable).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import analytic
from diffdistill import metrics  # the package (its own functions are defined before it imports this)


def mixture_sample_quality(samples, mix: analytic.GaussianMixture, *, num_pairs: int = 1,
                           seed: int = 0) -> dict:
  """Sliced W2 and MMD^2 from `samples` [N, d] to N exact samples, and the floor of each: the
  same distance between two independent exact sets of N (mean, max / std over num_pairs)."""
  samples = np.asarray(samples)
  n = samples.shape[0]
  keys = jax.random.split(jax.random.PRNGKey(seed + 777), 2 * num_pairs + 1)
  ref = analytic.sample(mix, keys[0], n)
  x = jnp.asarray(samples, ref.dtype)
  floors_w2, floors_mmd = [], []
  for i in range(num_pairs):
    a, b = analytic.sample(mix, keys[2 * i + 1], n), analytic.sample(mix, keys[2 * i + 2], n)
    floors_w2.append(float(metrics.sliced_wasserstein(a, b)))
    floors_mmd.append(float(metrics.mmd2(a, b)))
  return {"sliced_w2": float(metrics.sliced_wasserstein(x, ref)),
          "sliced_w2_floor_mean": float(np.mean(floors_w2)),
          "sliced_w2_floor_max": float(np.max(floors_w2)),
          "mmd2": float(metrics.mmd2(x, ref)),
          "mmd2_floor_mean": float(np.mean(floors_mmd)),
          "mmd2_floor_std": float(np.std(floors_mmd)),
          "mmd2_floor_max_abs": float(np.max(np.abs(floors_mmd)))}


_MODE_FLOORS: dict = {}


def mode_floor(mix: analytic.GaussianMixture, n: int) -> dict:
  """`metrics.mode_stats` of n exact samples (a fixed draw, cached): the floor of the mode-weight
  error, the per-mode covariance error and its two parts (tail share, core) at this sample size."""
  key = (n, np.asarray(mix.means).tobytes(), np.asarray(mix.eigvals).tobytes())
  if key not in _MODE_FLOORS:
    x = analytic.sample(mix, jax.random.key(4242), n)
    _MODE_FLOORS[key] = {k: float(v) for k, v in metrics.mode_stats(mix, x).items() if v.ndim == 0}
  return _MODE_FLOORS[key]


def mixture_scores(samples, mix: analytic.GaussianMixture) -> dict:
  """A table row's distribution columns for samples [N, ...] of `mix` (flattened to [N, d]):
  sliced_w2, mmd2, mode_weight_tv, mode_cov_error and its two parts mode_tail_share and
  mode_core_cov_error (`metrics.mode_stats`), each with its `<name>_floor`."""
  x = np.asarray(samples).reshape(len(samples), -1)
  q = mixture_sample_quality(x, mix)
  modes = metrics.mode_stats(mix, jnp.asarray(x, jnp.float32))
  floor = mode_floor(mix, len(x))
  return {"sliced_w2": q["sliced_w2"], "sliced_w2_floor": q["sliced_w2_floor_mean"],
          "mmd2": q["mmd2"], "mmd2_floor": q["mmd2_floor_mean"],
          "mode_weight_tv": float(modes["weight_tv"]), "mode_weight_tv_floor": floor["weight_tv"],
          "mode_cov_error": float(modes["cov_error"]), "mode_cov_error_floor": floor["cov_error"],
          "mode_tail_share": float(modes["tail_share"]),
          "mode_tail_share_floor": floor["tail_share"],
          "mode_core_cov_error": float(modes["core_cov_error"]),
          "mode_core_cov_error_floor": floor["core_cov_error"]}


__all__ = ["mixture_sample_quality", "mode_floor", "mixture_scores"]
