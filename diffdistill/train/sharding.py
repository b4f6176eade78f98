"""The device mesh (`data`, `fsdp`, optional `tensor`) and the sharding rules of the train state.

Mesh axes (`make_mesh(data=, fsdp=, tensor=)`, data x fsdp x tensor = the devices used):

  data     pure data parallelism: the batch is split over it, everything else is replicated;
  fsdp     fully sharded data parallelism (ZeRO-3): the batch is split over it too (the batch axis
           is (data, fsdp) together), and every large leaf of the state (each player's params,
           optimizer state and EMAs) and of the frozen inputs (teacher params) is split over it;
           the step all-gathers a network's params where a loss reads them and reduce-scatters
           the gradient back onto the shards (`gathered`);
  tensor   (optional, size 1 unless asked) a second dimension of each large leaf is split over
           it and stays split while the network runs, so XLA's SPMD partitioner shards the
           matrix products over it; the batch is replicated over it.

Sharding rules: a leaf's path in the pytree ("players/model/opt_state/0/mu/Dense_0/kernel") is
matched against `Rules.table`, first match wins, with the actions

  REPLICATE   the same full copy on every device;
  SHARD       dimension i* = the largest dimension whose size the fsdp axis divides (the last
              such on ties) goes on `fsdp`; with a tensor axis, the largest other dimension that
              the tensor axis divides goes on `tensor`;

and every leaf with fewer than `Rules.min_size` elements is replicated whatever the table says
(biases, norm scales, counters, the rng: a few KiB that every layer reads). A leaf that no axis
divides stays replicated. With fsdp = tensor = 1 every leaf is replicated: data parallelism,
the default, with the numbers it had before.

References:
  Rajbhandari et al., ZeRO: Memory Optimizations Toward Training Trillion Parameter Models, 2020.
  Xu et al., GSPMD: General and Scalable Parallelization for ML Computation Graphs, 2021.
  Zhao et al., PyTorch FSDP, 2023 (all-gather before use, reduce-scatter of gradients).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
DATA_AXIS, FSDP_AXIS, TENSOR_AXIS = "data", "fsdp", "tensor"
AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
REPLICATE, SHARD = "replicate", "shard"

# (regex searched in the leaf's path, action): norms' scales and biases are replicated even when
# large enough to split; everything else is split.
DEFAULT_TABLE: tuple[tuple[str, str], ...] = (
    (r"(^|/)(bias|scale)$", REPLICATE),
    (r".*", SHARD),
)


def make_mesh(devices: Sequence[Any] | None = None, *, data: int | None = None, fsdp: int = 1,
              tensor: int = 1) -> Mesh:
  """A (data, fsdp) mesh, or (data, fsdp, tensor) when tensor > 1, over `devices`.

  Args:
    devices: default every device of every process.
    data: the data axis' size; default: the devices left, len(devices) // (fsdp * tensor).
    fsdp: the fsdp axis' size (1: pure data parallelism).
    tensor: the tensor axis' size.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  for name, v in (("fsdp", fsdp), ("tensor", tensor)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {v!r}.")
  if data is None:
    if n % (fsdp * tensor):
      raise ValueError(f"fsdp={fsdp} x tensor={tensor} must divide the device count {n} "
                       "(data defaults to the devices left).")
    data = n // (fsdp * tensor)
  if isinstance(data, bool) or not isinstance(data, (int, np.integer)) or data < 1:
    raise ValueError(f"data must be an integer >= 1 or None (the devices left), got {data!r}.")
  if data * fsdp * tensor != n:
    raise ValueError(f"data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} must "
                     f"equal the device count {n}.")
  shape = (data, fsdp, tensor) if tensor > 1 else (data, fsdp)
  try:  # the physical layout on TPUs (neighbouring chips on the inner axes)
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES[:len(shape)])


def axis_size(mesh: Mesh, name: str) -> int:
  """The size of axis `name` of `mesh` (1 if it has none)."""
  return int(mesh.shape[name]) if name in mesh.axis_names else 1


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The axes the batch is split over: data and fsdp (those the mesh has)."""
  return tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)


def check_mesh(mesh: Mesh) -> None:
  """Raises ValueError unless the mesh's axes are among (data, fsdp, tensor) and include data."""
  names = tuple(mesh.axis_names)
  if DATA_AXIS not in names or not set(names) <= set(AXES) or len(set(names)) != len(names):
    raise ValueError(f"mesh axes must include {DATA_AXIS!r} and be among {AXES}, got {names}.")


def is_sharded(mesh: Mesh) -> bool:
  """True when the state is split over some axis (fsdp or tensor larger than 1)."""
  return axis_size(mesh, FSDP_AXIS) * axis_size(mesh, TENSOR_AXIS) > 1


@dataclasses.dataclass(frozen=True)
class Rules:
  """The rule table (module docstring): [(path regex, REPLICATE | SHARD)], first match wins, and
  `min_size`, the number of elements below which a leaf is always replicated."""

  table: tuple[tuple[str, str], ...] = DEFAULT_TABLE
  min_size: int = 2 ** 12

  def __post_init__(self):
    for pattern, action in self.table:
      if action not in (REPLICATE, SHARD):
        raise ValueError(f"Rules: action for {pattern!r} must be {REPLICATE!r} or {SHARD!r}, "
                         f"got {action!r}.")
      re.compile(pattern)
    if self.min_size < 0:
      raise ValueError(f"Rules.min_size must be >= 0, got {self.min_size}.")

  def action(self, path: str) -> str:
    for pattern, action in self.table:
      if re.search(pattern, path):
        return action
    return REPLICATE


def path_name(path) -> str:
  """A pytree key path as 'a/b/0/c' (dict keys, attribute names, sequence indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def _largest(shape, size: int, exclude: int | None) -> int | None:
  best = None
  for i, d in enumerate(shape):
    if i != exclude and d % size == 0 and (best is None or d >= shape[best]):
      best = i
  return best


def spec_for(path: str, shape: Sequence[int], *, mesh: Mesh, rules: Rules = Rules()) -> P:
  """The PartitionSpec of one leaf (module docstring)."""
  fsdp, tensor = axis_size(mesh, FSDP_AXIS), axis_size(mesh, TENSOR_AXIS)
  if (fsdp * tensor == 1 or int(np.prod(shape, dtype=np.int64)) < max(rules.min_size, 1)
      or rules.action(path) == REPLICATE):
    return P()
  entries = [None] * len(shape)
  i = _largest(shape, fsdp, None) if fsdp > 1 else None
  if i is not None:
    entries[i] = FSDP_AXIS
  if tensor > 1:
    j = _largest(shape, tensor, i)
    if j is not None:
      entries[j] = TENSOR_AXIS
  return P(*entries) if any(entries) else P()


def tree_shardings(tree: PyTree, mesh: Mesh, *, rules: Rules = Rules()) -> PyTree:
  """A NamedSharding for every leaf of `tree` (arrays or jax.ShapeDtypeStruct), by the rules."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(path_name(path), np.shape(x), mesh=mesh,
                                                   rules=rules)), tree)


def gathered(sharding: NamedSharding) -> NamedSharding:
  """The sharding a network reads its params in: `sharding` with the fsdp axis dropped (the
  all-gather of ZeRO-3); a tensor split is kept."""
  spec = tuple(None if e == FSDP_AXIS else e for e in sharding.spec)
  return NamedSharding(sharding.mesh, P(*spec))


def describe(tree: PyTree, mesh: Mesh, *, rules: Rules = Rules()) -> list[tuple[str, tuple, P]]:
  """[(path, shape, spec)] of every leaf: what the rules do to a tree (for logs and docs)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(path_name(p), tuple(np.shape(x)), spec_for(path_name(p), np.shape(x), mesh=mesh,
                                                       rules=rules)) for p, x in leaves]


def bytes_per_device(tree: PyTree, shardings: PyTree) -> int:
  """Bytes of `tree` held by one device under `shardings` (leaf bytes / the devices splitting it)."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = s.shard_shape(tuple(np.shape(x)))
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


__all__ = ["DATA_AXIS", "FSDP_AXIS", "TENSOR_AXIS", "AXES", "REPLICATE", "SHARD", "DEFAULT_TABLE",
           "Rules", "make_mesh", "axis_size", "batch_axes", "check_mesh", "is_sharded", "path_name",
           "spec_for", "tree_shardings", "gathered", "describe", "bytes_per_device"]
