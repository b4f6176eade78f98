"""A student network as one object: its module, its output kind, and its denoiser view.

Losses speak two forms of one network: the raw output (`apply`, for a loss written in the
network's own parametrization, e.g. DSM on eps or sCD on a TrigFlow velocity) and the denoiser
(`denoise`, x0_hat, for every loss written in data prediction). Kept by hand, two `kind`s can
silently disagree; a `Net` builds both from one (module, kind, schedule):

    net = nets.Net(nets.get_network("mlp", features=128), kind="v", schedule=schedules.VPLinear(),
                   example_shape=(2,))
    params = net.init(jax.random.key(0))
    net.apply(params, x, t)      # the raw network (v)
    net.denoise(params, x, t)    # x0_hat, through parametrization.as_denoiser

An imported network whose module speaks its checkpoint's conventions (a DiT's step index and 2C
learned-sigma channels) carries `apply_fn`, the network in the library's conventions
(`interop.Teacher.net_apply`); `module` still defines the architecture and a fresh `init`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from diffdistill import parametrization
from diffdistill import schedules as schedules_lib
from diffdistill.nets import dit as dit_lib
from diffdistill.nets import mlp as mlp_lib
from diffdistill.nets import unet as unet_lib


@dataclasses.dataclass(frozen=True)
class Net:
  """A network (`module`) read as output `kind` on `schedule`, for inputs [B, *example_shape]."""
  module: Any
  kind: str
  schedule: schedules_lib.Schedule
  example_shape: tuple[int, ...]
  apply_fn: Callable | None = None  # the raw network, when not `nets.make_apply(module)`

  def __post_init__(self):
    parametrization.check_kind(self.kind)
    object.__setattr__(self, "example_shape", tuple(self.example_shape))

  @functools.cached_property
  def apply(self) -> Callable:
    """The raw network, `apply(params, x, t, **cond) -> out` (`nets.make_apply`, or `apply_fn`)."""
    if self.apply_fn is not None:
      return self.apply_fn
    from diffdistill import nets  # noqa: PLC0415 (the package imports this module)
    return nets.make_apply(self.module)

  @functools.cached_property
  def denoise(self) -> Callable:
    """`denoise(params, x, t, **cond) -> x0_hat`, built once (hashable: jit caches on it)."""
    return parametrization.as_denoiser(self.apply, kind=self.kind, schedule=self.schedule)

  def init(self, rng) -> Any:
    from diffdistill import nets  # noqa: PLC0415
    return nets.init_params(self.module, rng, jnp.zeros((1, *self.example_shape), jnp.float32))


def trunk_features(net: Net) -> tuple[Callable, int]:
  """(features(params, x_t, t, label=None) -> [B, F], F): a network's trunk features, which a GAN
  head reads (DMD2's on the fake score, CTM's on a frozen network copy). A ScoreMLP gives its
  last residual block's output; a U-Net the output of its bottleneck (the second middle block at
  the lowest resolution), averaged over space; a DiT its last block's tokens, averaged.

  The features are taken from the network as the Net runs it (`net.apply`, by intercepting the
  block's call), so an imported network's own conventions (a DiT checkpoint's step index) hold
  for them too."""
  module = net.module
  if isinstance(module, unet_lib.UNet):
    levels = len(module.channel_mult)
    # blocks are created in order: per level (a down block after level 0) + num_blocks, then
    # the two middle blocks
    last = f"UNetBlock_{levels * module.num_blocks + (levels - 1) + 1}"
    dim = module.model_channels * module.channel_mult[-1]
  elif isinstance(module, mlp_lib.ScoreMLP):
    last = f"MLPBlock_{module.num_blocks - 1}"
    dim = module.features
  elif isinstance(module, dit_lib.DiT):
    last = f"blocks_{module.depth - 1}"
    dim = module.hidden_size
  else:
    raise ValueError(f"A GAN head reads a ScoreMLP's, a UNet's or a DiT's trunk; got "
                     f"{type(module).__name__}. Set the GAN weight to 0 "
                     "(--config.dm.gan_weight=0 / --config.ctm.gan_weight=0).")

  def features(params, x_t, t, label=None):
    x_in, t_in = parametrization.net_inputs(x_t, t, kind=net.kind, schedule=net.schedule)
    captured = []

    def grab(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and context.module.name == last:
        captured.append(out)
      return out

    with nn.intercept_methods(grab):
      net.apply(params, x_in, t_in, **({} if label is None else {"label": label}))
    h = captured[-1]
    return h.reshape(h.shape[0], -1, h.shape[-1]).mean(axis=1) if h.ndim > 2 else h

  return features, dim


__all__ = ["Net", "trunk_features"]
