"""Evaluates a trained teacher against the exact data law (toy2d/ring, gmm/*):

  * sample quality: sliced W2 and unbiased MMD^2 between N PF-ODE samples of the teacher
    (`sampling.sample`, EMA params) and N exact samples, next to the floor, the same distance
    between two independent exact sets of N (mean and spread over `num_floor_pairs` pairs);
  * denoiser error per logSNR bin (gmm data): with lambda ~ U(bin), t = t(lambda),
    x0 ~ p0, x_t = alpha x0 + sigma eps,

        err(bin)  = E |D_theta(x_t, t) - E[x0 | x_t]|^2 / d     (E[x0|x_t] = analytic.denoise)
        mmse(bin) = E |E[x0 | x_t] - x0|^2 / d                  (the irreducible error)

    reported with their ratio err / mmse (the fraction of excess error over the Bayes optimum).

    python -m experiments.train_teacher.evaluate \
      --config=experiments/train_teacher/config.py:gmm64_cpu --workdir=runs/teacher_gmm64

Writes `eval.json` in the workdir and prints markdown tables.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from diffdistill import analytic
from diffdistill.losses import dsm
from experiments.train_teacher import sampling, teacher

FLAGS = flags.FLAGS


def _define_flags():
  """The command's flags, defined only when it runs: importing this module (the distill
  experiment's teachers do, for `load_teacher`) must not clash with another main's flags."""
  config_flags.DEFINE_config_file("config", None, "The config the teacher was trained with.")
  flags.DEFINE_string("workdir", None, "The teacher's run folder.")
  flags.DEFINE_integer("num_samples", 5000, "Teacher and exact samples per set.")
  flags.DEFINE_integer("num_floor_pairs", 5, "Exact-vs-exact pairs for the floor.")
  flags.DEFINE_integer("per_bin", 4096, "Denoiser evaluations per logSNR bin.")


load_teacher = teacher.load_teacher  # where it used to live


def denoiser_error_by_logsnr(denoise, params, mix, *, schedule, per_bin: int, seed: int = 0):
  """Rows {lo, hi, err, mmse, ratio} for the DSM logging bins clipped to the schedule's range."""
  lam_lo, lam_hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
  edges = [lam_lo] + [e for e in dsm.DEFAULT_LOGSNR_BIN_EDGES if lam_lo < e < lam_hi] + [lam_hi]
  fn = jax.jit(lambda p, x, t: denoise(p, x, t))
  rows = []
  for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed + i), 3)
    lam = jax.random.uniform(k1, (per_bin,), minval=lo, maxval=hi)
    t = schedule.t_from_logsnr(lam)
    x0 = analytic.sample(mix, k2, per_bin)
    xt = (schedule.alpha(t)[:, None] * x0
          + schedule.sigma(t)[:, None] * jax.random.normal(k3, x0.shape))
    exact = analytic.denoise(mix, xt, t, schedule=schedule)
    err = float(jnp.mean((fn(params, xt, t) - exact) ** 2))
    mmse = float(jnp.mean((exact - x0) ** 2))
    rows.append({"logsnr_lo": lo, "logsnr_hi": hi, "err": err, "mmse": mmse, "ratio": err / mmse})
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config, workdir = FLAGS.config, FLAGS.workdir
  mix = sampling.exact_mixture(config.dataset.name)
  if mix is None:
    raise ValueError(f"{config.dataset.name} has no exact law; evaluate supports "
                     f"{sorted(sampling.EXACT_MIXTURES)}.")
  setup, step, params = load_teacher(config, workdir)
  x = sampling.sample(setup.denoise, params, jax.random.PRNGKey(2024), num=FLAGS.num_samples,
                      shape=setup.example_shape, schedule=setup.schedule, rtol=config.sampler_rtol)
  result = {"dataset": config.dataset.name, "step": step, "ema": config.eval_ema,
            "sampler": f"analytic.flow_map (Dopri8, rtol=atol={config.sampler_rtol})",
            "quality": {"n": FLAGS.num_samples, **sampling.sample_quality(x, mix, num_pairs=FLAGS.num_floor_pairs)},
            "denoiser_error": denoiser_error_by_logsnr(setup.denoise, params, mix,
                                                       schedule=setup.schedule,
                                                       per_bin=FLAGS.per_bin)}
  setup.data.close()
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  q = result["quality"]
  print(f"{config.dataset.name} step {step}: sliced W2 {q['sliced_w2']:.4f} (floor mean "
        f"{q['sliced_w2_floor_mean']:.4f}, max {q['sliced_w2_floor_max']:.4f}); MMD^2 "
        f"{q['mmd2']:.2e} (floor mean {q['mmd2_floor_mean']:.1e}, std {q['mmd2_floor_std']:.1e})")
  print("| logSNR bin | err E|D-D*|^2/d | MMSE E|D*-x0|^2/d | err/MMSE |\n|---|---|---|---|")
  for r in result["denoiser_error"]:
    print(f"| [{r['logsnr_lo']:.1f}, {r['logsnr_hi']:.1f}) | {r['err']:.2e} | {r['mmse']:.2e} | "
          f"{r['ratio']:.3f} |")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
