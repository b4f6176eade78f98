"""MeanFlow against its closed form while it trains: budget or defect?

  python -m experiments.distill.meanflow_closed_form --workdir=runs/meanflow_closed_form \\
      [--num_steps=6000] [--adaptive_p=1.0,0.5,0.0] [--dim=8] [--p_std=1.0] [--ratio_r_neq_t=0.25]
      [--teacher_velocity]

On single-Gaussian data N(m, diag v) under rectified flow the average velocity u(z, r, t) is
closed-form (tests/test_meanflow.py's `average_velocity`: affine in z). This script trains the
library's MeanFlow loss (`losses.meanflow.meanflow_loss`; the paper's (t, r) sampling unless
--p_std / --ratio_r_neq_t say otherwise) from data, or with --teacher_velocity from the exact
velocity as the distill experiment's meanflow does from its teacher, on an MLP student (the
distill experiment's, with an r input), and every `--eval_every` steps measures the student's
relative error ||u_theta - u|| / ||u|| on fresh z ~ p_t at four jumps:

  one call     (r, t) = (t_min, 1)      what a 1-step sampler uses
  half         (0.5, 1) and (t_min, 0.5) the two jumps of a 2-step sampler
  flow         r = t = 0.5              the instantaneous velocity (flow matching's target)

one curve per adaptive-weight power p (w = 1 / (err + c)^p, the paper's p = 1; 0 = plain squared
error). If the one-call error falls with the steps as the others do, the method only needs steps;
if it stalls while the others fall, the loss starves that jump. Writes curves.json and
closed_form.png to the workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffdistill import nets, schedules
from diffdistill.losses import meanflow
from experiments.distill import curves as curves_lib

JUMPS = {"one call (t_min -> 1)": (None, 1.0), "half (0.5 -> 1)": (0.5, 1.0),
         "half (t_min -> 0.5)": (None, 0.5), "flow (r = t = 0.5)": (0.5, 0.5)}


def average_velocity(m, v, z, t, r):
  """u(z, r, t) of rectified flow on N(m, diag v) (z [B, d], t and r [B])."""
  t, r = t[:, None], r[:, None]
  a_t, a_r = (1 - t) ** 2 * v + t ** 2, (1 - r) ** 2 * v + r ** 2
  return ((t + r) - v * (2 - t - r)) / (a_t + jnp.sqrt(a_r * a_t)) * (z - (1 - t) * m) - m


def run(p: float, args, m, v, schedule) -> dict:
  module = nets.get_network("mlp", features=256, num_blocks=3, emb_dim=128, extra_cond=("r",))
  apply = nets.make_apply(module)
  d = m.shape[0]
  params = nets.init_params(module, jax.random.key(0), jnp.zeros((1, d)))
  # --teacher_velocity: the exact teacher's denoiser D = z - t v(z, t), whose velocity replaces
  # eps - x (the distill experiment's setting); otherwise MeanFlow from data
  teacher = ((lambda _, z, t: z - t[:, None] * average_velocity(m, v, z, t, t))
             if args.teacher_velocity else None)
  loss_fn = meanflow.meanflow_loss(apply, teacher, schedule=schedule, adaptive_p=p,
                                   p_std=args.p_std, ratio_r_neq_t=args.ratio_r_neq_t)
  inputs = {"teacher_params": jnp.zeros(())} if args.teacher_velocity else {}
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, args.learning_rate,
                                                     min(100, args.num_steps // 2), args.num_steps,
                                                     0.1 * args.learning_rate))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    k_x, k_l = jax.random.split(key)
    x = m + jnp.sqrt(v) * jax.random.normal(k_x, (args.batch_size, d))
    grads = jax.grad(lambda q: loss_fn(q, {"x": x}, k_l, **inputs)[0])(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  t_min = float(schedule.t_min)

  @jax.jit
  def errors(params, key):
    out = []
    for r, t in JUMPS.values():
      r = t_min if r is None else r
      n = 2048
      tt, rr = jnp.full((n,), t), jnp.full((n,), r)
      k0, k1, key = jax.random.split(key, 3)
      z = (1 - t) * (m + jnp.sqrt(v) * jax.random.normal(k0, (n, d))) + t * jax.random.normal(k1, (n, d))
      u = average_velocity(m, v, z, tt, rr)
      out.append(jnp.sqrt(jnp.sum((apply(params, z, tt, r=rr) - u) ** 2) / jnp.sum(u ** 2)))
    return jnp.stack(out)

  curve = {"step": [], **{name: [] for name in JUMPS}}
  key = jax.random.key(1)
  start = time.perf_counter()
  for i in range(args.num_steps + 1):
    if i % args.eval_every == 0:
      e = np.asarray(errors(params, jax.random.key(10_000 + i)))
      curve["step"].append(i)
      for name, val in zip(JUMPS, e):
        curve[name].append(float(val))
    if i < args.num_steps:
      key, sub = jax.random.split(key)
      params, opt = step(params, opt, sub)
  curve["seconds"] = time.perf_counter() - start
  return curve


def figure(curves: dict, path: str) -> None:
  """One panel per jump of JUMPS, one line per adaptive-weight power p."""
  curves_lib.error_panels({f"p = {p}": c for p, c in curves.items()}, JUMPS, path,
                          ylabel="||u_theta - u|| / ||u|| (closed form)")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--num_steps", type=int, default=6000)
  ap.add_argument("--eval_every", type=int, default=250)
  ap.add_argument("--batch_size", type=int, default=256)
  ap.add_argument("--learning_rate", type=float, default=5e-4)
  ap.add_argument("--adaptive_p", default="1.0,0.5,0.0")
  ap.add_argument("--dim", type=int, default=8)
  ap.add_argument("--p_std", type=float, default=1.0, help="the (t, r) logit-normal's std")
  ap.add_argument("--ratio_r_neq_t", type=float, default=0.25)
  ap.add_argument("--teacher_velocity", action="store_true",
                  help="distil from the exact velocity instead of training on eps - x")
  args = ap.parse_args(argv)
  if args.num_steps < 1 or args.eval_every < 1 or args.dim < 1:
    raise ValueError("--num_steps, --eval_every and --dim must be >= 1.")
  if args.p_std <= 0 or not 0 <= args.ratio_r_neq_t <= 1:
    raise ValueError(f"--p_std must be > 0 and --ratio_r_neq_t in [0, 1], got {args.p_std} and "
                     f"{args.ratio_r_neq_t}.")
  rng = np.random.default_rng(0)
  m = jnp.asarray(rng.uniform(-2, 2, args.dim), jnp.float32)
  v = jnp.asarray(np.exp(rng.uniform(np.log(0.01), np.log(2.0), args.dim)), jnp.float32)
  schedule = schedules.RectifiedFlow(t_min=1e-3, t_max=1.0)
  os.makedirs(args.workdir, exist_ok=True)
  curves = {}
  for p in (float(s) for s in args.adaptive_p.split(",")):
    curves[p] = run(p, args, m, v, schedule)
    last = {name: curves[p][name][-1] for name in JUMPS}
    print(f"p = {p}: final relative errors {last} ({curves[p]['seconds']:.0f} s)")
  with open(os.path.join(args.workdir, "curves.json"), "w") as f:
    json.dump({"args": vars(args), "m": np.asarray(m).tolist(), "v": np.asarray(v).tolist(),
               "curves": {str(p): c for p, c in curves.items()}}, f, indent=1)
  figure(curves, os.path.join(args.workdir, "closed_form.png"))


if __name__ == "__main__":
  main()
