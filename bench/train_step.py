"""Train-step cost: the DSM train step against the bare forward+backward of the same network.

For each config (the networks and losses of experiments/train_teacher/config.py, on random data
of the dataset's shape, so no dataset is needed):

  fwd+bwd    jit(grad(mean(apply(params, x, t, dropout_rng)^2))), the network alone;
  DSM step   train.step.make_train_step(dsm_loss) on a one-device-or-more mesh: noise and time
             draws, parametrization, weighting, log-SNR bins, non-finite guard, optimizer, EMA,
             donated state;

reporting the time per call (least of 5 repeats), their ratio (target <= 1.1), steps/s, examples/s and peak
memory (the device's peak_bytes_in_use where the backend reports it, else XLA's compiled
estimate: arguments + outputs + temporaries of the step).

    python bench/train_step.py                       # CPU configs + CIFAR-10 U-Net at batch 8
    python bench/train_step.py --configs=cifar10_edm --batch=128 --dtype=bfloat16   # on a GPU

Writes a table to OUT.md and the numbers to OUT.json (default --out=bench/TRAIN_STEP).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffdistill import nets  # noqa: E402
from diffdistill import schedules as schedules_lib  # noqa: E402
from diffdistill.losses import dsm  # noqa: E402
from diffdistill.train import optim, state as state_lib, step as step_lib  # noqa: E402
from experiments.train_teacher import config as config_lib  # noqa: E402

SHAPES = {"toy2d/ring": (2,), "gmm/mixture64": (64,), "digits8": (8, 8, 1), "cifar10": (32, 32, 3)}
DEFAULT_BATCH = {"toy2d_cpu": None, "gmm64_cpu": None, "digits_cpu": None, "cifar10_edm": 8}
HERE = os.path.dirname(os.path.abspath(__file__))


def _time(fn, *, iters: int, repeats: int = 5) -> float:
  """Least over repeats of the mean seconds per call, after two warm-up calls (the least, not
  the median: on a shared machine the other jobs only ever add time)."""
  fn()
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / iters)
  return float(np.min(times))


def _peak_bytes(compiled) -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak"
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return int(total), "XLA estimate"


def bench_one(name: str, *, batch: int | None, dtype: str, iters: int) -> dict:
  config = config_lib.get_config(name)
  batch = batch or DEFAULT_BATCH[name] or config.batch_size
  shape = SHAPES[config.dataset.name]
  compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  module = nets.get_network(config.network.name, **config.network.kwargs, dtype=compute)
  apply = nets.make_apply(module)
  schedule = schedules_lib.get(config.schedule.name, **config.schedule.kwargs)
  dropout = bool(getattr(module, "dropout", 0.0))
  loss_fn = dsm.dsm_loss(apply, schedule=schedule, kind=config.loss.kind,
                         weighting=config.loss.weighting, time_sampler=config.loss.time_sampler,
                         dropout=dropout)
  rng = jax.random.PRNGKey(0)
  x = jax.random.normal(rng, (batch, *shape), jnp.float32)
  params = nets.init_params(module, rng, x[:1])
  mesh = step_lib.make_mesh()
  step_lib.check_batch_size(batch, mesh=mesh)

  def bare_loss(p, x, t, key):
    out = apply(p, x, t, dropout_rng=key if dropout else None)
    return jnp.mean(jnp.square(out.astype(jnp.float32)))

  t = jax.random.uniform(rng, (batch,), minval=schedule.t_min, maxval=schedule.t_max)
  fwd_bwd = jax.jit(jax.grad(bare_loss))
  bare_s = _time(lambda: fwd_bwd(params, x, t, rng), iters=iters)

  tx = optim.make_optimizer(config.optim, num_steps=config.num_steps)
  model = state_lib.Player.create(params=params, tx=tx, ema=dict(config.ema))
  state = jax.device_put(state_lib.TrainState.create(players={"model": model}, rng=rng),
                         step_lib.replicated(mesh))
  train_step = step_lib.make_train_step(loss_fn, mesh=mesh)
  data = step_lib.global_batch({"x": np.asarray(x)}, mesh=mesh)
  compiled = train_step.jitted.lower(state, data, {}).compile()
  holder = [state]

  def one_step():
    holder[0], metrics = train_step(holder[0], data)
    return metrics["loss"]

  step_s = _time(one_step, iters=iters)
  peak, how = _peak_bytes(compiled)
  return {"config": name, "network": config.network.name, "params": nets.num_params(params),
          "batch": batch, "dtype": dtype, "fwd_bwd_ms": 1e3 * bare_s, "step_ms": 1e3 * step_s,
          "ratio": step_s / bare_s, "steps_per_s": 1.0 / step_s, "examples_per_s": batch / step_s,
          "peak_mb": peak / 2**20, "memory": how}


def write(rows: list[dict], out: str) -> None:
  device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
  lines = ["# Train step vs bare forward+backward", "",
           f"Device: {device}; host: {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs; jax {jax.__version__}.", "",
           "Command: `python bench/train_step.py " + " ".join(sys.argv[1:]) + "`", "",
           "| config | network | params | batch | dtype | fwd+bwd ms | DSM step ms | ratio | "
           "steps/s | examples/s | peak MB (how) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['config']} | {r['network']} | {r['params']:,} | {r['batch']} | "
                 f"{r['dtype']} | {r['fwd_bwd_ms']:.2f} | {r['step_ms']:.2f} | {r['ratio']:.2f} | "
                 f"{r['steps_per_s']:.1f} | {r['examples_per_s']:.0f} | {r['peak_mb']:.0f} "
                 f"({r['memory']}) |")
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(out + ".json", "w") as f:
    json.dump({"device": device, "rows": rows}, f, indent=2)
  print("\n".join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="toy2d_cpu,gmm64_cpu,digits_cpu,cifar10_edm")
  parser.add_argument("--batch", type=int, default=None, help="override every config's batch")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="network compute dtype (params and optimizer stay float32)")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--out", default=os.path.join(HERE, "TRAIN_STEP"),
                      help="writes OUT.md and OUT.json")
  args = parser.parse_args()
  names = args.configs.split(",")
  for n in names:
    if n not in DEFAULT_BATCH:
      parser.error(f"--configs: unknown config {n!r}; expected some of {sorted(DEFAULT_BATCH)}.")
  write([bench_one(n, batch=args.batch, dtype=args.dtype, iters=args.iters) for n in names],
        args.out)


if __name__ == "__main__":
  main()
