"""Inception-v3 outputs of image sets in batches, sharded over devices (for FID, IS, P/R, KID).

    for pool3, logits, mask in inception_outputs(variables, images, batch_size=250, mesh=mesh):
      moments.update(pool3, mask=mask)      # FID: O(d^2) memory whatever N is

Each batch is padded to a multiple of the mesh size and split over its `data` axis; the network's
variables are replicated. `mask` [b] is 1 on real rows and 0 on padding. The network and its
preprocessing are nets.inception's (pytorch-fid's port; images NHWC, uint8 in [0, 255] or float
in [-1, 1]).
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffdistill import _validate
from diffdistill.nets import inception as inception_net

Array = jax.Array


def data_mesh() -> Mesh:
  """A 1-D mesh over every device, axis 'data'."""
  return Mesh(np.array(jax.devices()), ("data",))


def inception_outputs(variables: Any, images, *, batch_size: int = 250,
                      mesh: Mesh | None = None) -> Iterator[tuple[Array, Array, Array]]:
  """Yields (pool3 [b, 2048], logits [b, 1008], mask [b]) for consecutive batches of images
  [N, H, W, 3] (any array-like, read one batch at a time); b = batch_size rounded up to a
  multiple of the mesh size (the last batch padded, mask 0 on its padding)."""
  _validate.check_int("batch_size", batch_size, min=1)
  if getattr(images, "ndim", None) != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [N, H, W, 3], got shape {getattr(images, 'shape', None)}.")
  mesh = mesh or data_mesh()
  size = mesh.devices.size
  b = -(-batch_size // size) * size
  rows = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
  variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
  for start in range(0, images.shape[0], b):
    batch = np.asarray(images[start:start + b])
    n = batch.shape[0]
    if n < b:
      batch = np.concatenate([batch, np.repeat(batch[:1], b - n, axis=0)])
    mask = (np.arange(b) < n).astype(np.float32)
    pool3, logits = inception_net.inception_features(variables, jax.device_put(batch, rows))
    yield pool3, logits, jax.device_put(jnp.asarray(mask), rows)


__all__ = ["inception_outputs", "data_mesh"]
