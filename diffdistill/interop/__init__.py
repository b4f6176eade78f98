"""Public checkpoints as teachers: `interop.load(path)` reads a file or folder into Flax params and
wraps the network with its own schedule and parametrization.

    teacher = interop.load("DiT-XL-2-256x256.pt")          # or a diffusers DiT folder, a SiT .pt
    x0_hat = teacher.apply(teacher.params, x, t, label=y)   # the denoiser contract, x -> x0_hat
    out = teacher.raw(teacher.params, x, 999, y=y)         # the checkpoint's own network function

`apply(params, x, t, **cond)` is a denoiser on `teacher.schedule` (t in the library's convention:
`schedules`), ready for every solver and distillation loss; `raw(params, x, timestep, **cond)` is
the network with the torch module's argument conventions (a diffusers DiT's integer `timestep` and
`class_labels`; the original DiT's `t` and `y`), on NHWC images, returning the module's own output
(NHWC). `teacher.kind` is the parametrization kind (`parametrization.KINDS`) of that output.
Class-conditional networks take the null class (`teacher.num_classes`) for classifier-free
guidance: `parametrization.guided(teacher.apply, w, null_cond={"label": teacher.num_classes})`.

Formats (docs/teachers.md says where each file comes from and what was verified):
  * a diffusers `DiTTransformer2DModel` folder (config.json + safetensors), or a DiT pipeline
    folder holding one under transformer/: no torch needed;
  * a diffusers `UNet2DModel` folder or a pipeline folder holding one under unet/ (the DDPM
    CIFAR-10 / CelebA-HQ / LSUN models), with the pipeline's scheduler betas and prediction type:
    no torch needed;
  * a diffusers `AutoencoderKL` folder (the SD-VAE of latent teachers), loaded as an
    `Autoencoder` with encode / decode and the latent scaling: no torch needed;
  * an EDM snapshot pickle (`edm-*.pkl`: EDMPrecond or VPPrecond around a DDPM++ SongUNet or
    an ADM DhariwalUNet), read by a restricted unpickler that never executes the source code
    EDM embeds in it; torch needed;
  * an original DiT or SiT `.pt` state dict (facebookresearch/DiT, willisma/SiT key names; a
    training checkpoint's 'ema' entry): torch needed to read it (weights_only, no code runs).
    A file whose name starts with "SiT" is a SiT (linear interpolant, velocity); any other a DiT;
    `family=` overrides the guess.
Every tensor is mapped by name and checked before anything is built: a checkpoint of another
size or architecture is refused with an error naming the first missing, mis-shaped or unexpected
key, never half-loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from diffdistill import schedules
from diffdistill.interop import ddpm_unet, dit, edm
from diffdistill.interop.vae import Autoencoder, load_diffusers_vae

FAMILIES = ("dit", "sit")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded checkpoint (module docstring)."""

  params: Any
  apply: Callable[..., Any]   # denoiser: apply(params, x, t, *, label=None) -> x0_hat
  raw: Callable[..., Any]     # the checkpoint's network with its own argument conventions
  schedule: schedules.Schedule
  kind: str                   # raw output: "eps" (DiT); "flow" (SiT: velocity in time s = 1 - t)
  family: str                 # 'dit', 'sit', 'ddpm' (a diffusers UNet2DModel) or 'edm'
  num_classes: int            # DiT / SiT: labels 0..K-1, K the null class; 0: unconditional
  network: Any                # the Flax module (nets.DiT) holding `params`
  info: dict                  # what was read: in_channels, input_size, learn_sigma, format
  # the raw network in the library's conventions (t in the schedule's time, the output of `kind`
  # in x's shape): apply = parametrization.as_denoiser(net_apply, kind=kind, schedule=schedule);
  # what a student starting from these weights trains (`nets.Net(..., apply_fn=net_apply)`)
  net_apply: Callable[..., Any] = None
  # net_apply of another module of the same architecture, e.g. the network with a student's extra
  # inputs (`network.clone(extra_cond=...)`): its time-like inputs mapped as t (interop._network)
  make_net_apply: Callable[..., Any] = None

  @property
  def example_shape(self) -> tuple[int, ...]:
    """One example's shape, [H, W, C] (NHWC)."""
    size = self.info.get("input_size") or self.info.get("img_resolution") or self.info.get("sample_size")
    if size is None:
      raise ValueError(f"{self.info.get('format')} checkpoint: its image size is not recorded.")
    return (int(size), int(size), int(self.info["in_channels"]))


def _diffusers_folder(path):
  for folder in (path, os.path.join(path, "transformer"), os.path.join(path, "unet")):
    config = os.path.join(folder, "config.json")
    if os.path.exists(config):
      with open(config) as f:
        return folder, json.load(f).get("_class_name")
  return None, None


def load(path: str, *, family: str | None = None,
         num_heads: int | None = None) -> "Teacher | Autoencoder":
  """Loads a checkpoint file or folder as a `Teacher`.

  Args:
    path: a diffusers model (or pipeline) folder, or a `.pt` / `.pth` state dict. A diffusers
      AutoencoderKL folder gives an `Autoencoder` (interop.vae), not a Teacher.
    family: 'dit' or 'sit' for a `.pt` file (default: 'sit' iff the file name starts with "sit").
    num_heads: attention heads of a `.pt` DiT whose width is not a published size.
  Returns:
    the Teacher (params as float32 numpy arrays), or the Autoencoder of a VAE folder.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    folder, class_name = _diffusers_folder(path)
    if class_name == "AutoencoderKL":
      return load_diffusers_vae(folder)
    if class_name == "UNet2DModel":
      module, params, raw, apply, schedule, kind, info, make = ddpm_unet.load_diffusers_unet(
          folder, path)
      return Teacher(params, apply, raw, schedule, kind, "ddpm", module.num_classes, module, info,
                     make(module), make)
    if class_name != "DiTTransformer2DModel":
      raise ValueError(f"{path}: not a supported diffusers folder (config.json _class_name "
                       f"{class_name!r}); supported: 'DiTTransformer2DModel', 'UNet2DModel', "
                       "'AutoencoderKL'.")
    module, params, info = dit.load_diffusers(folder)
    raw, apply, schedule, make = dit.dit_functions(module, info, label_name="class_labels")
    return Teacher(params, apply, raw, schedule, "eps", "dit", info["num_classes"], module,
                   dict(info, format="diffusers"), make(module), make)
  if os.path.isfile(path) and path.endswith((".pt", ".pth")):
    if family is None:
      family = "sit" if os.path.basename(path).lower().startswith("sit") else "dit"
    if family not in FAMILIES:
      raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}.")
    module, params, info = dit.load_original(path, num_heads=num_heads)
    if family == "sit":
      raw, apply, schedule, make = dit.sit_functions(module, info)
      kind = "flow"
    else:
      raw, apply, schedule, make = dit.dit_functions(module, info, label_name="y")
      kind = "eps"
    return Teacher(params, apply, raw, schedule, kind, family, info["num_classes"], module,
                   dict(info, format="pt"), make(module), make)
  if os.path.isfile(path) and path.endswith(".pkl"):
    module, params, raw, apply, schedule, kind, info, make = edm.load_edm(path)
    return Teacher(params, apply, raw, schedule, kind, "edm", info["label_dim"], module, info,
                   make(module), make)
  raise ValueError(f"{path}: not a supported checkpoint; expected a diffusers folder "
                   "(DiTTransformer2DModel, UNet2DModel, AutoencoderKL), an original DiT / SiT "
                   ".pt / .pth file or an EDM .pkl snapshot.")


__all__ = ["load", "Teacher", "Autoencoder", "FAMILIES"]
