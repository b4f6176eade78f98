"""The benchmark's torch teacher and peer drivers (bench/peers.py); skipped without the bench extra."""

import importlib.util

import numpy as np
import pytest
from torch_imports import import_diffusers

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import peers  # noqa: E402
from diffdistill import analytic, schedules  # noqa: E402


def _mixtures():
  rng = np.random.default_rng(3)
  diag = analytic.GaussianMixture(np.array([1.0, 2.0, 0.5]), rng.standard_normal((3, 5)),
                                  rng.uniform(0.05, 0.5, (3, 5)))
  return [analytic.mixture64(dim=8, num_components=4, seed=1), diag]


@pytest.mark.parametrize("schedule", [schedules.VPLinear(), schedules.EDM(),
                                      schedules.VPDiscrete.from_name("linear", 1000)],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("mix_index", [0, 1], ids=["full_cov", "diagonal"])
def test_torch_mixture_equals_analytic_denoise(x64, schedule, mix_index):
  mix = _mixtures()[mix_index]
  x = jax.random.normal(jax.random.PRNGKey(0), (40, mix.dim), jnp.float64)
  t = jnp.exp(jnp.linspace(jnp.log(schedule.t_min), jnp.log(schedule.t_max), 40))
  x = x * jnp.sqrt(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2)[:, None]
  want = np.asarray(analytic.denoise(mix, x, t, schedule=schedule))
  got = peers.TorchMixture(mix, dtype=torch.float64).denoise(
      torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(schedule.alpha(t))),
      torch.as_tensor(np.asarray(schedule.sigma(t)))).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def _ddim_on_grid(denoise, x, logsnr, final_denoise):
  """DDIM (Song et al. 2021, eq. 12 with eta = 0) written out on a VP logSNR grid."""
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
  for i in range(len(logsnr) - 1):
    x0 = denoise(x, alpha[i], sigma[i])
    x = alpha[i + 1] * x0 + sigma[i + 1] * (x - alpha[i] * x0) / sigma[i]
  return denoise(x, alpha[-1], sigma[-1]) if final_denoise else x


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("nfe", [4, 10])
def test_diffusers_grid_is_the_one_it_stepped_on(name, nfe):
  # DDIM and Euler in sigma = sigma/alpha are the same map, so replaying DDIM on the grid the
  # driver reports must reproduce the scheduler's output: this checks the grid bookkeeping.
  import_diffusers()
  port = peers.TorchMixture(analytic.mixture64(dim=8, num_components=4, seed=1), dtype=torch.float64)
  x_t = torch.as_tensor(np.random.default_rng(0).standard_normal((16, 8)))
  run = peers.run_diffusers(peers.DIFFUSERS_CASES[name], port.denoise, x_t, nfe)
  assert run.nfe == nfe and len(run.logsnr) == nfe + 1 and not run.final_denoise
  replay = _ddim_on_grid(port.denoise, x_t, run.logsnr, run.final_denoise)
  # diffusers keeps its sigmas in float32: agreement to ~1e-6, against O(1e-1) step differences.
  np.testing.assert_allclose(run.x.numpy(), replay.numpy(), atol=2e-5)


def test_diffusers_heun_counts_its_final_euler_step():
  import_diffusers()
  case = peers.DIFFUSERS_CASES["HeunDiscreteScheduler"]
  assert case.num_inference_steps(4) is None and case.num_inference_steps(7) == 4
  port = peers.TorchMixture(analytic.mixture64(dim=8, num_components=4, seed=1), dtype=torch.float64)
  x_t = torch.as_tensor(np.random.default_rng(0).standard_normal((16, 8)))
  run = peers.run_diffusers(case, port.denoise, x_t, 7)
  assert run.final_denoise and len(run.logsnr) == 4


def test_k_diffusion_sampling_imports_alone_and_euler_matches_ddim():
  if importlib.util.find_spec("k_diffusion") is None:
    pytest.skip("k-diffusion is not installed")
  port = peers.TorchMixture(analytic.mixture64(dim=8, num_components=4, seed=1), dtype=torch.float64)
  x_t = 80.0 * torch.as_tensor(np.random.default_rng(0).standard_normal((16, 8)))
  run = peers.run_k_diffusion(peers.K_DIFFUSION_CASES["sample_euler"], port.denoise, x_t, 6,
                              sigma_min=0.002, sigma_max=80.0)
  sig = np.exp(-0.5 * run.logsnr)
  np.testing.assert_allclose(sig[[0, -1]], [80.0, 0.002], rtol=1e-6)
  # Euler in sigma with alpha = 1 is DDIM: x' = x0 + sigma' (x - x0) / sigma.
  x = x_t
  for s, s_next in zip(sig[:-1], sig[1:]):
    x0 = port.denoise(x, 1.0, s)
    x = x0 + s_next * (x - x0) / s
  np.testing.assert_allclose(run.x.numpy(), x.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler,ours", [
    ("DDIMScheduler", "ddim"), ("HeunDiscreteScheduler", "heun"),
    ("DPMSolverMultistepScheduler", "dpm_solver_pp_2m"),
    ("DPMSolverMultistepScheduler_3", "dpm_solver_pp_3m"), ("UniPCMultistepScheduler", "unipc_2"),
    ("UniPCMultistepScheduler_3", "unipc_3"), ("sample_heun", "heun"),
    ("sample_dpm_2", "dpm_solver_2"), ("sample_dpmpp_2m", "dpm_solver_pp_2m"), ("sample_lms", "lms")])
def test_ours_on_the_peer_grid_equals_the_peer(sampler, ours):
  # The peers are independent implementations of the same methods: on the grid a peer used,
  # with the options the benchmark pairs it with, ours must reproduce its output.
  import_diffusers()
  if sampler.startswith("sample_") and importlib.util.find_spec("k_diffusion") is None:
    pytest.skip("k-diffusion is not installed")
  from bench import solvers_vs_peers as bench  # pylint: disable=import-outside-toplevel
  pairing = next(p for p in bench.PAIRINGS if p.sampler == sampler and p.ours == ours)
  schedule = bench.schedule_of(pairing)
  mix = analytic.mixture64(dim=8, num_components=4, seed=1)
  x_t = bench.initial_state(schedule, mix, 32, 0)
  nfe = bench.feasible_nfe(pairing, 8)
  with torch.no_grad():
    run = bench.run_peer(pairing, peers.TorchMixture(mix).denoise, torch.as_tensor(x_t), nfe)
  grid = bench.grid_from_logsnr(schedule, run.logsnr)
  fn = bench.ours_fn(schedule, ours, nfe, tuple(grid), run.final_denoise,
                     analytic.denoiser(schedule), pairing.options)
  got = np.asarray(fn(mix, jnp.asarray(x_t)))
  # float32 on both sides (diffusers keeps its sigmas in float32): 1e-4 of the data scale,
  # against O(1e-2 .. 1) between different methods on this 8-step grid.
  np.testing.assert_allclose(got, run.x.numpy(), atol=2e-4)
