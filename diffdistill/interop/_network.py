"""An imported network in the library's conventions, with or without a student's extra inputs.

Every importer maps the library's time t (on the teacher's schedule) to what its network takes as
time (DiT: the step index 1000 t - 1; SiT: s = 1 - t; EDM's VE NCSN++: log(sigma(t) / 2), ...)
and the network's output to the parametrization `kind` (SiT: minus its velocity; DiT: the first
C of its 2C learned-sigma channels). `network_apply` builds that function, `net_apply(params, x,
t, **cond)`, for the checkpoint's module or for a copy of it with extra inputs (`extra_cond`:
MeanFlow's r, CTM's and IMM's s, a shortcut model's d, guided distillation's w). The extra
inputs named in `TIME_LIKE` are times on the same schedule, so they go through the same map as
t (and, for kind 'edm', first through c_noise = -logsnr / 8, as `parametrization.as_denoiser`
feeds t): an extra time is then embedded at the resolution the network gives t. The others
(d, w) pass unchanged. An extra input's projection starts at zero, so a student with extra
inputs starts as the checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from diffdistill import nets

TIME_LIKE = ("r", "s")


def network_apply(module, *, time_input: Callable[[Any], Any] = lambda t: t,
                  output: Callable[[Any], Any] | None = None, kind: str = "",
                  schedule=None) -> Callable[..., Any]:
  """net_apply(params, x, t, **cond) = output(module(x, time_input(t), **cond')), cond' with the
  time-like extra inputs mapped as t (module docstring)."""
  net = nets.make_apply(module)
  names = tuple(getattr(module, "extra_cond", ()))

  def extra_time(v):
    v = jnp.asarray(v, jnp.float32)
    if kind == "edm":  # as_denoiser hands the network c_noise, not t
      v = -0.125 * schedule.logsnr(v)
    return time_input(v)

  def net_apply(params, x, t, **cond):
    cond = {k: (extra_time(v) if k in TIME_LIKE and k in names else v) for k, v in cond.items()}
    y = net(params, x, time_input(jnp.asarray(t)), **cond)
    return y if output is None else output(y)

  return net_apply


__all__ = ["network_apply", "TIME_LIKE"]
