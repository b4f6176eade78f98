"""Sampling a trained teacher and measuring it: PF-ODE samples, figures, distances to exact data.

Samples come from the probability-flow ODE of the teacher's denoiser, integrated by
`analytic.flow_map` (diffrax Dopri8, adaptive, 8th order) from t_max to t_min, started at
x_T = sigma(t_max) eps (the prior every VP/EDM sampler starts from; its mismatch with the true
marginal at t_max is what a trained teacher lives with too).

For data that are samples of an analytic mixture (toy2d/ring, toy2d/grid, gmm/*), the exact
data law is known: `sample_quality` reports the sliced W2 and the unbiased MMD^2 between teacher
samples and exact samples, and the floor of each: the same distance between two independent
exact sample sets of the same size.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import analytic, metrics
from diffdistill import schedules as schedules_lib

# dataset name -> the analytic mixture its examples are drawn from
EXACT_MIXTURES = {"toy2d/ring": "ring2d", "toy2d/grid": "grid2d", "gmm/ring2d": "ring2d",
                  "gmm/grid2d": "grid2d", "gmm/mixture64": "mixture64"}


def exact_mixture(dataset: str) -> analytic.GaussianMixture | None:
  name = EXACT_MIXTURES.get(dataset)
  return None if name is None else analytic.get_mixture(name)


def sample(denoise: Callable, params, rng: jax.Array, *, num: int, shape: tuple[int, ...],
           schedule: schedules_lib.Schedule, rtol: float) -> np.ndarray:
  """num samples [num, *shape] of the teacher's PF-ODE (denoise must be built once: hashable)."""
  x_t = schedule.sigma(jnp.asarray(schedule.t_max)) * jax.random.normal(rng, (num, *shape))
  x0 = analytic.flow_map(denoise, params, x_t, schedule=schedule, t_start=schedule.t_max,
                         t_end=schedule.t_min, rtol=rtol, atol=rtol)
  return np.asarray(x0)


def sample_quality(samples: np.ndarray, mix: analytic.GaussianMixture, *, num_pairs: int = 1,
                   seed: int = 0) -> dict:
  """Sliced W2 and MMD^2 to exact samples with their floors: `metrics.mixture_sample_quality`."""
  return metrics.mixture_sample_quality(samples, mix, num_pairs=num_pairs, seed=seed)


def save_figure(samples: np.ndarray, path: str, *, title: str = "") -> None:
  """Scatter of the first two coordinates (vectors) or an image grid ([N, H, W, C] in [-1, 1])."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if samples.ndim == 2:
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5)
    ax.set_aspect("equal")
  else:
    n = samples.shape[0]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    h, w, c = samples.shape[1:]
    grid = np.ones((rows * (h + 1), cols * (w + 1), c), np.float32)
    for i, img in enumerate(np.clip((samples + 1) / 2, 0, 1)):
      r, q = divmod(i, cols)
      grid[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = img
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(grid.squeeze(-1) if c == 1 else grid, cmap="gray" if c == 1 else None,
              interpolation="nearest")
    ax.axis("off")
  ax.set_title(title)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
