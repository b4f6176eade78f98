"""Flax (Linen) score networks; the only package of diffdistill that imports Flax.

A network is a Linen module called as `module.apply({"params": p}, x, t, label, deterministic=...)`;
`make_apply` turns it into the pure function every other part of the library speaks,

    apply(params, x, t, *, label=None, dropout_rng=None, **extra) -> out   # out: x's shape, dtype

which is the raw-network contract of `parametrization.as_denoiser(apply, kind=..., schedule=...)`:
the same network becomes an eps, v, x0, flow, score or EDM-preconditioned denoiser. The time input
t is whatever `parametrization.net_inputs` gives (t, or EDM's c_noise); see `nets.embeddings` for the
scaling. Dropout is active iff `dropout_rng` is given; a class-conditional network (num_classes = K)
takes integer labels in [0, K], where K is the null label of classifier-free guidance. A network
built with `extra_cond=("r",)` takes the named extra scalar inputs as keywords, `apply(p, x, t, r=r)`
([B] or scalar each), which is how distilled students are conditioned on more than (x, t).

    module = nets.get_network("mlp", features=128)   # or "unet_digits8", "dit_S_2", "ddpm_unet", ...
    params = nets.init_params(module, rng, x_example)
    apply = nets.make_apply(module)
    denoise = parametrization.as_denoiser(apply, kind="eps", schedule=schedule)

or, as one object carrying the module, its output kind and its denoiser view, `nets.Net(module,
kind="eps", schedule=schedule, example_shape=(d,))` (`net.apply`, `net.denoise`, `net.init`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffdistill.nets.ddpm_unet import DDPMUNet
from diffdistill.nets.dit import PRESETS as DIT_PRESETS
from diffdistill.nets.dit import DiT
from diffdistill.nets.embeddings import (ConditionEmbedding, FourierEmbedding, SinusoidalEmbedding,
                                         time_embedding)
from diffdistill.nets.mlp import ScoreMLP
from diffdistill.nets.student import Net, trunk_features
from diffdistill.nets.precision import POLICIES, Policy, with_precision
from diffdistill.nets.remat import REMAT_POLICIES
from diffdistill.nets.unet import PRESETS as UNET_PRESETS
from diffdistill.nets.unet import UNet
from diffdistill.nets.vae import AutoencoderKL

Array = jax.Array

# Presets are partials, so keyword arguments given to get_network override them.
NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "mlp": ScoreMLP,
    "unet": UNet,
    **{f"unet_{name}": functools.partial(UNet, **kw) for name, kw in UNET_PRESETS.items()},
    "ddpm_unet": DDPMUNet,
    "dit": DiT,
    **{f"dit_{name}": functools.partial(DiT, **kw) for name, kw in DIT_PRESETS.items()},
}


def get_network(name: str, **kwargs) -> nn.Module:
  """Builds a network by registry name (`NETWORKS`), e.g. get_network("mlp", features=128)."""
  if name not in NETWORKS:
    raise ValueError(f"Unknown network {name!r}; expected one of {sorted(NETWORKS)}.")
  try:
    return NETWORKS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"Bad arguments for network {name!r}: {e}.") from None


def _batch_times(x: Array, t: Array) -> Array:
  t = jnp.asarray(t)
  if t.ndim == 0:
    return jnp.broadcast_to(t, (x.shape[0],))
  if t.shape != (x.shape[0],):
    raise ValueError(f"t must be a scalar or have shape [B] = [{x.shape[0]}], got {t.shape}.")
  return t


def make_apply(module: nn.Module) -> Callable[..., Array]:
  """The pure `apply(params, x, t, *, label=None, dropout_rng=None, **extra) -> out` of a network.

  Args (of the returned function):
    params: the network's 'params' collection (as returned by `init_params`).
    x: [B, ...] network input (NHWC images [B, H, W, C] or vectors [B, d]).
    t: [B] or scalar time input.
    label: [B] integer labels for a class-conditional network (K = null label), else None.
    dropout_rng: a PRNG key turns dropout on (training); None runs deterministically.
    **extra: the module's `extra_cond` scalar inputs by name, each [B] or scalar.
  Returns:
    [B, ...], x's shape and dtype.
  """
  names = tuple(getattr(module, "extra_cond", ()))

  full_remat = getattr(module, "remat", "none") == "full"

  def run(params, x, t, label, extra, dropout_rng):
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return module.apply({"params": params}, x, t, label, extra=extra or None,
                        deterministic=dropout_rng is None, rngs=rngs)

  if full_remat:  # nets.remat: only the inputs are stored for the backward pass
    run = jax.checkpoint(run)

  def apply(params, x, t, *, label=None, dropout_rng=None, **extra):
    if set(extra) != set(names):
      raise ValueError(f"{type(module).__name__} takes the extra inputs {sorted(names)} "
                       f"(extra_cond), got {sorted(extra)}.")
    extra = {k: _batch_times(x, v) for k, v in extra.items()}
    return run(params, x, _batch_times(x, t), label, extra, dropout_rng)

  return apply


def init_params(module: nn.Module, rng: Array, x: Array) -> Any:
  """Initial params of `module` for inputs shaped like x [B, ...] (t = 0, label = 0 if conditional).

  Runs as one jitted computation (eager initialization compiles every initializer separately);
  only x's shape and dtype are used.
  """
  shape, dtype = tuple(x.shape), x.dtype
  conditional = bool(getattr(module, "num_classes", 0))

  names = tuple(getattr(module, "extra_cond", ()))

  def init(rng):
    t = jnp.zeros(shape[:1], jnp.float32)
    label = jnp.zeros(shape[:1], jnp.int32) if conditional else None
    extra = {k: t for k in names} or None
    return module.init({"params": rng}, jnp.zeros(shape, dtype), t, label, extra=extra)["params"]

  return jax.jit(init)(rng)


def init_from(params: Any, source: Any) -> Any:
  """`params` with every leaf that `source` also has replaced by source's (a student initialized
  from its teacher: the student may have more inputs, e.g. extra_cond, but must contain every
  teacher leaf with the same shape). Raises ValueError naming the first mismatch."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(source)).items():
    name = "/".join(map(str, path))
    if path not in flat:
      raise ValueError(f"init_from: the source has {name}, which the network does not.")
    if tuple(flat[path].shape) != tuple(value.shape):
      raise ValueError(f"init_from: {name} has shape {tuple(value.shape)} in the source and "
                       f"{tuple(flat[path].shape)} in the network.")
    flat[path] = jnp.asarray(value, flat[path].dtype)
  return flax.traverse_util.unflatten_dict(flat)


def num_params(params: Any) -> int:
  """Total number of scalars in a params pytree (works on jax.ShapeDtypeStruct leaves too)."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


__all__ = ["NETWORKS", "get_network", "Net", "trunk_features", "make_apply", "init_params", "init_from", "num_params", "ScoreMLP", "UNet",
           "UNET_PRESETS", "DiT", "DIT_PRESETS", "AutoencoderKL", "DDPMUNet", "POLICIES", "Policy",
           "with_precision", "REMAT_POLICIES",
           "SinusoidalEmbedding", "FourierEmbedding", "ConditionEmbedding", "time_embedding"]
