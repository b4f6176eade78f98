"""Rematerialisation policies of the networks: which activations the backward pass recomputes.

    module = nets.get_network("unet_ddpmpp_cifar10", remat="block")

  none    every activation the backward pass needs is stored (fastest, most memory);
  block   each residual block runs under `jax.checkpoint` (`nn.remat`): only the blocks' inputs
          are stored, the activations inside a block are recomputed when its gradient is taken;
  full    the whole network runs under `jax.checkpoint` (`make_apply`): only its inputs are
          stored, and the backward pass recomputes the forward pass.

Remat changes when values are computed, never what is computed: outputs, gradients and jvps
(sCD's and MeanFlow's tangents) equal the un-remat network's (tests/test_nets_scaling.py). The
params are named as without remat, so checkpoints and importers do not depend on the policy.

References:
  Chen et al., Training Deep Nets with Sublinear Memory Cost, 2016.
"""

from __future__ import annotations

REMAT_POLICIES = ("none", "block", "full")


def check_remat(remat: str) -> str:
  """Raises ValueError unless `remat` is one of REMAT_POLICIES."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}.")
  return remat


__all__ = ["REMAT_POLICIES", "check_remat"]
