"""A first look at the ground truth: noised marginals and exact probability-flow trajectories.

COMMAND:
  python -m experiments.analytic_demo.main --workdir=runs/analytic_demo
Expected runtime: ~30 s on 2 CPU cores. No network.

It draws the 2-D ring's noised marginals p_t at several times, the exact flow map's trajectories
from noise to data (diffrax, analytic.flow_map), and prints the metrics of exact samples: those of
flow-mapped noise against exact data next to the floor set by two independent exact sample sets.
"""

import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffdistill import analytic, metrics, schedules  # noqa: E402

FLAGS = flags.DEFINE_string("workdir", "runs/analytic_demo", "Where the figure goes.")
MIXTURE = flags.DEFINE_enum("mixture", "ring2d", ["ring2d", "grid2d"], "The 2-D data distribution.")
SCHEDULE = flags.DEFINE_enum("schedule", "vp_linear", sorted(schedules.SCHEDULES), "The forward process.")
NUM = flags.DEFINE_integer("num_samples", 4000, "Samples for the metrics (>= 2: their unbiased "
                           "estimates need two).", lower_bound=2)


def sample_metrics(mix, x, ref):
  """The metrics of samples x against exact data samples ref."""
  return {
      "sliced_w2": float(metrics.sliced_wasserstein(x, ref)),
      "mmd2": float(metrics.mmd2(x, ref)),
      "energy": float(metrics.energy_distance(x, ref)),
      "frechet": float(metrics.frechet_distance(x, ref)),
      "loglik": float(metrics.mixture_log_likelihood(mix, x)),
      **{k: float(v) for k, v in metrics.mode_stats(mix, x).items() if v.ndim == 0},
  }


def main(argv):
  del argv
  os.makedirs(FLAGS.value, exist_ok=True)
  mix = analytic.get_mixture(MIXTURE.value)
  sched = schedules.get(SCHEDULE.value)
  apply = analytic.denoiser(sched)
  start = time.time()

  # Exact flow of noise to data, recorded on a grid uniform in logSNR for the trajectories.
  lam = jnp.linspace(sched.logsnr_min if np.isfinite(sched.logsnr_min) else -12.0, sched.logsnr_max, 40)
  ts = np.array(jnp.clip(sched.t_from_logsnr(lam), sched.t_min, sched.t_max))
  ts[0], ts[-1] = sched.t_max, sched.t_min
  rng = jax.random.PRNGKey(0)
  x = sched.sigma(sched.t_max) * jax.random.normal(rng, (NUM.value, 2))
  path = [x]
  for t0, t1 in zip(ts[:-1], ts[1:]):
    x = analytic.flow_map(apply, mix, x, schedule=sched, t_start=float(t0), t_end=float(t1))
    path.append(x)
  path = np.stack([np.asarray(p) for p in path])  # [T, N, 2]

  data = analytic.sample(mix, jax.random.PRNGKey(1), NUM.value)
  data2 = analytic.sample(mix, jax.random.PRNGKey(2), NUM.value)
  rows = {"exact vs exact (floor)": sample_metrics(mix, data2, data),
          "flow_map(noise) vs exact": sample_metrics(mix, jnp.asarray(path[-1]), data)}

  # Figure: marginal densities at four times, then the trajectories.
  show_t = [sched.t_min, float(sched.t_from_logsnr(2.0)), float(sched.t_from_logsnr(-1.0)), sched.t_max]
  fig, axes = plt.subplots(1, 5, figsize=(20, 4))
  g = np.linspace(-2.0, 2.0, 200)
  gx, gy = np.meshgrid(g, g)
  grid = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], 1), jnp.float32)
  for ax, t in zip(axes[:4], show_t):
    lp = analytic.log_prob(mix, grid * float(jnp.sqrt(sched.alpha(t) ** 2 + sched.sigma(t) ** 2)),
                           jnp.full((grid.shape[0],), t), schedule=sched)
    ax.imshow(np.exp(np.asarray(lp)).reshape(200, 200), origin="lower", extent=(-2, 2, -2, 2), cmap="magma")
    ax.set_title(f"p_t, t={t:.3g} (logSNR {float(sched.logsnr(t)):.1f})\n(axes scaled by sqrt(a^2+s^2))")
  ax = axes[4]
  scale = np.sqrt(np.asarray(sched.alpha(ts)) ** 2 + np.asarray(sched.sigma(ts)) ** 2)[:, None, None]
  for i in range(60):
    ax.plot(path[:, i, 0] / scale[:, 0, 0], path[:, i, 1] / scale[:, 0, 0], lw=0.6, alpha=0.7)
  ax.scatter(path[-1, :1000, 0], path[-1, :1000, 1], s=1, c="k")
  ax.set_xlim(-2.5, 2.5)
  ax.set_ylim(-2.5, 2.5)
  ax.set_title("exact probability-flow trajectories\n(noise -> data, rescaled)")
  fig.tight_layout()
  out = os.path.join(FLAGS.value, "analytic_demo.png")
  fig.savefig(out, dpi=90)

  print(f"{MIXTURE.value} under {SCHEDULE.value}, {NUM.value} samples "
        f"({time.time() - start:.1f} s); figure: {out}")
  keys = list(next(iter(rows.values())))
  print("| samples | " + " | ".join(keys) + " |")
  print("|---|" + "---|" * len(keys))
  for name, r in rows.items():
    print(f"| {name} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")


if __name__ == "__main__":
  app.run(main)
