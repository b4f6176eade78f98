"""One process of tests/test_train_distributed.py: trains the tiny teacher over jax.distributed.

    python tests/train_distributed_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT.npz CONFIG_JSON

Each process has 2 CPU devices; the mesh spans all processes' devices, each process reads its own
shard of the data, and process 0 alone writes metrics. Saves the params as this process sees them
(FSDP-split leaves gathered from all processes).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffdistill.train import distributed  # noqa: E402


def main(process_id, num_processes, port, workdir, out, values):
  distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                         process_id=process_id)
  assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes
  from experiments.train_teacher import main as main_lib  # after initialize, like main.py
  from train_helpers import as_config
  state = main_lib.train(as_config(values), workdir)
  from jax.experimental import multihost_utils
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  print(f"split leaves: {sum(not x.sharding.is_fully_replicated for _, x in leaves)} of {len(leaves)}")
  # the whole array: FSDP leaves are split over the processes' devices (tiled: the global array)
  np.savez(out, **{jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(x, tiled=True))
                   for p, x in leaves})


if __name__ == "__main__":
  pid, n, port, workdir, out, values = sys.argv[1:]
  main(int(pid), int(n), int(port), workdir, out, json.loads(values))
