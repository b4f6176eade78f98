"""Multi-process set-up: `jax.distributed.initialize` when asked, and each process's data shard.

Every process runs the same program; `jax.devices()` then lists the devices of all processes,
the train step's mesh spans them, and each process feeds only its own rows of the global batch
(`data_shard()`, consumed by `train.step.global_batch`).

The coordinator address, process count and process id come from the arguments (the
experiment's flags) or, where those are None, the environment: JAX_COORDINATOR_ADDRESS
(host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID. On TPU pods and SLURM/Open MPI clusters all
three may be None: `jax.distributed.initialize` detects them itself. On CPU the cross-process
collectives are gloo.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils


def _from_env(value, name, cast):
  if value is not None:
    return value
  raw = os.environ.get(name)
  return cast(raw) if raw not in (None, "") else None


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to the others (call once, before any other JAX call)."""
  coordinator_address = _from_env(coordinator_address, "JAX_COORDINATOR_ADDRESS", str)
  num_processes = _from_env(num_processes, "JAX_NUM_PROCESSES", int)
  process_id = _from_env(process_id, "JAX_PROCESS_ID", int)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def data_shard() -> dict[str, int]:
  """This process's shard of the data: `process_index` of `process_count`."""
  return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def local_batch_size(global_batch_size: int) -> int:
  """Rows of the global batch that this process reads."""
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(f"batch_size={global_batch_size} must be divisible by the process count "
                     f"({count}).")
  return global_batch_size // count


def to_host(tree):
  """A pytree of global arrays as numpy arrays on every process (a collective when some leaf is
  split over several processes' devices, e.g. FSDP params; a `jax.device_get` otherwise)."""
  if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def is_writer() -> bool:
  """Only process 0 writes logs, metrics and figures (checkpoints are orbax's collective)."""
  return jax.process_index() == 0
