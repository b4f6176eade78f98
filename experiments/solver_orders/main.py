"""Runs the solver convergence table (see config.py for the command and what is measured).

Writes results.json (one record per schedule x solver x nfe), results.md (error and order
tables, sample quality) and errors.png (log-log error against NFE) into --workdir.
"""

import json
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiments/solver_orders/config.py:cpu")
flags.DEFINE_string("workdir", None, "Where results.md, results.json and errors.png go.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir):
  if config.float64:
    jax.config.update("jax_enable_x64", True)
  # Imported after the precision switch so that host grids are computed in float64.
  from diffdistill import analytic, metrics, schedules, solvers
  dtype = jnp.float64 if config.float64 else jnp.float32
  mix = analytic.get_mixture(config.mixture)
  rng = jax.random.key(config.seed)
  data = analytic.sample(mix, jax.random.fold_in(rng, 1), config.num_data, dtype)
  records = []
  jobs = [(s, n, k) for s in config.schedules for n in config.solvers for k in config.nfes]
  bar = tqdm(total=len(jobs), desc="solver x nfe")
  for sname in config.schedules:
    sch = schedules.get(sname)
    apply = analytic.denoiser(sch)
    scale = float(np.hypot(sch.alpha(sch.t_max), sch.sigma(sch.t_max)))
    x_T = scale * jax.random.normal(jax.random.fold_in(rng, 2), (config.num_samples, mix.dim), dtype)
    ref = analytic.flow_map(apply, mix, x_T, schedule=sch, t_start=sch.t_max, t_end=sch.t_min,
                            rtol=config.ref_tol, atol=config.ref_tol)
    ref_quality = {"sliced_w2": float(metrics.sliced_wasserstein(ref, data)),
                   "mmd2": float(metrics.mmd2(ref, data))}
    records.append({"schedule": sname, "solver": "reference (flow_map)", "nfe": None,
                    **ref_quality})
    for name in config.solvers:
      for nfe in config.nfes:
        bar.update(1)
        _, used = solvers.steps_for_nfe(name, nfe, allow_nearest_nfe=True)
        if used > nfe:  # e.g. pndm needs >= 13 calls
          continue
        run_fn = solvers.make_sampler(apply, schedule=sch, solver=name, nfe=used,
                                      spacing=config.spacing)
        t0 = time.perf_counter()
        out = jax.block_until_ready(run_fn(mix, x_T))
        err = metrics.per_sample_error(out, ref)
        records.append({
            "schedule": sname, "solver": name, "nfe": used, "requested_nfe": nfe,
            "median_error": float(err["median"]), "rms_error": float(err["rms"]),
            "max_error": float(err["max"]),
            "sliced_w2": float(metrics.sliced_wasserstein(out, data)),
            "mmd2": float(metrics.mmd2(out, data)),
            "finite": bool(jnp.all(jnp.isfinite(out))),
            "seconds_incl_compile": time.perf_counter() - t0})
  bar.close()
  orders = empirical_orders(records, config, solvers.SOLVERS)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"config": config.to_dict(), "records": records, "orders": orders}, f, indent=1)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(records, orders, config, solvers.SOLVERS))
  plot(records, config, os.path.join(workdir, "errors.png"))
  print(open(os.path.join(workdir, "results.md")).read())


def empirical_orders(records, config, registry):
  """Slopes of log median and log RMS error against log NFE over nfe >= order_min_nfe."""
  out = {}
  for s in config.schedules:
    for n in config.solvers:
      rs = sorted((r for r in records if r["schedule"] == s and r["solver"] == n and r["nfe"]
                   and r["nfe"] >= config.order_min_nfe - 1), key=lambda r: r["nfe"])
      if len(rs) < 2:
        continue
      log_n = np.log([r["nfe"] for r in rs])
      slope = {k: float(-np.polyfit(log_n, np.log([max(r[k], 1e-300) for r in rs]), 1)[0])
               for k in ("median_error", "rms_error")}
      out[f"{s}/{n}"] = {"median": slope["median_error"], "rms": slope["rms_error"],
                         "theoretical": registry[n].order}
  return out


def _table(records, config, schedule, key, fmt="{:.2e}"):
  head = "| solver | " + " | ".join(str(k) for k in config.nfes) + " |\n"
  head += "|---" * (len(config.nfes) + 1) + "|\n"
  rows = []
  for n in config.solvers:
    cells = []
    for k in config.nfes:
      r = [x for x in records if x["schedule"] == schedule and x["solver"] == n
           and x.get("requested_nfe") == k]
      if not r:
        cells.append("n/a")
      else:
        mark = "" if r[0]["nfe"] == k else f" ({r[0]['nfe']})"
        cells.append(fmt.format(r[0][key]) + mark)
    rows.append(f"| {n} | " + " | ".join(cells) + " |")
  return head + "\n".join(rows) + "\n"


def markdown(records, orders, config, registry):
  lines = [f"# Solver convergence on {config.mixture} ({config.num_samples} samples, "
           f"{config.spacing} spacing, {'float64' if config.float64 else 'float32'})\n",
           "Errors are per-sample |x - x_ref| / sqrt(d) against analytic.flow_map; a number in "
           "parentheses is the NFE actually used (nearest feasible budget below the column's).\n"]
  lines.append("## Empirical order (slope of log median / log RMS error vs log NFE, nfe >= "
               f"{config.order_min_nfe}) vs theoretical order\n")
  lines.append("| solver | theory | " + " | ".join(config.schedules) + " |\n"
               + "|---" * (len(config.schedules) + 2) + "|")
  for n in config.solvers:
    cells = [f"{orders[f'{s}/{n}']['median']:.2f} / {orders[f'{s}/{n}']['rms']:.2f}"
             if f"{s}/{n}" in orders else "n/a" for s in config.schedules]
    lines.append(f"| {n} | {registry[n].order} | " + " | ".join(cells) + " |")
  lines.append("")
  for s in config.schedules:
    ref = [r for r in records if r["schedule"] == s and r["nfe"] is None][0]
    lines.append(f"## {s}\n")
    lines.append("### Median per-sample error\n")
    lines.append(_table(records, config, s, "median_error"))
    lines.append("### RMS per-sample error\n")
    lines.append(_table(records, config, s, "rms_error"))
    lines.append(f"### Sliced W2 to exact data samples (reference flow map: "
                 f"{ref['sliced_w2']:.3f})\n")
    lines.append(_table(records, config, s, "sliced_w2", "{:.3f}"))
    lines.append(f"### MMD^2 to exact data samples (reference flow map: {ref['mmd2']:.2e})\n")
    lines.append(_table(records, config, s, "mmd2", "{:.1e}"))
  return "\n".join(lines) + "\n"


def plot(records, config, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(config.schedules), figsize=(5 * len(config.schedules), 4.5),
                           sharey=True)
  for ax, s in zip(np.atleast_1d(axes), config.schedules):
    colors = plt.get_cmap("tab20")(np.linspace(0.0, 1.0, len(config.plot_solvers)))
    for n, color in zip(config.plot_solvers, colors):
      pts = sorted({(r["nfe"], r["median_error"]) for r in records
                    if r["schedule"] == s and r["solver"] == n and r["nfe"]})
      if pts:
        ax.loglog(*zip(*pts), marker="o", ms=3, label=n, color=color)
    for p, style in ((1, ":"), (2, "--"), (3, "-.")):
      x = np.array([20.0, 100.0])
      ax.loglog(x, 0.03 * (x / 20.0) ** (-p), "k" + style, lw=0.8, alpha=0.5)
    ax.set_title(s)
    ax.set_xlabel("NFE")
    ax.grid(True, which="both", alpha=0.3)
  np.atleast_1d(axes)[0].set_ylabel("median per-sample error vs flow map")
  np.atleast_1d(axes)[-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def main(argv):
  del argv
  run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
