"""Per-device memory of the train step, replicated vs FSDP, without running the model.

For each network and game the state is abstract (`jax.eval_shape`: nothing is allocated) and
its per-device bytes follow from the shardings the rules give (`sharding.bytes_per_device`).
For the (net, game, N) listed in --compile, the step (`train.step.make_step`) is also lowered on
abstract shapes and compiled for N simulated CPU devices; XLA's accounting of the compiled
per-device program (`Compiled.memory_analysis()`) gives the bytes of its arguments (state +
batch + frozen teacher), temporaries, outputs and the donated state aliased into the new one
(compiling is slow on a shared 2-core CPU: ~3 min replicated and ~6 min FSDP for the digits
U-Net's DSM step, so by default only that one is compiled). Two meshes per N:

  replicated   N data x 1 fsdp: data parallelism, every device holds the whole state;
  fsdp         1 data x N fsdp: params, Adam moments, EMAs and the teacher split by the rules
               of `train.sharding` (default Rules: leaves under 4096 elements replicated).

"state / device" is the players' state plus the frozen teacher held by one device (from the
shardings); the goal is state(fsdp) <= 1.2 state(replicated) / N. The per-device batch is fixed
(--per_device_batch), so the global batch grows with N.

Games (on the same network):
  dsm    one player (params, Adam, one EMA): the teacher's own training step;
  dmd2   DMD2's game without the GAN head: generator (params, Adam, EMA) and fake score (params,
         Adam) players, the frozen teacher a third network; fake_repeats=1 here (the state does
         not depend on k, and the k repeats run one after another).

Networks: `--nets` names from `nets.NETWORKS` (default the CIFAR-10 DDPM++ U-Net, 55.7M params).
  scd    sCD: the student (params, Adam, EMA) and the frozen teacher; its step takes a jvp of the
         student (TrigFlow, no adaptive weight here).
DiT rows: `--nets=dit_XL_2` (675M params, 32x32x4 latents).

    python bench/sharding_memory.py                       # 8 and 64 simulated devices
    python bench/sharding_memory.py --devices=8 --compile=unet_ddpmpp_cifar10:dsm:8

Each device count runs in its own subprocess (XLA_FLAGS=--xla_force_host_platform_device_count).
Writes OUT.md and OUT.json (default --out=bench/SHARDING_MEMORY).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2.0 ** 20

# example shape [H, W, C] per network; the DiT row is ready for nets/dit.py (latent 32x32x4)
NET_SHAPES = {"unet_ddpmpp_cifar10": (32, 32, 3), "unet_digits8": (8, 8, 1),
              "dit_XL_2": (32, 32, 4), "dit_S_2": (32, 32, 4)}  # DiT: ImageNet-256 SD-VAE latents


def _worker(args) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import optax

  from diffdistill import nets, parametrization, schedules
  from diffdistill.losses import distribution_matching as dm, dmd2, dsm, scm
  from diffdistill.train import sharding, state as state_lib, step as step_lib
  from diffdistill.method import Method, Update

  n = jax.device_count()
  rows = []
  for net_name in args.nets.split(","):
    if net_name not in nets.NETWORKS:
      rows.append({"net": net_name, "devices": n, "missing": f"{net_name} is not in nets.NETWORKS"})
      continue
    module = nets.get_network(net_name)
    apply = nets.make_apply(module)
    shape = NET_SHAPES[net_name]
    schedule = schedules.EDM()
    dropout = bool(getattr(module, "dropout", 0.0))
    x1 = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    params = jax.eval_shape(lambda r: nets.init_params(module, r, jnp.zeros(x1.shape)),
                            jax.random.key(0))
    denoise = parametrization.as_denoiser(apply, kind="edm", schedule=schedule)
    batch = n * args.per_device_batch
    for game in args.games.split(","):
      if game == "dsm":
        method = Method(name="dsm", updates=(Update(player="model", loss_fn=dsm.dsm_loss(
            apply, schedule=schedule, kind="edm", weighting="edm", time_sampler="lognormal",
            dropout=dropout)),))
        player_emas = {"model": {"eval": 0.999}}
        frozen = None
      elif game == "scd":
        trig = schedules.TrigFlow()
        method = scm.scm(apply, parametrization.as_denoiser(apply, kind="flow", schedule=trig),
                         schedule=trig, adaptive_weighting=False)
        player_emas = {"student": {"eval": 0.999}}
        frozen = {"teacher": params}
      else:
        generator = dm.one_step_generator(denoise, schedule=schedule, t_init=80.0)
        method = dmd2.dmd2(generator, denoise, denoise, schedule=schedule, fake_repeats=1)
        player_emas = {"generator": {"eval": 0.999}, "fake_score": {}}
        frozen = {"teacher": params}

      def init(player_emas=player_emas):
        p = nets.init_params(module, jax.random.key(0), jnp.zeros(x1.shape))
        return state_lib.TrainState.create(players={
            name: state_lib.Player.create(params=p, tx=optax.adam(1e-4), ema=ema)
            for name, ema in player_emas.items()}, rng=jax.random.key(1))

      abstract = jax.eval_shape(init)
      for mode, mesh in (("replicated", step_lib.make_mesh()),
                         ("fsdp", step_lib.make_mesh(data=1, fsdp=n))):
        state_sh = step_lib.state_sharding(abstract, mesh)
        frozen_sh = step_lib.state_sharding(frozen, mesh) if frozen else None
        state_bytes = sharding.bytes_per_device(abstract, state_sh)
        if frozen:
          state_bytes += sharding.bytes_per_device(frozen, frozen_sh)
        rows.append({
            "net": net_name, "params": nets.num_params(params), "game": game, "devices": n,
            "mode": mode, "mesh": dict(mesh.shape), "global_batch": batch,
            "state_mib": state_bytes / MIB})
        if f"{net_name}:{game}:{n}" not in args.compile.split(","):
          continue
        step = step_lib.make_step(method, mesh=mesh, state_sharding=state_sh,
                                  frozen_sharding=frozen_sh)
        spec = lambda tree, sh: jax.tree.map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
        data = {"x": jax.ShapeDtypeStruct((batch, *shape), jnp.float32,
                                          sharding=step_lib.batch_sharding(mesh))}
        start = time.perf_counter()
        compiled = step.jitted.lower(spec(abstract, state_sh), data,
                                     spec(frozen, frozen_sh) if frozen else {}).compile()
        m = compiled.memory_analysis()
        rows[-1].update(argument_mib=m.argument_size_in_bytes / MIB,
                        temp_mib=m.temp_size_in_bytes / MIB,
                        output_mib=m.output_size_in_bytes / MIB,
                        alias_mib=m.alias_size_in_bytes / MIB,
                        compile_s=time.perf_counter() - start)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  return rows


def write(rows: list[dict], out: str, command: str) -> None:
  lines = ["# Per-device memory of the compiled step: replicated vs FSDP", "",
           f"XLA:CPU with N simulated devices (the per-device program's own accounting, "
           f"`Compiled.memory_analysis()`), host {platform.processor() or platform.machine()}; "
           "nothing is allocated or run. MiB per device. state = players (params, Adam, EMAs) + "
           "frozen teacher held by one device; arguments = state + batch shard + teacher; "
           "goal: fsdp state <= 1.2 / N of replicated, i.e. state ratio x N <= 1.2. Columns from "
           "the compiled step only where it was compiled (--compile); '–' elsewhere.", "", f"Command: `{command}`", "",
           "| net | params | game | N | mesh (data x fsdp) | global batch | state | arguments | "
           "temporaries | outputs | donated | state ratio x N | compile s |",
           "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  rep = {(r["net"], r["game"], r["devices"]): r for r in rows if r.get("mode") == "replicated"}
  for r in rows:
    if "missing" in r:
      lines.append(f"| {r['net']} | – | – | {r['devices']} | not available: {r['missing']} "
                   "| | | | | | | | |")
      continue
    base = rep[(r["net"], r["game"], r["devices"])]
    ratio = (f"{r['state_mib'] / base['state_mib'] * r['devices']:.3f}" if r["mode"] == "fsdp"
             else "–")
    mesh = f"{r['mesh']['data']} x {r['mesh']['fsdp']}"
    f = lambda key, fmt=".1f": format(r[key], fmt) if key in r else "–"  # noqa: E731
    lines.append(f"| {r['net']} | {r['params'] / 1e6:.1f}M | {r['game']} | {r['devices']} | {mesh} | "
                 f"{r['global_batch']} | {r['state_mib']:.1f} | {f('argument_mib')} | "
                 f"{f('temp_mib')} | {f('output_mib')} | {f('alias_mib')} | "
                 f"{ratio} | {f('compile_s', '.0f')} |")
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(out + ".json", "w") as f:
    json.dump({"command": command, "rows": rows}, f, indent=2)
  print("\n".join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", default="8,64", help="simulated device counts")
  parser.add_argument("--nets", default="unet_ddpmpp_cifar10,unet_digits8,dit_XL_2")
  parser.add_argument("--compile", default="unet_digits8:dsm:8",
                      help="net:game:devices entries whose step is compiled for memory_analysis")
  parser.add_argument("--games", default="dsm,dmd2,scd")
  parser.add_argument("--per_device_batch", type=int, default=4)
  parser.add_argument("--out", default=os.path.join(ROOT, "bench", "SHARDING_MEMORY"))
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--rows", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    with open(args.rows, "w") as f:
      json.dump(_worker(args), f)
    return
  rows = []
  for n in args.devices.split(","):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={int(n)}",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = f"{args.out}.{n}.tmp.json"
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", f"--rows={path}",
                    f"--nets={args.nets}", f"--games={args.games}", f"--compile={args.compile}",
                    f"--per_device_batch={args.per_device_batch}"], env=env, check=True)
    with open(path) as f:
      rows += json.load(f)
    os.remove(path)
  write(rows, args.out, "python bench/sharding_memory.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
  main()
