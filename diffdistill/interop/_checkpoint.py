"""Reading checkpoint files into {name: float32 numpy array} and mapping them, checked, onto params.

A mapping is a list of `Leaf`s: the Flax parameter path, the checkpoint keys it is made of (with
their expected shapes) and how they combine. `assemble` checks every key before it builds
anything, so a checkpoint of another size or architecture is refused with an error that names
the first missing, mis-shaped or unexpected key, and never half-loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

StateDict = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Leaf:
  """params[path] = combine(*[state[k] for k in keys]), each state[k] of shape shapes[i]."""

  path: tuple[str, ...]
  keys: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  combine: Callable[..., np.ndarray]


def linear(path, key, out_features, in_features, *, bias=True):
  """A torch Linear (weight [out, in], y = x W^T + b) as a Flax Dense (kernel [in, out])."""
  leaves = [Leaf((*path, "kernel"), (f"{key}.weight",), ((out_features, in_features),),
                 lambda w: w.T)]
  if bias:
    leaves.append(Leaf((*path, "bias"), (f"{key}.bias",), ((out_features,),), lambda b: b))
  return leaves


def assemble(state: StateDict, leaves: Sequence[Leaf], *, ignore: Sequence[str] = (),
             source: str = "checkpoint") -> dict[str, Any]:
  """The nested params dict of `leaves` read from `state`; every key of state must be used
  (or listed in `ignore`). Raises ValueError naming the first offending key."""
  used = set(ignore)
  for leaf in leaves:
    for key, shape in zip(leaf.keys, leaf.shapes):
      if key not in state:
        raise ValueError(f"{source}: missing key {key!r} (expected shape {shape}); the "
                         "checkpoint is of another architecture or size.")
      if tuple(state[key].shape) != tuple(shape):
        raise ValueError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, expected "
                         f"{tuple(shape)}; the checkpoint is of another size.")
      used.add(key)
  unexpected = sorted(set(state) - used)
  if unexpected:
    raise ValueError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all); "
                     "the checkpoint is of another architecture.")
  params: dict[str, Any] = {}
  for leaf in leaves:
    node = params
    for name in leaf.path[:-1]:
      node = node.setdefault(name, {})
    node[leaf.path[-1]] = np.ascontiguousarray(leaf.combine(*[state[k] for k in leaf.keys]),
                                               np.float32)
  return params


def read_safetensors_folder(folder: str, stem: str = "diffusion_pytorch_model") -> dict[str, np.ndarray]:
  """The tensors of a diffusers model folder (one file or an index of shards), as float32 numpy.

  Read through safetensors' Flax loader (which handles bfloat16), so torch is not needed."""
  from safetensors.flax import load_file  # a dependency of diffusers' folders only

  single = os.path.join(folder, f"{stem}.safetensors")
  index = os.path.join(folder, f"{stem}.safetensors.index.json")
  if os.path.exists(single):
    files = [single]
  elif os.path.exists(index):
    with open(index) as f:
      files = [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
  else:
    raise FileNotFoundError(f"{folder} holds neither {stem}.safetensors nor its index (a .bin-only "
                            "folder must be re-saved with save_pretrained(safe_serialization=True)).")
  state = {}
  for path in files:
    state.update({k: np.asarray(v, np.float32) for k, v in load_file(path).items()})
  return state


def read_torch_state_dict(path: str, *, prefer: Sequence[str] = ("ema", "model")) -> dict[str, np.ndarray]:
  """A torch `.pt` state dict as float32 numpy (torch needed). A training checkpoint
  {'model', 'ema', 'opt', 'args'} gives its `prefer`red entry (the EMA weights first, as the
  original DiT and SiT sample with). Loaded with weights_only=True: no code in the file runs."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch (pip install 'diffdistill[torch]'); "
                      "diffusers safetensors folders load without it.") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for name in prefer:
    if isinstance(obj, dict) and isinstance(obj.get(name), dict):
      obj = obj[name]
      break
  if not isinstance(obj, dict) or not all(hasattr(v, "numpy") for v in obj.values()):
    raise ValueError(f"{path} is not a state dict of tensors (nor a checkpoint holding one under "
                     f"{list(prefer)}).")
  return {k: v.detach().float().numpy() for k, v in obj.items()}


__all__ = ["Leaf", "linear", "assemble", "read_safetensors_folder", "read_torch_state_dict"]
