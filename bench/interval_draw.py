"""iCT's interval draw: Gumbel-max categorical (before) against the inverse-CDF draw (now).

iCT (Song & Dhariwal 2023) draws each example's interval from a discretised lognormal over the
N(k) - 1 <= s1 = 1280 intervals of its curriculum. `jax.random.categorical` does that by Gumbel-max:
b x s1 noise values and an argmax per step. `losses.consistency._sample_intervals` now inverts
the cumulative mass instead (b uniforms and a binary search), the same distribution
(tests/test_consistency.py::test_ict_lognormal_interval_draw). This times both, alone and inside
the jitted value-and-grad of iCT's loss with the ring2d and gmm64 MLP students, at N = s1:

    python bench/interval_draw.py --repeats=5

Writes OUT.md and OUT.json (default --out=bench/INTERVAL_DRAW). Median ms per call over repeats
of `iters` calls; the ratio of two numbers from the same run is what to read on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.scipy.special import erf  # noqa: E402

from diffdistill import nets, parametrization, schedules  # noqa: E402
from diffdistill.losses import consistency as cm  # noqa: E402


def gumbel_max_draw(rng, b, n, *, lognormal, max_intervals, grid):
  """The draw as it was: a categorical over the intervals' log-mass (b x max_intervals noise)."""
  p_mean, p_std = lognormal
  j = jnp.arange(max_intervals)
  lo, hi = jnp.log(grid(j + 1, n)), jnp.log(grid(j, n))
  cdf = lambda v: erf((v - p_mean) / (math.sqrt(2.0) * p_std))  # noqa: E731
  logits = jnp.where(j < n, jnp.log(jnp.maximum(cdf(hi) - cdf(lo), 1e-30)), -jnp.inf)
  return jax.random.categorical(rng, logits, shape=(b,))


DRAWS = {"gumbel_max (before)": gumbel_max_draw, "inverse_cdf (now)": cm._sample_intervals}
NETS = {"ring2d": (dict(name="mlp", features=128, num_blocks=3, emb_dim=128), 2),
        "gmm64": (dict(name="mlp", features=256, num_blocks=3, emb_dim=128), 64)}


def timed(fn, args, iters, repeats):
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      r = fn(*args)
    jax.block_until_ready(r)
    out.append((time.perf_counter() - t0) / iters * 1e3)
  return statistics.median(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--s1", type=int, default=1280)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="bench/INTERVAL_DRAW")
  args = parser.parse_args(argv)
  schedule = schedules.get("vp_linear")
  grid = cm._make_grid(schedule, "karras", None, None, jnp.float32, sigma_hat=True)
  n = jnp.int32(args.s1)
  rows = []
  for label, draw in DRAWS.items():
    fn = jax.jit(lambda k, draw=draw: draw(k, args.batch, n, lognormal=(-1.1, 2.0),
                                           max_intervals=args.s1, grid=grid))
    rows.append({"what": "draw alone", "draw": label,
                 "ms": timed(fn, (jax.random.key(0),), args.iters, args.repeats)})
  for net_name, (spec, dim) in NETS.items():
    spec = dict(spec)
    module = nets.get_network(spec.pop("name"), **spec)
    x = jax.random.normal(jax.random.key(1), (args.batch, dim))
    params = nets.init_params(module, jax.random.key(2), x[:1])
    den = parametrization.as_denoiser(nets.make_apply(module), kind="v", schedule=schedule)
    f = cm.consistency_function(den, schedule=schedule)
    for label, draw in DRAWS.items():
      cm._sample_intervals, saved = draw, cm._sample_intervals
      try:
        loss = cm.ct_loss(f, schedule=schedule, num_steps=args.s1, distance="pseudo_huber",
                          weighting="inverse_delta_sigma", lognormal=(-1.1, 2.0),
                          max_intervals=args.s1)
        step = jax.jit(jax.grad(lambda p, k: loss(p, {"x": x}, k, target_params=p,
                                                  step=jnp.int32(0))[0]))
        ms = timed(step, (params, jax.random.key(3)), args.iters, args.repeats)
      finally:
        cm._sample_intervals = saved
      rows.append({"what": f"iCT loss value-and-grad, {net_name} MLP", "draw": label, "ms": ms})
  dev = jax.devices()[0]
  lines = ["# iCT's interval draw: Gumbel-max categorical against the inverse-CDF draw", "",
           f"Device: {dev.platform} ({dev.device_kind}); host {platform.machine()}, "
           f"{os.cpu_count()} CPUs; jax {jax.__version__}. Batch {args.batch}, N = {args.s1}. "
           f"Median of {args.repeats} repeats of {args.iters} calls.", "",
           f"Command: `python bench/interval_draw.py --repeats={args.repeats}`", "",
           "| what | draw | ms | vs before |", "|---|---|---:|---:|"]
  for before, now in zip(rows[::2], rows[1::2]):
    for r in (before, now):
      lines.append(f"| {r['what']} | {r['draw']} | {r['ms']:.2f} | {r['ms'] / before['ms']:.2f} |")
  with open(args.out + ".md", "w") as fh:
    fh.write("\n".join(lines) + "\n")
  with open(args.out + ".json", "w") as fh:
    json.dump({"rows": rows, "args": vars(args)}, fh, indent=1)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
