"""Distillation-step cost: each method's full step against the network work it cannot avoid.

For a student network and a network teacher of the same architecture (as after the copy stage
of experiments/distill, or a student started from a trained teacher's weights), on random data:

  baseline   jit of: grad of the student's mean-square output (fwd+bwd) plus `teacher_calls`
             teacher forwards (PD: 2 teacher DDIM steps; copy, TRACT: 1 teacher + self-teacher),
             the least work the method's loss can do;
  step       train.step.make_step(method) on a mesh: time/noise draws, grid points, targets,
             weighting, non-finite guard, optimizer, EMA, donated state, frozen teacher params;

reporting the median seconds per call over repeats (this machine is shared: the median of several
repeats, and the ratio of two numbers measured in the same run, are what to read).

    python bench/distill_step.py                        # gmm64 MLP and digits U-Net, CPU
    python bench/distill_step.py --nets=mlp --batch=2048

Writes OUT.md and OUT.json (default --out=bench/DISTILL_STEP).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from diffdistill import nets, parametrization  # noqa: E402
from diffdistill import schedules as schedules_lib  # noqa: E402
from diffdistill.losses import kd, progressive, tract  # noqa: E402
from diffdistill.train import state as state_lib, step as step_lib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NETS = {
    "mlp": (dict(name="mlp", features=256, num_blocks=3, emb_dim=128), (64,), 512),
    "unet_digits8": (dict(name="unet_digits8"), (8, 8, 1), 64),
}


def _median_time(fn, *, iters: int, repeats: int) -> float:
  jax.block_until_ready(fn())
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / iters)
  return float(statistics.median(times))


def bench(net_name: str, *, batch: int | None, iters: int, repeats: int) -> list[dict]:
  spec, shape, default_batch = NETS[net_name]
  batch = batch or default_batch
  spec = dict(spec)
  module = nets.get_network(spec.pop("name"), **spec)
  apply = nets.make_apply(module)
  schedule = schedules_lib.VPLinear()
  denoise = parametrization.as_denoiser(apply, kind="v", schedule=schedule)
  rng = jax.random.key(0)
  x = jax.random.normal(rng, (batch, *shape))
  t = jax.random.uniform(rng, (batch,), minval=0.01, maxval=1.0)
  params = nets.init_params(module, rng, x[:1])
  teacher = jax.tree.map(lambda a: a + 0.01, params)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  data = step_lib.global_batch({"x": np.asarray(x)}, mesh=mesh)
  methods = {
      "copy": (kd.denoiser_copy(denoise, denoise, schedule=schedule), {"teacher": teacher}, 1),
      "pd": (progressive.progressive_distillation(denoise, denoise, schedule=schedule),
             {"teacher": teacher, "num_steps": jnp.int32(8)}, 2),
      "tract": (tract.tract(denoise, denoise, schedule=schedule),
                {"teacher": teacher, "teacher_steps": jnp.int32(64), "num_segments": jnp.int32(8)},
                2),
  }
  rows = []
  for name, (method, frozen, teacher_calls) in methods.items():
    def bare(p, tp):
      def student_loss(p):
        return jnp.mean(jnp.square(denoise(p, x, t)))
      g = jax.grad(student_loss)(p)
      outs = [denoise(tp, x + 0.1 * i, t) for i in range(teacher_calls)]
      return g, outs
    bare_fn = jax.jit(bare)
    bare_s = _median_time(lambda: bare_fn(params, teacher), iters=iters, repeats=repeats)
    ema = dict(method.ema.get("student", {}))
    player = state_lib.Player.create(params=params, tx=optax.adam(1e-4), ema={"eval": 0.999, **ema})
    holder = [state_lib.TrainState.create(players={"student": player}, rng=rng)]
    step = step_lib.make_step(method, mesh=mesh)

    def one():
      holder[0], metrics = step(holder[0], data, frozen)
      return metrics["loss"]

    step_s = _median_time(one, iters=iters, repeats=repeats)
    rows.append({"net": net_name, "params": nets.num_params(params), "batch": batch,
                 "method": name, "teacher_calls": teacher_calls, "baseline_ms": 1e3 * bare_s,
                 "step_ms": 1e3 * step_s, "ratio": step_s / bare_s})
  return rows


def write(rows: list[dict], out: str) -> None:
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  lines = ["# Distillation step vs student fwd+bwd plus the teacher's forwards", "",
           f"Device: {device}; host {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs; jax {jax.__version__}. Median of repeats.", "",
           "Command: `python bench/distill_step.py " + " ".join(sys.argv[1:]) + "`", "",
           "| net | params | batch | method | teacher calls | baseline ms | step ms | ratio |",
           "|---|---:|---:|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['net']} | {r['params']:,} | {r['batch']} | {r['method']} | "
                 f"{r['teacher_calls']} | {r['baseline_ms']:.2f} | {r['step_ms']:.2f} | "
                 f"{r['ratio']:.2f} |")
  save(out, lines, {"device": device, "rows": rows})


def save(out: str, lines: list[str], payload: dict) -> None:
  """OUT.md (the markdown lines), OUT.json (payload), and the table on stdout."""
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(out + ".json", "w") as f:
    json.dump(payload, f, indent=2)
  print("\n".join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--nets", default="mlp,unet_digits8")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=os.path.join(HERE, "DISTILL_STEP"))
  args = parser.parse_args()
  names = args.nets.split(",")
  for n in names:
    if n not in NETS:
      parser.error(f"--nets: unknown net {n!r}; expected some of {sorted(NETS)}.")
  write([r for n in names for r in bench(n, batch=args.batch, iters=args.iters,
                                           repeats=args.repeats)], args.out)


if __name__ == "__main__":
  main()
