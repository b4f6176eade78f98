"""CT, iCT and ECT against their closed form while they train: budget or defect?

  python -m experiments.distill.consistency_closed_form --workdir=runs/consistency_closed_form \\
      [--methods=ct,ect] [--dim=16] [--eval_every=250] [--num_steps=0] [--config KEY=VALUE ...]

On single-Gaussian data N(m, diag v) the probability-flow map from t to t_min is affine in x_t
(`analytic.gaussian_flow_map`), so the consistency function a student should learn is known at
every t. This script runs the distill experiment's own recipe of each method (its `_gmm64`
variant: the same student MLP, schedule, EMA and loss; `--num_steps` 0 keeps the variant's
steps) with a one-component mixture file as the teacher, and every `--eval_every` steps measures
the student's relative error ||f_theta(x_t, t) - Phi(x_t)|| / ||Phi(x_t)|| on fresh x_t ~ p_t at
three times:

  one call   t = t_max                 the 1-step sampler's only call
  mid        sigma/alpha = 0.8         where the 2-step sampler re-noises to
  low        sigma/alpha = 0.1         near the data end, where the boundary condition holds

next to the posterior mean's error at t_max (one DDIM step: what a collapsed student returns).
If the one-call error falls with the steps as the others do, the method only needs steps; if it
stalls at the posterior mean while the others fall, something starves the long jump. Step 0 is
the student's start (the network copy of the teacher). Writes curves.json and closed_form.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffdistill import analytic
from diffdistill.losses import consistency as cm
from diffdistill.methods import _common, _consistency
from diffdistill.train import loop
from experiments import teachers
from experiments.distill import config as config_lib, main as main_lib, setup as setup_lib
from experiments.distill import curves as curves_lib, stages as stages_lib

SIGMA_HATS = {"one call (t_max)": None, "mid (sigma/alpha = 0.8)": 0.8,
              "low (sigma/alpha = 0.1)": 0.1}


def gaussian(dim: int, seed: int = 0) -> analytic.GaussianMixture:
  """N(m, diag v): m in [-2, 2], v log-uniform in [0.01, 2] (meanflow_closed_form's law)."""
  rng = np.random.default_rng(seed)
  m = rng.uniform(-2, 2, dim)
  v = np.exp(rng.uniform(np.log(0.01), np.log(2.0), dim))
  return analytic.GaussianMixture(np.ones(1), m[None], np.diag(v)[None])


def make_errors(setup, net, n: int = 2048):
  """errors(params, key) -> [3] relative errors of f at SIGMA_HATS' times; and their times."""
  s, mix = setup.teacher.schedule, setup.teacher.mixture
  f = cm.consistency_function(net.denoise, schedule=net.schedule, t_min=setup.t_end)
  ts = [setup.t_start if h is None else _consistency.mid_time(s, h) for h in SIGMA_HATS.values()]

  @jax.jit
  def errors(params, key):
    out = []
    for t in ts:
      k0, k1, key = jax.random.split(key, 3)
      x0 = analytic.sample(mix, k0, n, dtype=jnp.float32)
      x = s.alpha(jnp.float32(t)) * x0 + s.sigma(jnp.float32(t)) * jax.random.normal(k1, x0.shape)
      exact = analytic.gaussian_flow_map(mix, x, schedule=s, t_start=t, t_end=setup.t_end)
      got = f(params, x, jnp.full((n,), t, jnp.float32))
      out.append(jnp.sqrt(jnp.sum((got - exact) ** 2) / jnp.sum(exact ** 2)))
    return jnp.stack(out)

  return errors, ts


def posterior_mean_error(setup, n: int = 2048) -> float:
  """Relative error of the exact denoiser (one DDIM step) at t_max against the exact map."""
  s, mix = setup.teacher.schedule, setup.teacher.mixture
  k0, k1 = jax.random.split(jax.random.key(7))
  x0 = analytic.sample(mix, k0, n, dtype=jnp.float32)
  t = jnp.float32(setup.t_start)
  x = s.alpha(t) * x0 + s.sigma(t) * jax.random.normal(k1, x0.shape)
  exact = analytic.gaussian_flow_map(mix, x, schedule=s, t_start=setup.t_start, t_end=setup.t_end)
  d = analytic.denoise(mix, x, jnp.full((n,), t), schedule=s)
  return float(jnp.sqrt(jnp.sum((d - exact) ** 2) / jnp.sum(exact ** 2)))


def run(method: str, mixture_file: str, workdir: str, args) -> dict:
  config = config_lib.get_config(f"{method}_gmm64")
  config.teacher.mixture_file = mixture_file
  config.progress = False
  if args.num_steps:
    config[method].num_steps = args.num_steps
  for key, value in args.config.items():
    _common.apply_overrides(config, {key: value})
  setup = setup_lib.make_setup(config)
  plan = main_lib.build_plan(config, setup)
  main_lib.validate(config, setup, workdir, plan)
  os.makedirs(workdir, exist_ok=True)
  setup.workdir = workdir
  net = _common.student_net(config, setup)
  errors, ts = make_errors(setup, net)
  curve = {"step": [], **{name: [] for name in SIGMA_HATS}}

  def record(step, params):  # also logged: metrics.jsonl's closed_form/<time> while it trains
    e = np.asarray(errors(params, jax.random.key(10_000 + step)))
    curve["step"].append(int(step))
    for name, val in zip(SIGMA_HATS, e):
      curve[name].append(float(val))
    return {name.split(" (")[0].replace(" ", "_"): float(v) for name, v in zip(SIGMA_HATS, e)}

  def hooks(stage):
    if stage.name != method:
      return ()
    return (loop.Hook(args.eval_every, lambda state, step: record(
        step, jax.device_get(state.players["student"].ema["eval"])), name="closed_form"),)

  start = time.perf_counter()
  results, _ = stages_lib.run_stages(plan, setup, workdir, progress=False, hooks=hooks)
  record(0, results["copy"]["student"])  # the student's start: the network copy
  order = np.argsort(curve["step"], kind="stable")
  for key in curve:
    curve[key] = [curve[key][i] for i in order]
  curve.update(seconds=time.perf_counter() - start, times=ts,
               num_steps=int(config[method].num_steps),
               posterior_mean=posterior_mean_error(setup))
  return curve


def figure(curves: dict, path: str) -> None:
  """One panel per time of SIGMA_HATS, one line per recipe, the posterior mean as reference."""
  pm = next(iter(curves.values()))["posterior_mean"]
  curves_lib.error_panels(curves, SIGMA_HATS, path,
                          ylabel="||f_theta - Phi|| / ||Phi|| (closed form)",
                          reference=(pm, "posterior mean (1 DDIM step)"))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--methods", default="ct,ect")
  ap.add_argument("--dim", type=int, default=16)
  ap.add_argument("--eval_every", type=int, default=250)
  ap.add_argument("--num_steps", type=int, default=0, help="0: the _gmm64 variant's steps")
  ap.add_argument("--config", action="append", default=[], help="KEY=VALUE distill overrides")
  args = ap.parse_args(argv)
  if args.dim < 1 or args.eval_every < 1 or args.num_steps < 0:
    raise ValueError("--dim and --eval_every must be >= 1 and --num_steps >= 0.")
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - {"ct", "ict", "ect"})
  if unknown:
    raise ValueError(f"--methods takes ct, ict and ect; got {unknown}.")
  args.config = config_lib.parse_overrides(args.config)
  os.makedirs(args.workdir, exist_ok=True)
  mixture_file = os.path.join(args.workdir, f"gaussian{args.dim}.npz")
  teachers.save_mixture(mixture_file, gaussian(args.dim))
  curves = {}
  for method in methods:
    curves[method] = run(method, mixture_file, os.path.join(args.workdir, method), args)
    last = {name: round(curves[method][name][-1], 4) for name in SIGMA_HATS}
    print(f"{method}: final relative errors {last}; posterior mean at t_max "
          f"{curves[method]['posterior_mean']:.4f} ({curves[method]['seconds']:.0f} s)")
  with open(os.path.join(args.workdir, "curves.json"), "w") as f:
    json.dump({"args": vars(args), "curves": curves}, f, indent=1)
  figure(curves, os.path.join(args.workdir, "closed_form.png"))


if __name__ == "__main__":
  main()
