"""Distribution-matching step cost: time and memory of the two- and three-player game against
the single-player DSM step of the same network.

For one network architecture (the gmm64 MLP, the digits U-Net), on random data:

  dsm        train.step.make_step of a one-player DSM method (the teacher's own training step);
  <method>   the distribution-matching step of experiments/distill: generator, fake score (x k)
             and, for DMD2, the GAN head's discriminator; the frozen teacher is a third network.

Time: median seconds per step over repeats, and the ratio to dsm measured in the same run.
Memory: XLA's own accounting of the compiled step (`Compiled.memory_analysis()`): argument bytes
(state + batch + frozen teacher), temporaries, outputs, and the bytes aliased from the donated
state into the new state (the players' params, optimizer moments and EMAs are updated in place:
`make_step` donates argument 0). The frozen teacher and the batch are not donated.

    python bench/dm_step.py                  # both nets, CPU
    python bench/dm_step.py --nets=mlp --repeats=9

Writes OUT.md and OUT.json (default --out=bench/DM_STEP).
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
from diffdistill import nets  # noqa: E402
from diffdistill import schedules as schedules_lib  # noqa: E402
from diffdistill.losses import distribution_matching as dm, dmd2 as dmd2_lib, dsm  # noqa: E402
from diffdistill.train import state as state_lib, step as step_lib  # noqa: E402
from diffdistill.method import Method, Update  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 2.0 ** 20


def _methods(net: nets.Net, generator, k: int):
  teacher = net.denoise
  dmd2_features, dim = nets.trunk_features(net)
  kw = dict(schedule=net.schedule)
  return {
      "diff_instruct": (dm.diff_instruct(generator, teacher, net.denoise, **kw), None),
      "dmd": (dm.dmd(generator, teacher, net.denoise, **kw), None),
      "sid": (dm.sid(generator, teacher, net.denoise, alpha=1.2, **kw), None),
      f"dmd2 k={k}": (dmd2_lib.dmd2(generator, teacher, net.denoise, fake_repeats=k,
                                    features=dmd2_features, gan_weight=0.01, **kw), dim),
  }


def _memory(step, state, data, frozen) -> dict:
  compiled = step.jitted.lower(state, data, frozen).compile()
  m = compiled.memory_analysis()
  if m is None:  # some backends do not report it
    return {}
  return {"argument_mib": m.argument_size_in_bytes / MIB, "temp_mib": m.temp_size_in_bytes / MIB,
          "output_mib": m.output_size_in_bytes / MIB, "donated_mib": m.alias_size_in_bytes / MIB}


def _tree_mib(tree) -> float:
  return sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)) / MIB


def bench(net_name: str, *, batch: int | None, iters: int, repeats: int, k: int) -> list[dict]:
  spec, shape, default_batch = NETS[net_name]
  batch = batch or default_batch
  spec = dict(spec)
  module = nets.get_network(spec.pop("name"), **spec)
  schedule = schedules_lib.VPLinear()
  net = nets.Net(module=module, kind="v", schedule=schedule, example_shape=shape)
  rng = jax.random.key(0)
  x = jax.random.normal(rng, (batch, *shape))
  params = nets.init_params(module, rng, x[:1])
  teacher = jax.tree.map(lambda a: a + 0.01, params)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  data = step_lib.global_batch({"x": np.asarray(x)}, mesh=mesh)
  player = lambda p: state_lib.Player.create(params=p, tx=optax.adam(1e-4), ema={"eval": 0.999})  # noqa: E731

  rows = []
  dsm_method = Method(name="dsm", updates=(Update(
      player="model", loss_fn=dsm.dsm_loss(nets.make_apply(module), schedule=schedule, kind="v")),))
  cases = {"dsm (1 player)": (dsm_method, {"model": params}, {})}
  t_init = float(schedule.t_from_logsnr(jnp.float32(-2.0 * np.log(2.5))))
  generator = dm.one_step_generator(net.denoise, schedule=schedule, t_init=t_init)
  for name, (method, head_dim) in _methods(net, generator, k).items():
    players = {"generator": params, "fake_score": params}
    if head_dim is not None:
      players["discriminator"] = dmd2_lib.init_linear_head(head_dim)
    cases[name] = (method, players, {"teacher": teacher})

  base_s = None
  for name, (method, player_params, frozen) in cases.items():
    state = state_lib.TrainState.create(
        players={n: player(jax.tree.map(jnp.copy, p)) for n, p in player_params.items()}, rng=rng)
    step = step_lib.make_step(method, mesh=mesh)
    memory = _memory(step, state, data, frozen)
    state_mib = _tree_mib(state)
    holder = [state]

    def one():
      holder[0], metrics = step(holder[0], data, frozen)
      return metrics["skipped"]

    seconds = _median_time(one, iters=iters, repeats=repeats)
    base_s = base_s or seconds
    rows.append({"net": net_name, "params": nets.num_params(params), "batch": batch, "method": name,
                 "players": len(player_params), "networks": len(player_params) + bool(frozen),
                 "step_ms": 1e3 * seconds, "ratio": seconds / base_s, "state_mib": state_mib,
                 "frozen_mib": _tree_mib(frozen), **memory})
  return rows


def write(rows: list[dict], out: str) -> None:
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  lines = ["# Distribution-matching step vs the single-player DSM step", "",
           f"Device: {device}; host {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs; jax {jax.__version__}. Median of repeats; ratio to the DSM step "
           "of the same run. Memory from XLA's compiled-step accounting (MiB): arguments (state + "
           "batch + frozen teacher), temporaries, and the bytes of the donated state aliased "
           "into the new state (updated in place).", "",
           "Command: `python bench/dm_step.py " + " ".join(sys.argv[1:]) + "`", "",
           "| net | params | batch | method | players (+ frozen teacher) | step ms | ratio | "
           "state MiB | teacher MiB | arguments MiB | temporaries MiB | donated MiB |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    f = lambda key: f"{r[key]:.1f}" if key in r else "–"  # noqa: E731
    lines.append(f"| {r['net']} | {r['params']:,} | {r['batch']} | {r['method']} | "
                 f"{r['players']} (+{r['networks'] - r['players']}) | {r['step_ms']:.1f} | "
                 f"{r['ratio']:.2f} | {r['state_mib']:.1f} | {r['frozen_mib']:.1f} | "
                 f"{f('argument_mib')} | {f('temp_mib')} | {f('donated_mib')} |")
  save(out, lines, {"device": device, "rows": rows})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--nets", default="mlp,unet_digits8")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--fake_repeats", type=int, default=5, help="DMD2's k (TTUR)")
  parser.add_argument("--out", default=os.path.join(HERE, "DM_STEP"))
  args = parser.parse_args()
  names = args.nets.split(",")
  for n in names:
    if n not in NETS:
      parser.error(f"--nets: unknown net {n!r}; expected some of {sorted(NETS)}.")
  write([r for n in names for r in bench(n, batch=args.batch, iters=args.iters,
                                           repeats=args.repeats, k=args.fake_repeats)], args.out)


if __name__ == "__main__":
  main()
