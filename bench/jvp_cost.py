"""The cost of the JVP: an sCM and a MeanFlow train step against a plain DSM step of the same net.

    PYTHONPATH=. python bench/jvp_cost.py                      # the gmm64 MLP (a minute on 2 cores)
    PYTHONPATH=. python bench/jvp_cost.py --nets=mlp,unet_digits8 --batch_size=64
    PYTHONPATH=. python bench/jvp_cost.py --nets=dit_B_2 --batch_size=64 --dtype=bfloat16  # a GPU

The DiTs (`dit_S_2`, `dit_B_2`, `dit_L_2`, `dit_XL_2`) run on 32x32x4 latents: 256 tokens, the
ImageNet-256 setting of DiT and MeanFlow; their forward and DSM-step rows are also the network's
throughput (examples/s = batch / time).

Each step is one jitted `value_and_grad` of the loss plus an Adam update, timed after a warm-up
call: median (and min) over `--repeats` timings of `--inner` back-to-back steps. Next to the steps,
the pieces: one forward of the network, and one `jax.jvp` of it (forward + tangent), so a ratio
above 2x can be read off: sCM/MeanFlow = backward through the jvp's primal + the tangent pass
+ (sCD only) the teacher. Writes bench/jvp_cost.json and bench/jvp_cost.md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from diffdistill import nets, schedules
from diffdistill.losses import dsm, meanflow, scm

_NETS = flags.DEFINE_list("nets", ["mlp"], "Networks: mlp (64-D), unet_digits8, dit_{S,B,L,XL}_2.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype of the network (params stay float32).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timings per entry (median reported).")
_INNER = flags.DEFINE_integer("inner", 5, "Steps per timing.")
_OUT = flags.DEFINE_string("out", os.path.dirname(os.path.abspath(__file__)), "Output folder.")


def _net(name):
  if name.startswith("dit_"):  # 32x32x4 latents, patch 2: 256 tokens
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[_DTYPE.value]
    return nets.get_network(name, dtype=dtype), (32, 32, 4), \
        nets.get_network(name, dtype=dtype, extra_cond=("r",))
  if name == "mlp":
    return nets.get_network("mlp", features=256, num_blocks=3, emb_dim=128), (64,), \
        nets.get_network("mlp", features=256, num_blocks=3, emb_dim=128, extra_cond=("r",))
  if name == "unet_digits8":
    kw = dict(dropout=0.0)
    return nets.get_network("unet_digits8", **kw), (8, 8, 1), \
        nets.get_network("unet_digits8", extra_cond=("r",), **kw)
  raise ValueError(f"Unknown net {name!r}; expected mlp, unet_digits8 or dit_{{S,B,L,XL}}_2.")


def _timed(fn, *args) -> tuple[float, float]:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(_INNER.value):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append(1e3 * (time.perf_counter() - start) / _INNER.value)
  return statistics.median(times), min(times)


def _train_step(loss_fn, tx, extra=None):
  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, _), grads = jax.value_and_grad(
        lambda p: loss_fn(p, batch, rng, **(extra or {})), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def measure(name: str) -> list[dict]:
  module, shape, module_r = _net(name)
  b = _BATCH.value
  rng = jax.random.key(0)
  x = jax.random.normal(rng, (b, *shape), jnp.float32)
  batch = {"x": x}
  apply, apply_r = nets.make_apply(module), nets.make_apply(module_r)
  params = nets.init_params(module, rng, x)
  params_r = nets.init_params(module_r, rng, x)
  tx = optax.adam(1e-4)
  trig, rf = schedules.TrigFlow(sigma_data=0.5), schedules.RectifiedFlow(t_max=1.0)
  t = jnp.full((b,), 0.7)
  rows = []

  def row(what, fn, *args):
    med, best = _timed(fn, *args)
    rows.append({"net": name, "what": what, "median_ms": med, "min_ms": best})

  row("forward", jax.jit(lambda p: apply(p, x, t)), params)
  row("jvp (forward + tangent)", jax.jit(lambda p: jax.jvp(
      lambda xx, tt: apply(p, xx, tt), (x, t), (x, jnp.ones_like(t)))), params)
  dsm_step = _train_step(dsm.dsm_loss(apply, schedule=trig, kind="flow"), tx)
  row("DSM step", dsm_step, params, tx.init(params), batch, rng)
  scm_step = _train_step(scm.scm_loss(apply, schedule=trig, adaptive_weighting=False), tx,
                         {"step": jnp.int32(0)})
  row("sCT step", scm_step, params, tx.init(params), batch, rng)
  def fm_loss(p, batch, rng):  # plain flow matching with MeanFlow's net: the same forward, no jvp
    t_rng, e_rng = jax.random.split(rng)
    tt = jax.nn.sigmoid(-0.4 + jax.random.normal(t_rng, (b,)))
    eps = jax.random.normal(e_rng, batch["x"].shape)
    tb = tt.reshape(b, *([1] * len(shape)))
    z = (1 - tb) * batch["x"] + tb * eps
    return jnp.mean(jnp.square(apply_r(p, z, tt, r=tt) - (eps - batch["x"]))), {}

  row("flow-matching step (MeanFlow's net, no jvp)", _train_step(fm_loss, tx), params_r,
      tx.init(params_r), batch, rng)
  mf_step = _train_step(meanflow.meanflow_loss(apply_r, schedule=rf), tx)
  row("MeanFlow step", mf_step, params_r, tx.init(params_r), batch, rng)
  base = next(r["median_ms"] for r in rows if r["what"] == "DSM step")
  fwd = next(r["median_ms"] for r in rows if r["what"] == "forward")
  for r in rows:
    r["vs_dsm_step"] = r["median_ms"] / base
    r["vs_forward"] = r["median_ms"] / fwd
  return rows


def main(argv):
  del argv
  rows = [r for name in _NETS.value for r in measure(name)]
  meta = {"backend": jax.default_backend(), "devices": str(jax.devices()[0]),
          "machine": platform.machine(), "batch_size": _BATCH.value, "repeats": _REPEATS.value,
          "inner": _INNER.value, "dtype": _DTYPE.value, "jax": jax.__version__}
  with open(os.path.join(_OUT.value, "jvp_cost.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  lines = [f"# JVP cost ({meta['backend']}, {meta['devices']}, batch {meta['batch_size']}, "
           f"{meta['dtype']}, median of {meta['repeats']} x {meta['inner']} steps)", "",
           "| net | what | median ms | min ms | / DSM step | / forward |",
           "|---|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['net']} | {r['what']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                 f"{r['vs_dsm_step']:.2f} | {r['vs_forward']:.2f} |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(_OUT.value, "jvp_cost.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
