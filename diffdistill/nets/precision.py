"""Mixed-precision policies: the dtype a network computes in, with float32 master params.

    module = nets.with_precision(nets.get_network("unet_digits8"), "bfloat16")

  float32    compute and params in float32 (the default);
  bfloat16   the network's matrix products, convolutions and norms run in bfloat16 (its `dtype`);
             params stay float32 (flax's `param_dtype`), so the gradients, the optimizer state
             and the EMAs, all shaped and typed like the params, are float32 too: the master
             copy the optimizer updates is never rounded to bfloat16. The network returns its
             input's dtype, so the losses (and their reductions) are computed in float32.

Attention logits and softmax are computed in float32 in `nets.unet.SelfAttention` whatever the
compute dtype. On the digits U-Net the DSM loss of a bfloat16 step is within 2% of float32's
(tests/test_nets_scaling.py).

References:
  Micikevicius et al., Mixed Precision Training, ICLR 2018 (float32 master weights);
  Kalamkar et al., A Study of BFLOAT16 for Deep Learning Training, 2019.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Policy:
  """compute_dtype: the network's `dtype`; param_dtype: the params' (the optimizer's master copy)."""

  compute_dtype: jnp.dtype
  param_dtype: jnp.dtype = jnp.float32


POLICIES = {"float32": Policy(jnp.float32), "bfloat16": Policy(jnp.bfloat16)}


def with_precision(module: nn.Module, policy: str | Policy) -> nn.Module:
  """`module` computing in the policy's dtype (its `dtype` attribute), params float32."""
  if isinstance(policy, str):
    if policy not in POLICIES:
      raise ValueError(f"precision policy must be one of {sorted(POLICIES)}, got {policy!r}.")
    policy = POLICIES[policy]
  if jnp.dtype(policy.param_dtype) != jnp.float32:
    raise ValueError(f"param_dtype must be float32 (the master params), got {policy.param_dtype}.")
  if not hasattr(module, "dtype"):
    raise ValueError(f"{type(module).__name__} has no compute dtype attribute.")
  return module.clone(dtype=policy.compute_dtype)


__all__ = ["Policy", "POLICIES", "with_precision"]
