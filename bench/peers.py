"""The analytic mixture teacher written in torch, and drivers that run it through peer samplers.

Peers: diffusers' schedulers (DDIM, DPMSolverMultistep, UniPCMultistep, EulerDiscrete,
HeunDiscrete) on DDPM's discrete linear betas, and k-diffusion's samplers (sample_euler,
sample_heun, sample_dpm_2, sample_dpmpp_2m, sample_lms) on EDM/Karras sigmas. Each driver runs
the peer exactly as its users do (its own time grid, its own loop) and returns the final state
together with the time grid it used, converted to our schedule's time t, so that our solver can
be run on the identical grid.

The torch denoiser is an independent port of the closed-form posterior mean of
`diffdistill.analytic.denoise` (see that module's docstring):

    E[x0 | x_t] = sum_k r_k(x) (mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k)),
    C_k = alpha^2 Sigma_k + sigma^2 I,  r_k = softmax_k(log pi_k + log N(x; alpha mu_k, C_k)),

evaluated in each component's eigenbasis (C_k diagonal there); the -d/2 log(2 pi) constant of
log N cancels in the softmax and is dropped.

k-diffusion's package __init__ imports its training stack (torchvision, scikit-image, wandb,
clean-fid, ...), none of which its samplers use; `k_diffusion_sampling()` imports the sampling
module alone, with a stand-in `k_diffusion.utils` holding the one helper the samplers call
(`append_dims`).

References:
  von Platen et al., diffusers (github.com/huggingface/diffusers).
  Crowson, k-diffusion (github.com/crowsonkb/k-diffusion).
  Karras et al., Elucidating the Design Space of Diffusion Models, NeurIPS 2022 (sigma space).
  Lin et al., Common Diffusion Noise Schedules and Sample Steps are Flawed, WACV 2024
  ("trailing" timestep spacing).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from typing import Callable

import numpy as np
import torch

from diffdistill import analytic


class TorchMixture:
  """The exact denoiser of a `diffdistill.analytic.GaussianMixture`, in torch.

  `denoise(x, alpha, sigma)`: x [B, d], alpha and sigma [B] (or scalars) -> x0_hat [B, d].
  """

  def __init__(self, mix: analytic.GaussianMixture, *, dtype=torch.float32, device="cpu"):
    as_t = lambda a: torch.as_tensor(np.array(a, np.float64), dtype=dtype, device=device)
    self.log_weights = as_t(mix.log_weights)  # [K]
    self.means = as_t(mix.means)  # [K, d]
    self.eigvals = as_t(mix.eigvals)  # [K, d]
    self.eigvecs = None if mix.eigvecs is None else as_t(mix.eigvecs)  # [K, d, d]
    self.dtype, self.device = dtype, device

  def denoise(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    b = x.shape[0]
    alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(-1, 1, 1).expand(b, 1, 1)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1).expand(b, 1, 1)
    y = x[:, None, :] - alpha * self.means[None]  # [B, K, d]
    if self.eigvecs is not None:
      y = torch.einsum("kji,bkj->bki", self.eigvecs, y)  # U_k^T (x - alpha mu_k)
    var = alpha * alpha * self.eigvals[None] + sigma * sigma  # [B, K, d]
    log_n = -0.5 * torch.sum(y * y / var + torch.log(var), dim=-1)  # [B, K]
    r = torch.softmax(self.log_weights[None] + log_n, dim=-1)  # [B, K]
    shift = alpha * self.eigvals[None] / var * y  # [B, K, d]
    if self.eigvecs is not None:
      shift = torch.einsum("kij,bkj->bki", self.eigvecs, shift)
    return torch.einsum("bk,bkd->bd", r, self.means[None] + shift)


def null_denoise(x: torch.Tensor, alpha, sigma) -> torch.Tensor:
  """A near-free stand-in denoiser, to measure a sampler's own cost."""
  del alpha, sigma
  return 0.5 * x


# ------------------------------------------------------------------------------------------------
# diffusers, on DDPM's discrete betas (linear, 1e-4 .. 0.02, 1000 steps).
# ------------------------------------------------------------------------------------------------

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


@dataclasses.dataclass(frozen=True)
class DiffusersCase:
  """A diffusers scheduler, its settings, and how its steps count denoiser calls."""

  name: str  # the scheduler's class name
  kwargs: tuple  # extra scheduler config, as (key, value) pairs
  sigma_space: bool  # the scheduler's state is x / alpha (Euler, Heun) rather than x
  two_evals_per_step: bool = False  # Heun: NFE = 2 * num_inference_steps - 1

  def num_inference_steps(self, nfe: int) -> int | None:
    """The num_inference_steps giving exactly `nfe` calls, or None if there is none."""
    if not self.two_evals_per_step:
      return nfe
    return (nfe + 1) // 2 if nfe % 2 == 1 and nfe >= 3 else None


# Every scheduler ends at DDPM's first timestep (t = 1/1000, sigma_min) rather than at sigma = 0
# where it has that option, so that the final state is on the probability-flow ODE and the
# adaptive reference applies directly. "trailing" spacing starts at the last training step
# (timestep 999, t = 1) for every NFE; HeunDiscrete keeps its default "linspace" spacing (which
# ends at timestep 0) because it always finishes with an Euler step to sigma = 0, i.e. a final
# denoising at its last timestep.
_VP = (("beta_schedule", "linear"), ("beta_start", BETA_START), ("beta_end", BETA_END),
       ("num_train_timesteps", NUM_TRAIN_TIMESTEPS), ("prediction_type", "sample"))
DIFFUSERS_CASES = {
    "DDIMScheduler": DiffusersCase("DDIMScheduler", _VP + (
        ("timestep_spacing", "trailing"), ("set_alpha_to_one", False), ("clip_sample", False)), False),
    "DPMSolverMultistepScheduler": DiffusersCase("DPMSolverMultistepScheduler", _VP + (
        ("timestep_spacing", "trailing"), ("final_sigmas_type", "sigma_min"), ("solver_order", 2),
        ("algorithm_type", "dpmsolver++")), False),
    "DPMSolverMultistepScheduler_3": DiffusersCase("DPMSolverMultistepScheduler", _VP + (
        ("timestep_spacing", "trailing"), ("final_sigmas_type", "sigma_min"), ("solver_order", 3),
        ("algorithm_type", "dpmsolver++")), False),
    "UniPCMultistepScheduler": DiffusersCase("UniPCMultistepScheduler", _VP + (
        ("timestep_spacing", "trailing"), ("final_sigmas_type", "sigma_min"), ("solver_order", 2)), False),
    "UniPCMultistepScheduler_3": DiffusersCase("UniPCMultistepScheduler", _VP + (
        ("timestep_spacing", "trailing"), ("final_sigmas_type", "sigma_min"), ("solver_order", 3)), False),
    # UniPC as above but without diffusers' lower_order_final, which diffusers (like the UniPC
    # reference code) applies at every step count while our solvers apply it below 15 steps.
    "UniPCMultistepScheduler_no_lof": DiffusersCase("UniPCMultistepScheduler", _VP + (
        ("timestep_spacing", "trailing"), ("final_sigmas_type", "sigma_min"), ("solver_order", 2),
        ("lower_order_final", False)), False),
    "UniPCMultistepScheduler_3_no_lof": DiffusersCase("UniPCMultistepScheduler", _VP + (
        ("timestep_spacing", "trailing"), ("final_sigmas_type", "sigma_min"), ("solver_order", 3),
        ("lower_order_final", False)), False),
    "EulerDiscreteScheduler": DiffusersCase("EulerDiscreteScheduler", _VP + (
        ("timestep_spacing", "trailing"), ("final_sigmas_type", "sigma_min")), True),
    "HeunDiscreteScheduler": DiffusersCase("HeunDiscreteScheduler", _VP + (
        ("timestep_spacing", "linspace"),), True, two_evals_per_step=True),
}


def make_scheduler(case: DiffusersCase):
  import diffusers  # pylint: disable=import-outside-toplevel
  return getattr(diffusers, case.name)(**dict(case.kwargs))


@dataclasses.dataclass
class PeerRun:
  """A peer's output and the grid it used."""

  x: torch.Tensor  # [B, d], the final state, in the variance-preserving x (not x / alpha)
  logsnr: np.ndarray  # [N + 1] logSNR of the grid points the state moved through, float64
  final_denoise: bool  # the last "step" went to sigma = 0, i.e. returned a denoised estimate
  nfe: int  # denoiser calls made


def _vp_from_scaled_sigma(s: torch.Tensor):
  """(alpha, sigma) of the VP state for the scaled noise level s = sigma / alpha."""
  alpha = 1.0 / torch.sqrt(1.0 + s * s)
  return alpha, s * alpha


def run_diffusers(case: DiffusersCase, denoise: Callable, x_t: torch.Tensor, nfe: int,
                  scheduler=None) -> PeerRun:
  """Runs a diffusers scheduler from the VP state x_t at its first timestep with `nfe` calls.

  `denoise(x, alpha, sigma)` is the VP denoiser. For `sigma_space` schedulers (Euler, Heun) the
  loop state is x / alpha; their `scale_model_input` maps it back to x, and the noise level of
  each call is the scheduler's own `sigmas[step_index]` (fractional timesteps included).
  """
  steps = case.num_inference_steps(nfe)
  if steps is None:
    raise ValueError(f"{case.name}: no num_inference_steps gives NFE = {nfe}.")
  sched = scheduler if scheduler is not None else make_scheduler(case)
  sched.set_timesteps(steps, device=x_t.device)
  ac = sched.alphas_cumprod.to(torch.float64)
  calls = 0
  if case.sigma_space:
    sigmas = sched.sigmas.to(torch.float64)
    x = x_t * torch.sqrt(1.0 + sigmas[0] ** 2).to(x_t.dtype)
    for t in sched.timesteps:
      x_in = sched.scale_model_input(x, t)
      a, s = _vp_from_scaled_sigma(sigmas[sched.step_index])
      x0 = denoise(x_in, a.to(x.dtype), s.to(x.dtype))
      calls += 1
      x = sched.step(x0, t, x).prev_sample
    s_end = sigmas[-1]
    x = x / torch.sqrt(1.0 + s_end ** 2).to(x.dtype)
    # Heun's sigmas repeat each interior point (one per evaluation): keep the distinct ones.
    pts = np.unique(sigmas.cpu().numpy())[::-1]
    final_denoise = float(s_end) == 0.0
    if final_denoise:
      pts = pts[:-1]
    logsnr = -2.0 * np.log(pts)
  else:
    x = x_t
    for t in sched.timesteps:
      k = int(t)
      x0 = denoise(x, torch.sqrt(ac[k]).to(x.dtype), torch.sqrt(1.0 - ac[k]).to(x.dtype))
      calls += 1
      x = sched.step(x0, t, x).prev_sample
    ks = np.concatenate([sched.timesteps.cpu().numpy().astype(np.int64), [0]])  # all end at timestep 0
    a2 = ac.cpu().numpy()[ks]
    logsnr = np.log(a2) - np.log1p(-a2)
    final_denoise = False
  if calls != nfe:
    raise AssertionError(f"{case.name}: made {calls} calls, expected {nfe}.")
  return PeerRun(x=x, logsnr=logsnr, final_denoise=final_denoise, nfe=calls)


# ------------------------------------------------------------------------------------------------
# k-diffusion, on EDM (alpha = 1, t = sigma) with Karras sigmas.
# ------------------------------------------------------------------------------------------------


def k_diffusion_sampling() -> types.ModuleType:
  """k_diffusion.sampling, imported without the package's training-stack __init__."""
  if "k_diffusion.sampling" in sys.modules:
    return sys.modules["k_diffusion.sampling"]
  spec = importlib.util.find_spec("k_diffusion")
  if spec is None:
    raise ImportError("k-diffusion is not installed: pip install 'diffdistill[bench]'.")
  pkg = types.ModuleType("k_diffusion")
  pkg.__spec__ = spec
  pkg.__path__ = list(spec.submodule_search_locations)
  utils = types.ModuleType("k_diffusion.utils")

  def append_dims(x, target_dims):
    return x[(...,) + (None,) * (target_dims - x.ndim)]

  utils.append_dims = append_dims
  pkg.utils = utils
  sys.modules.setdefault("k_diffusion", pkg)
  sys.modules.setdefault("k_diffusion.utils", utils)
  return importlib.import_module("k_diffusion.sampling")


@dataclasses.dataclass(frozen=True)
class KDiffusionCase:
  name: str  # the sampler function, e.g. "sample_dpmpp_2m"
  evals_per_step: int  # 2 for Heun and DPM-2 (whose steps to a nonzero sigma are all 2nd order)

  def num_steps(self, nfe: int) -> int | None:
    return nfe // self.evals_per_step if nfe % self.evals_per_step == 0 else None


K_DIFFUSION_CASES = {c.name: c for c in (
    KDiffusionCase("sample_euler", 1), KDiffusionCase("sample_heun", 2),
    KDiffusionCase("sample_dpm_2", 2), KDiffusionCase("sample_dpmpp_2m", 1),
    KDiffusionCase("sample_lms", 1))}


def karras_sigmas(num_steps: int, *, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  device="cpu") -> torch.Tensor:
  """k-diffusion's Karras grid of num_steps + 1 sigmas from sigma_max down to sigma_min, no 0.

  The trailing 0 that `get_sigmas_karras` appends is dropped so that every sampler ends on the
  ODE at sigma_min (k-diffusion switches to a first-order step when the next sigma is 0).
  """
  kd = k_diffusion_sampling()
  return kd.get_sigmas_karras(num_steps + 1, sigma_min, sigma_max, rho=rho, device=device)[:-1]


def run_k_diffusion(case: KDiffusionCase, denoise: Callable, x_t: torch.Tensor, nfe: int, *,
                    sigma_min: float, sigma_max: float, rho: float = 7.0) -> PeerRun:
  """Runs a k-diffusion sampler from x_t at sigma_max to sigma_min with exactly `nfe` calls."""
  steps = case.num_steps(nfe)
  if steps is None:
    raise ValueError(f"{case.name}: no step count gives NFE = {nfe}.")
  kd = k_diffusion_sampling()
  sigmas = karras_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                         device=x_t.device).to(x_t.dtype)
  calls = [0]

  def model(x, sigma):
    calls[0] += 1
    return denoise(x, torch.ones_like(sigma), sigma)

  x = getattr(kd, case.name)(model, x_t, sigmas, disable=True)
  if calls[0] != nfe:
    raise AssertionError(f"{case.name}: made {calls[0]} calls, expected {nfe}.")
  logsnr = -2.0 * np.log(sigmas.to(torch.float64).cpu().numpy())
  return PeerRun(x=x, logsnr=logsnr, final_denoise=False, nfe=calls[0])


def versions() -> dict[str, str]:
  """Installed versions of the peers."""
  out = {"torch": torch.__version__}
  for name, dist in (("diffusers", "diffusers"), ("k-diffusion", "k-diffusion")):
    try:
      out[name] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out
