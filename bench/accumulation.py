"""Gradient accumulation: does `lax.scan` over micro-batches pay XLA:CPU's while-loop penalty?

`train.step` averages the gradients of k micro-batches in a `lax.scan`. On XLA:CPU a network's
backward pass inside a while loop ran ~20x slower than unrolled for DMD2's repeated updates
(bench/DM_STEP.md), so `make_step` unrolls repeats on CPU. This bench measures the same question
for accumulation, on the digits U-Net's DSM loss and the gmm64 MLP's, one device:

  full batch      value_and_grad on the whole batch (k = 1: the cost without accumulation);
  scan rolled     the k micro-batch gradients summed in lax.scan(unroll=1) (a while loop);
  scan unrolled   the same scan with unroll=k (straight-line code);
  make_step k     the library's step with accumulation_steps=k (optimizer and EMA included),
                  against make_step with k = 1.

    python bench/accumulation.py                # both nets, k = 4, CPU
    python bench/accumulation.py --nets=mlp --k=2

Writes OUT.md and OUT.json (default --out=bench/ACCUMULATION).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench.distill_step import NETS, _median_time, save  # noqa: E402
from diffdistill import nets, schedules  # noqa: E402
from diffdistill.losses import dsm  # noqa: E402
from diffdistill.train import state as state_lib, step as step_lib  # noqa: E402


def _accumulated(grad_fn, k: int, unroll: int):
  def fn(params, x, rng):
    micro = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    def body(carry, xs):
      i, m = xs
      (loss, _), g = grad_fn(params, {"x": m}, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (loss, g)), None

    zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), params))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro), unroll=unroll)
    return total

  return jax.jit(fn)


def bench(net_name: str, *, k: int, iters: int, repeats: int) -> list[dict]:
  spec, shape, batch = NETS[net_name]
  spec = dict(spec)
  module = nets.get_network(spec.pop("name"), **spec)
  rng = jax.random.key(0)
  x = jax.random.normal(rng, (batch, *shape))
  params = nets.init_params(module, rng, x[:1])
  loss_fn = dsm.dsm_loss(nets.make_apply(module), schedule=schedules.VPCosine(), kind="v")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  full = jax.jit(lambda p, xx, r: grad_fn(p, {"x": xx}, r))
  rows = []
  cases = {"full batch (k=1)": lambda: full(params, x, rng)[0][0],
           f"scan rolled (k={k})": lambda f=_accumulated(grad_fn, k, 1): f(params, x, rng)[0],
           f"scan unrolled (k={k})": lambda f=_accumulated(grad_fn, k, k): f(params, x, rng)[0]}
  mesh = step_lib.make_mesh(jax.devices()[:1])
  data = step_lib.global_batch({"x": np.asarray(x)}, mesh=mesh)
  for kk in (1, k):
    step = step_lib.make_train_step(loss_fn, mesh=mesh, accumulation_steps=kk)
    holder = [state_lib.TrainState.create(players={"model": state_lib.Player.create(
        params=params, tx=optax.adam(1e-4), ema={"eval": 0.999})}, rng=rng)]

    def one(step=step, holder=holder):
      holder[0], m = step(holder[0], data)
      return m["loss"]

    cases[f"make_step (accumulation_steps={kk})"] = one
  base = None
  for name, fn in cases.items():
    seconds = _median_time(fn, iters=iters, repeats=repeats)
    base = base or seconds
    rows.append({"net": net_name, "params": nets.num_params(params), "batch": batch, "case": name,
                 "ms": 1e3 * seconds, "ratio": seconds / base})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--nets", default="mlp,unet_digits8")
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "ACCUMULATION"))
  args = parser.parse_args()
  rows = [r for n in args.nets.split(",")
          for r in bench(n, k=args.k, iters=args.iters, repeats=args.repeats)]
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  lines = ["# Gradient accumulation: lax.scan rolled vs unrolled", "",
           f"Device: {device}; host {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs (shared with other jobs); jax {jax.__version__}. Median ms "
           "per call; ratio to the full-batch gradient of the same net.", "",
           "Command: `python bench/accumulation.py " + " ".join(sys.argv[1:]) + "`", "",
           "| net | params | batch | case | ms | ratio |", "|---|---:|---:|---|---:|---:|"]
  lines += [f"| {r['net']} | {r['params']:,} | {r['batch']} | {r['case']} | {r['ms']:.1f} | "
            f"{r['ratio']:.2f} |" for r in rows]
  save(args.out, lines, {"command": sys.argv, "device": device, "rows": rows})


if __name__ == "__main__":
  main()
