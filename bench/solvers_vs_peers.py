"""diffdistill's solvers against diffusers' schedulers and k-diffusion's samplers: error and speed.

Run (from the repository root):

    python -m bench.solvers_vs_peers            # full: batch 1024, NFE 5/10/20/50, 7 repeats
    python -m bench.solvers_vs_peers --quick    # batch 256, NFE 5/10, 3 repeats (~4 min on a busy 2-core machine)

The same exact teacher, `analytic.mixture64()` (16 rotated anisotropic Gaussians in 64-D),
drives every sampler: ours through `analytic.denoiser`, the peers through a torch port of the
same closed form (`bench.peers.TorchMixture`, checked here against `analytic.denoise` in float64
before anything else runs). Two settings:

  * DDPM's discrete linear betas (`schedules.VPDiscrete.from_name("linear", 1000)`) for the
    diffusers schedulers, each run as its users run it (its own timesteps, "trailing" spacing
    and a final sigma of sigma_min where it has those options, `prediction_type="sample"`);
  * EDM (sigma in [0.002, 80], t = sigma) with Karras sigmas (rho = 7) for k-diffusion.

For each peer sampler and NFE, our matching solver runs on the identical time grid (the peer's
own noise levels, converted to our t through the logSNR), and both are scored against the
exact probability-flow map `analytic.flow_map` (diffrax Dopri8, float64, tight tolerances)
from the same x_T over the same interval by `metrics.per_sample_error` (median and RMS over
samples of the per-coordinate RMS error). Our solver with its own default grid (uniform logSNR)
is listed beside them. Timings are medians over repeats of the whole sampler in one process:
ours jitted (after a warm-up call, `jax.block_until_ready`), each peer in torch with its own
loop. Our per-NFE overhead is the slope in NFE of the wall time of our sampler with a
near-free denoiser (`0.5 * x`), compared with the slope added by the 64-D mixture denoiser.

It writes `results.json` and `results.md` to --out (default bench/results/). Runs unchanged on
a GPU machine: JAX uses its default backend and torch uses CUDA when available. On a CPU shared
with other jobs, `--torch-threads 1` keeps torch out of its spinning thread barriers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench import peers
from diffdistill import analytic, metrics, schedules, solvers



# ------------------------------------------------------------------------------------------------
# What is compared with what.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pairing:
  """A peer sampler and our solver that implements the same method."""

  peer: str  # "diffusers" or "k-diffusion"
  sampler: str  # a key of peers.DIFFUSERS_CASES or peers.K_DIFFUSION_CASES
  ours: str  # a key of solvers.SOLVERS
  # (nfe, number of grid intervals) -> None if the two are the same algorithm on that grid, or
  # the reason they differ.
  differs: Callable[[int, int], str | None] = lambda nfe, steps: None
  options: tuple = ()  # our solver's options, as (key, value) pairs

  @property
  def label(self) -> str:
    """Our solver with its non-default options, e.g. heun(final_euler=False)."""
    opts = ", ".join(f"{k}={v}" for k, v in self.options)
    return f"{self.ours}({opts})" if opts else self.ours


def _unipc_lof(nfe: int, steps: int) -> str | None:
  del nfe
  return ("diffusers lowers the order of the last steps at every step count, ours below 15 steps"
          if steps >= 15 else None)


def _unipc_no_lof(nfe: int, steps: int) -> str | None:
  del nfe
  return ("ours lowers the order of the last steps below 15 steps, this diffusers setting never"
          if steps < 15 else None)


PAIRINGS = (
    Pairing("diffusers", "DDIMScheduler", "ddim",
            lambda nfe, steps: None if 1000 % nfe == 0 else
            "diffusers' DDIM steps to t - 1000 // n, not to the next timestep (integer rounding)"),
    Pairing("diffusers", "EulerDiscreteScheduler", "euler"),
    # diffusers' Heun: Heun steps down to its last timestep, then an Euler step to sigma = 0 (a
    # final denoising); ours: every step Heun (final_euler=False) and final_denoise=True.
    Pairing("diffusers", "HeunDiscreteScheduler", "heun", options=(("final_euler", False),)),
    # Both drop to 1st order on the last step below 15 steps (lower_order_final).
    Pairing("diffusers", "DPMSolverMultistepScheduler", "dpm_solver_pp_2m"),
    Pairing("diffusers", "DPMSolverMultistepScheduler_3", "dpm_solver_pp_3m"),
    # diffusers' UniPC lowers the order of the last steps at every step count (as the UniPC
    # reference code does); ours, like DPM-Solver++, only below 15 steps. Without that option
    # (the _no_lof cases) diffusers is identical to ours from 15 steps on.
    Pairing("diffusers", "UniPCMultistepScheduler", "unipc_2", _unipc_lof),
    Pairing("diffusers", "UniPCMultistepScheduler_3", "unipc_3", _unipc_lof),
    Pairing("diffusers", "UniPCMultistepScheduler_no_lof", "unipc_2", _unipc_no_lof),
    Pairing("diffusers", "UniPCMultistepScheduler_3_no_lof", "unipc_3", _unipc_no_lof),
    Pairing("k-diffusion", "sample_euler", "euler"),
    Pairing("k-diffusion", "sample_heun", "heun", options=(("final_euler", False),)),
    Pairing("k-diffusion", "sample_dpm_2", "dpm_solver_2"),
    # k-diffusion's 2M keeps 2nd order on the last step: identical to ours with
    # lower_order_final=False; our default (1st order on the last step below 15 steps) differs.
    Pairing("k-diffusion", "sample_dpmpp_2m", "dpm_solver_pp_2m", options=(("lower_order_final", False),)),
    Pairing("k-diffusion", "sample_dpmpp_2m", "dpm_solver_pp_2m",
            lambda nfe, steps: "ours: 1st-order last step below 15 steps" if steps < 15 else None),
    Pairing("k-diffusion", "sample_lms", "lms"),
)

VP_DISCRETE = schedules.VPDiscrete.from_name("linear", peers.NUM_TRAIN_TIMESTEPS)
EDM = schedules.EDM()


def schedule_of(pairing: Pairing) -> schedules.Schedule:
  return VP_DISCRETE if pairing.peer == "diffusers" else EDM


def feasible_nfe(pairing: Pairing, nfe: int) -> int:
  """`nfe`, or nfe + 1 where the peer cannot make exactly `nfe` calls (2 calls per step)."""
  if pairing.peer == "diffusers":
    case = peers.DIFFUSERS_CASES[pairing.sampler]
    return nfe if case.num_inference_steps(nfe) is not None else nfe + 1
  case = peers.K_DIFFUSION_CASES[pairing.sampler]
  return nfe if case.num_steps(nfe) is not None else nfe + 1


# ------------------------------------------------------------------------------------------------
# Running the peers and ours.
# ------------------------------------------------------------------------------------------------


def run_peer(pairing: Pairing, denoise: Callable, x_t: torch.Tensor, nfe: int) -> peers.PeerRun:
  if pairing.peer == "diffusers":
    return peers.run_diffusers(peers.DIFFUSERS_CASES[pairing.sampler], denoise, x_t, nfe)
  return peers.run_k_diffusion(peers.K_DIFFUSION_CASES[pairing.sampler], denoise, x_t, nfe,
                               sigma_min=EDM.sigma_min, sigma_max=EDM.sigma_max)


def grid_from_logsnr(schedule: schedules.Schedule, logsnr: np.ndarray) -> np.ndarray:
  """Our times t_i with logsnr(t_i) = logsnr_i, the end points snapped to [t_min, t_max]."""
  with jax.enable_x64(True):
    t = np.asarray(schedule.t_from_logsnr(jnp.asarray(logsnr, jnp.float64)), np.float64)
  # The peers compute their noise levels in float32: their ends are t_max / t_min to ~1e-6.
  t = np.clip(t, schedule.t_min, schedule.t_max)
  t[0], t[-1] = schedule.t_max, schedule.t_min
  return t


def null_apply(params, x, t):
  """A near-free denoiser with the signature of a real one (params unused)."""
  del params, t
  return 0.5 * x


@functools.lru_cache(maxsize=None)
def ours_fn(schedule, solver: str, nfe: int, grid: tuple | None, final_denoise: bool,
            apply: Callable, options: tuple = ()):
  """Our whole sampler, jitted: run(params, x_T) -> x_end. grid None: our default spacing."""
  spacing = "logsnr" if grid is None else np.asarray(grid, np.float64)
  return solvers.make_sampler(apply, schedule=schedule, solver=solver, nfe=nfe, spacing=spacing,
                              final_denoise=final_denoise, **dict(options))


def reference(schedule, mix, x_t: np.ndarray, *, t_end: float, final_denoise: bool,
              rtol: float, atol: float) -> np.ndarray:
  """The exact end state: the float64 probability-flow map (then the exact denoiser if asked)."""
  with jax.enable_x64(True):
    apply = analytic.denoiser(schedule)
    x = jnp.asarray(x_t, jnp.float64)
    mix64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), mix)
    y = analytic.flow_map(apply, mix64, x, schedule=schedule, t_start=schedule.t_max,
                          t_end=t_end, rtol=rtol, atol=atol)
    if final_denoise:
      y = apply(mix64, y, jnp.full((x.shape[0],), t_end, jnp.float64))
    return np.asarray(y)


def error(x, ref: np.ndarray) -> dict[str, float]:
  with jax.enable_x64(True):
    e = metrics.per_sample_error(jnp.asarray(np.asarray(x), jnp.float64), jnp.asarray(ref))
    return {k: float(v) for k, v in e.items()}


# ------------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------------


def _sync_torch(device):
  if device is not None and device.type == "cuda":
    torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable], *, repeats: int, device) -> dict[str, dict]:
  """Median and min wall seconds of each zero-argument fn, after one warm-up call each.

  The calls are interleaved (one of each per repeat) so that every contender sees the same
  machine load; JAX results are waited for with `jax.block_until_ready`, CUDA with a sync.
  """
  def once(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    _sync_torch(device)
    return time.perf_counter() - t0

  for fn in fns.values():
    once(fn)
  ts = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      ts[name].append(once(fn))
  return {name: {"median": statistics.median(v), "min": min(v)} for name, v in ts.items()}


# ------------------------------------------------------------------------------------------------
# The benchmark.
# ------------------------------------------------------------------------------------------------


def check_torch_port(mix, *, device) -> float:
  """max |TorchMixture - analytic.denoise| in float64 over random x and t in both settings."""
  worst = 0.0
  with jax.enable_x64(True):
    mix64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), mix)
    port = peers.TorchMixture(mix64, dtype=torch.float64, device=device)
    for schedule in (VP_DISCRETE, EDM):
      x = jax.random.normal(jax.random.PRNGKey(1), (64, mix.dim), jnp.float64)
      t = jnp.exp(jnp.linspace(jnp.log(schedule.t_min), jnp.log(schedule.t_max), 64))
      x = x * jnp.sqrt(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2)[:, None]
      want = np.asarray(analytic.denoise(mix64, x, t, schedule=schedule))
      got = port.denoise(torch.as_tensor(np.asarray(x), device=device),
                         torch.as_tensor(np.asarray(schedule.alpha(t)), device=device),
                         torch.as_tensor(np.asarray(schedule.sigma(t)), device=device))
      worst = max(worst, float(np.max(np.abs(got.cpu().numpy() - want))))
  return worst


def initial_state(schedule, mix, batch: int, seed: int) -> np.ndarray:
  """x_T = alpha(t_max) x0 + sigma(t_max) eps with x0 exact data, float32 [B, d]."""
  k0, k1 = jax.random.split(jax.random.PRNGKey(seed))
  x0 = analytic.sample(mix, k0, batch, dtype=jnp.float32)
  eps = jax.random.normal(k1, x0.shape, jnp.float32)
  t = jnp.float32(schedule.t_max)
  return np.asarray(schedule.alpha(t) * x0 + schedule.sigma(t) * eps, np.float32)


def verdict(differs: str | None, ours: dict, peer: dict) -> str:
  r_med, r_rms = ours["median"] / peer["median"], ours["rms"] / peer["rms"]
  if differs is None:
    if max(r_med, r_rms) <= 1.02:
      return "same method: ours equal (<= 2%)" if min(r_med, r_rms) >= 0.98 else "same method: ours lower"
    return f"same method: ours HIGHER by {100 * (max(r_med, r_rms) - 1):.1f}%"
  if (r_med < 1) == (r_rms < 1):
    return f"differs ({differs}): {'ours' if r_med < 1 else 'peer'} better"
  return f"differs ({differs}): mixed ({'ours' if r_med < 1 else 'peer'} better in median)"


def run(args) -> dict:
  torch_device = torch.device(args.torch_device if args.torch_device != "auto" else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
  # XLA's CPU runtime computes with denormals flushed to zero; torch is set the same way so that
  # both pay the same for the mixture's tiny responsibilities.
  torch.set_flush_denormal(True)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  mix = analytic.mixture64()
  port_err = check_torch_port(mix, device=torch_device)
  if port_err > 1e-10:
    raise AssertionError(f"the torch mixture denoiser differs from analytic.denoise by {port_err:.3g}")
  print(f"torch port == analytic.denoise: max |diff| = {port_err:.2e} (float64)", flush=True)
  port = peers.TorchMixture(mix, dtype=torch.float32, device=torch_device)

  x_init = {s.name: initial_state(s, mix, args.batch, args.seed) for s in (VP_DISCRETE, EDM)}
  refs = {}

  def ref_of(schedule, final_denoise):
    if (schedule.name, final_denoise) not in refs:
      t0 = time.perf_counter()
      refs[schedule.name, final_denoise] = reference(
          schedule, mix, x_init[schedule.name], t_end=schedule.t_min, final_denoise=final_denoise,
          rtol=args.ref_tol, atol=args.ref_tol)
      print(f"reference {schedule.name} final_denoise={final_denoise}: "
            f"{time.perf_counter() - t0:.1f} s", flush=True)
    return refs[schedule.name, final_denoise]

  rows = []
  selected = [p for p in PAIRINGS if args.only is None or p.sampler in args.only or p.ours in args.only]
  missing = sorted({p.ours for p in selected} - set(solvers.SOLVERS))
  if missing:
    print(f"not in solvers.SOLVERS, skipped: {missing}", flush=True)
    selected = [p for p in selected if p.ours in solvers.SOLVERS]
  for pairing in selected:
    schedule = schedule_of(pairing)
    x_t = x_init[schedule.name]
    x_t_torch = torch.as_tensor(x_t, device=torch_device)
    for nfe_asked in args.nfe:
      nfe = feasible_nfe(pairing, nfe_asked)
      with torch.no_grad():
        peer_run = run_peer(pairing, port.denoise, x_t_torch, nfe)
      grid = grid_from_logsnr(schedule, peer_run.logsnr)
      ref = ref_of(schedule, peer_run.final_denoise)
      ours = ours_fn(schedule, pairing.ours, nfe, tuple(grid), peer_run.final_denoise,
                     analytic.denoiser(schedule), pairing.options)
      ours_default = ours_fn(schedule, pairing.ours, nfe, None, peer_run.final_denoise,
                             analytic.denoiser(schedule), pairing.options)
      x_ours = ours(mix, jnp.asarray(x_t))
      x_def = ours_default(mix, jnp.asarray(x_t))
      e_peer, e_ours, e_def = error(peer_run.x.cpu(), ref), error(x_ours, ref), error(x_def, ref)
      differs = pairing.differs(nfe, len(grid) - 1)

      x_jax = jnp.asarray(x_t)
      with torch.no_grad():
        times = time_interleaved({
            "peer": lambda: run_peer(pairing, port.denoise, x_t_torch, nfe).x,
            "peer_null": lambda: run_peer(pairing, peers.null_denoise, x_t_torch, nfe).x,
            "ours": lambda: ours(mix, x_jax)}, repeats=args.repeats, device=torch_device)
      t_peer, t_peer_null, t_ours = (times[k]["median"] for k in ("peer", "peer_null", "ours"))
      row = dict(peer=pairing.peer, sampler=pairing.sampler, ours=pairing.label, nfe=nfe,
                 nfe_asked=nfe_asked, steps=len(grid) - 1, final_denoise=peer_run.final_denoise,
                 schedule=schedule.name, err_peer=e_peer, err_ours=e_ours, err_ours_default=e_def,
                 ratio_median=e_ours["median"] / e_peer["median"],
                 ratio_rms=e_ours["rms"] / e_peer["rms"],
                 verdict=verdict(differs, e_ours, e_peer),
                 time_peer_s=t_peer, time_peer_null_s=t_peer_null, time_ours_s=t_ours,
                 time_peer_min_s=times["peer"]["min"], time_ours_min_s=times["ours"]["min"],
                 time_ratio=t_ours / t_peer, time_ratio_min=times["ours"]["min"] / times["peer"]["min"])
      rows.append(row)
      print(f"{pairing.peer:11s} {pairing.sampler:30s} {pairing.label:17s} NFE {nfe:3d}  "
            f"err peer {e_peer['median']:.3e}/{e_peer['rms']:.3e}  ours {e_ours['median']:.3e}/"
            f"{e_ours['rms']:.3e}  time ours/peer {t_ours * 1e3:.1f}/{t_peer * 1e3:.1f} ms  "
            f"{row['verdict']}", flush=True)

  overhead = measure_overhead(mix, args)
  return dict(
      command=" ".join([os.path.basename(sys.executable), "-m", "bench.solvers_vs_peers"] + sys.argv[1:]),
      machine=dict(platform=platform.platform(), processor=platform.processor(),
                   cpu_count=os.cpu_count(), jax_backend=jax.default_backend(),
                   jax_devices=[str(d) for d in jax.devices()], torch_device=str(torch_device),
                   torch_threads=torch.get_num_threads()),
      versions=dict(peers.versions(), jax=jax.__version__, numpy=np.__version__),
      settings=dict(batch=args.batch, repeats=args.repeats, nfe=args.nfe, seed=args.seed,
                    ref_tol=args.ref_tol, teacher="analytic.mixture64()"),
      torch_port_max_abs_diff=port_err, rows=rows, overhead=overhead)


def measure_overhead(mix, args) -> list[dict]:
  """Per-NFE cost of our samplers beyond the denoiser: slopes of wall time in NFE.

  Fitting time = a + b * NFE over two NFEs separates the one-off cost of a call (dispatch,
  grid setup) from the per-evaluation cost b; b_null (null denoiser) is our overhead per NFE,
  b_mix - b_null the cost of one mixture denoiser call inside the loop. Each time is the minimum
  over --overhead-repeats interleaved calls: on a shared machine the least-disturbed estimate.
  """
  schedule = VP_DISCRETE
  x_t = jnp.asarray(initial_state(schedule, mix, args.batch, args.seed))
  out = []
  for solver in args.overhead_solvers:
    # The nearest budgets the solver meets exactly (Heun: odd NFE).
    lo, hi = (solvers.steps_for_nfe(solver, n, allow_nearest_nfe=True)[1] for n in args.overhead_nfe)
    fns = {}
    for name, apply in (("null", null_apply), ("mixture", analytic.denoiser(schedule))):
      for nfe in (lo, hi):
        fns[name, nfe] = functools.partial(ours_fn(schedule, solver, nfe, None, False, apply), mix, x_t)
    times = {k: v["min"] for k, v in
             time_interleaved(fns, repeats=args.overhead_repeats, device=None).items()}
    b_null = (times["null", hi] - times["null", lo]) / (hi - lo)
    b_mix = (times["mixture", hi] - times["mixture", lo]) / (hi - lo)
    call = b_mix - b_null
    out.append(dict(solver=solver, nfe_lo=lo, nfe_hi=hi,
                    null_lo_s=times["null", lo], null_hi_s=times["null", hi],
                    mixture_lo_s=times["mixture", lo], mixture_hi_s=times["mixture", hi],
                    overhead_per_nfe_s=b_null, mixture_call_s=call,
                    overhead_fraction=b_null / call))
    print(f"overhead {solver:17s}: {b_null * 1e6:8.1f} us/NFE vs mixture call {call * 1e6:8.1f} us "
          f"({100 * b_null / call:.1f}%)", flush=True)
  return out


# ------------------------------------------------------------------------------------------------
# Tables.
# ------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
  m, s = result["machine"], result["settings"]
  lines = [
      "# diffdistill solvers vs peers",
      "",
      f"Command: `{result['command']}`  ",
      f"Machine: {m['platform']}, {m['cpu_count']} CPUs, JAX backend {m['jax_backend']}, "
      f"torch on {m['torch_device']} ({m['torch_threads']} threads)  ",
      "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "  ",
      f"Teacher: {s['teacher']}; batch {s['batch']}; timing medians over {s['repeats']} repeats; "
      f"reference: analytic.flow_map in float64, rtol = atol = {s['ref_tol']:g}; "
      f"torch port vs analytic.denoise: max |diff| {result['torch_port_max_abs_diff']:.1e} (float64).",
      "",
      "## Accuracy: per-sample error vs the exact flow map (median / RMS over samples)",
      "",
      "Ours runs on the peer's own time grid; 'ours, logSNR grid' is our solver on its default grid.",
      "",
      "| peer | sampler | ours | NFE | peer median | peer RMS | ours median | ours RMS | ours/peer "
      "(median, RMS) | ours, logSNR grid (median) | verdict |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in result["rows"]:
    lines.append(
        f"| {r['peer']} | {r['sampler']} | {r['ours']} | {r['nfe']} | {r['err_peer']['median']:.3e} | "
        f"{r['err_peer']['rms']:.3e} | {r['err_ours']['median']:.3e} | {r['err_ours']['rms']:.3e} | "
        f"{r['ratio_median']:.3f}, {r['ratio_rms']:.3f} | {r['err_ours_default']['median']:.3e} | "
        f"{r['verdict']} |")
  lines += [
      "",
      "## Wall time of the whole sampler (median ms), same batch and denoiser",
      "",
      "| peer | sampler | ours | NFE | peer ms | peer ms, null denoiser | ours ms (jit) | ours/peer (medians) | ours/peer (minima) |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in result["rows"]:
    lines.append(
        f"| {r['peer']} | {r['sampler']} | {r['ours']} | {r['nfe']} | {r['time_peer_s'] * 1e3:.2f} | "
        f"{r['time_peer_null_s'] * 1e3:.2f} | {r['time_ours_s'] * 1e3:.2f} | {r['time_ratio']:.3f} | "
        f"{r['time_ratio_min']:.3f} |")
  lines += [
      "",
      "## Our per-NFE overhead beyond the denoiser (slopes in NFE of minimum wall times; VP-discrete, logSNR grid)",
      "",
      "| solver | NFE lo/hi | null denoiser ms (lo/hi) | mixture ms (lo/hi) | overhead us/NFE | "
      "mixture call us | overhead / call |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for o in result["overhead"]:
    lines.append(
        f"| {o['solver']} | {o['nfe_lo']}/{o['nfe_hi']} | {o['null_lo_s'] * 1e3:.2f}/{o['null_hi_s'] * 1e3:.2f} | "
        f"{o['mixture_lo_s'] * 1e3:.2f}/{o['mixture_hi_s'] * 1e3:.2f} | {o['overhead_per_nfe_s'] * 1e6:.1f} | "
        f"{o['mixture_call_s'] * 1e6:.1f} | {100 * o['overhead_fraction']:.1f}% |")
  return "\n".join(lines) + "\n"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--batch", type=int, default=1024, help="samples per sampler call")
  p.add_argument("--repeats", type=int, default=7, help="timed repeats (the median is reported)")
  p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50], help="NFE budgets")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ref-tol", type=float, default=1e-8, help="rtol = atol of the float64 reference")
  p.add_argument("--only", nargs="+", default=None,
                 help="restrict to these peer samplers or our solver names")
  p.add_argument("--overhead-solvers", nargs="+",
                 default=[s for s in ("ddim", "heun", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_2",
                                      "unipc_3", "lms") if s in solvers.SOLVERS])
  p.add_argument("--overhead-repeats", type=int, default=30,
                 help="timed repeats for the overhead slopes (their minima are used)")
  p.add_argument("--overhead-nfe", type=int, nargs=2, default=[10, 100], metavar=("LO", "HI"))
  p.add_argument("--torch-device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda'")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch intra-op threads (0: torch's default, one per core); on a machine "
                      "shared with other jobs, 1 avoids torch's spinning thread barriers")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                 help="folder for results.json and results.md")
  p.add_argument("--quick", action="store_true",
                 help="batch 256, NFE 5 10, 3 repeats, overhead NFE 10/50: a few minutes on 2 cores")
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.nfe, args.repeats, args.overhead_nfe = 256, [5, 10], 3, [10, 50]
  if args.batch < 2 or args.repeats < 1 or min(args.nfe) < 1:
    p.error("--batch must be >= 2, --repeats >= 1 and every --nfe >= 1")
  bad = sorted(set(args.overhead_solvers) - set(solvers.SOLVERS))
  if bad:
    p.error(f"--overhead-solvers: unknown {bad}; expected names from {sorted(solvers.SOLVERS)}")
  return args


def main(argv=None):
  args = parse_args(argv)
  result = run(args)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  md = markdown(result)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
