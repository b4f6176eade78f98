"""Argument checks shared by every public function, so that each class of bad input fails the same
way everywhere: a ValueError that names the argument, the accepted values and what was given.

Checks that need values (not only shapes and dtypes) run only where the value is concrete; under a
`jax.jit` trace they are skipped, and the docstring of the checked function states the valid range.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(*xs) -> bool:
  """Whether no x is a tracer (values are known now, not only shapes)."""
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def nonfinite_rows(x: Any) -> np.ndarray | None:
  """The indices of the rows (first axis) of a concrete floating `x` holding a NaN or inf; None
  for a traced or non-floating x."""
  if not is_concrete(x) or not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
    return None
  arr = np.asarray(x)
  arr = arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:]))) if arr.ndim > 1 else arr.reshape(-1, 1)
  return np.flatnonzero(~np.isfinite(arr).all(axis=1))


def check_finite(name: str, x: Any) -> None:
  """Raises ValueError if a concrete `x` holds a NaN or inf (the rows counted, the first named);
  a traced x is not checked."""
  rows = nonfinite_rows(x)
  if rows is not None and rows.size:
    raise ValueError(f"{name} holds non-finite values (NaN or inf) in {rows.size} of "
                     f"{np.shape(x)[0] if np.ndim(x) else 1} rows (the first: row {rows[0]}); "
                     "it must be finite.")


def check_int(name: str, value: Any, *, min: int | None = None, max: int | None = None) -> int:
  """`value` as a Python int: Python and NumPy integers are accepted, bools and floats are not
  (2.0 would hide a computed size that should have been an integer)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
  value = int(value)
  if min is not None and value < min:
    raise ValueError(f"{name} must be an integer >= {min}, got {value}.")
  if max is not None and value > max:
    raise ValueError(f"{name} must be an integer <= {max}, got {value}.")
  return value


def _is_typed_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def check_key(name: str, rng: Any) -> jax.Array:
  """A single PRNG key: a typed key (`jax.random.key(seed)`, shape []) or a raw one
  (`jax.random.PRNGKey(seed)`, uint32 [2], or [4] for the rbg implementation). Works on tracers
  (only the shape and dtype are read)."""
  if _is_typed_key(rng):
    if rng.shape != ():
      raise ValueError(f"{name} must be a single PRNG key (shape []), got a key array of shape "
                       f"{rng.shape}; split it and pass one key.")
    return rng
  if (hasattr(rng, "dtype") and hasattr(rng, "shape") and rng.dtype == np.uint32
      and rng.shape in ((2,), (4,))):
    return rng
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)):
    raise ValueError(f"{name} must be a PRNG key, not the integer {int(rng)}: pass "
                     f"jax.random.key({int(rng)}).")
  what = (f"an array of shape {tuple(rng.shape)} and dtype {rng.dtype}" if hasattr(rng, "dtype")
          else repr(rng))
  raise ValueError(f"{name} must be a PRNG key, jax.random.key(seed) (or a raw uint32[2] "
                   f"jax.random.PRNGKey(seed)); got {what}.")


def check_floating(name: str, x: Any) -> jax.Array:
  """x as an array of a floating dtype; integer or boolean arrays are an error (silently cast
  coefficients would be truncated to integers)."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array (float32, float64, bfloat16, ...), "
                     f"got dtype {x.dtype}; cast it first, e.g. {name}.astype(jnp.float32).")
  return x


def _slack(t_min: float, t_max: float, dtype) -> float:
  # Times computed in float32 (a bound rounded to the dtype, float32(pi/2) > pi/2, or a
  # t_from_logsnr round trip) land a little outside the range; bfloat16(0.9946) = 0.9961. Allow
  # that much, on the scale of the range; misuse (t = -1, or t = 0 for EDM) is far larger.
  eps = max(4.0 * float(jnp.finfo(dtype).eps), 1e-5)
  return eps * max(1.0, abs(t_min), abs(t_max))


def check_time(name: str, t: Any, *, t_min: float, t_max: float, what: str = "the schedule") -> None:
  """Raises unless every value of a concrete t lies in [t_min, t_max], up to a slack of
  max(4 eps(dtype), 1e-5) max(1, |t_min|, |t_max|) for rounding. A traced t is not checked."""
  if not is_concrete(t):
    return
  arr = np.asarray(t)
  if arr.size == 0 or not (jnp.issubdtype(arr.dtype, jnp.floating)
                          or jnp.issubdtype(arr.dtype, jnp.integer)):
    return
  dtype = arr.dtype if jnp.issubdtype(arr.dtype, jnp.floating) else np.float32
  if np.all(np.isnan(arr)):
    return  # NaN propagates; it is not a time outside the range.
  lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
  slack = _slack(t_min, t_max, dtype)
  if lo < t_min - slack or hi > t_max + slack:
    bad = lo if lo < t_min - slack else hi
    raise ValueError(f"{name} must lie in [t_min, t_max] = [{t_min}, {t_max}] ({what}'s range); "
                     f"got {bad}.")


def check_output(name: str, out: Any, *, shape: tuple, what: str) -> None:
  """Raises unless `out` (an array or tracer: only its shape and dtype are read) is one floating
  array of `shape`."""
  if not (hasattr(out, "shape") and hasattr(out, "dtype")):
    raise ValueError(f"{name} must return one array {what}; it returned {type(out).__name__}.")
  if tuple(out.shape) != tuple(shape):
    raise ValueError(f"{name} must return {what} {tuple(shape)}; it returned shape "
                     f"{tuple(out.shape)}.")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(f"{name} must return a floating-point array; it returned dtype {out.dtype}.")


def checked_denoiser(denoise: Callable) -> Callable:
  """`denoise(x, t)` whose every output is checked to be one floating array of x's shape.

  The check runs where the sampler calls it, at trace time (shapes are static): no extra trace
  and no FLOPs. Outputs that broadcast ([B, 1] for [B, d]) are caught here, where they would
  otherwise give silently wrong numbers.
  """

  @functools.wraps(denoise)
  def checked(x, t, *args, **kwargs):
    out = denoise(x, t, *args, **kwargs)
    check_output("denoise(x, t)", out, shape=x.shape, what="x0_hat of x's shape")
    return out

  return checked


def check_writable_dir(name: str, path: str) -> None:
  """Raises unless `path` is, or can be created as, a writable directory. Leaves nothing behind
  (a probe folder is made in the nearest existing ancestor and removed: permission bits alone
  say yes to root on read-only or virtual file systems such as /proc)."""
  if not isinstance(path, (str, os.PathLike)) or not str(path):
    raise ValueError(f"{name} must be a directory path, got {path!r}.")
  path = os.path.abspath(path)
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    raise ValueError(f"{name}={path!r} cannot be a directory: {probe!r} is a file.")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"{name}={path!r} is not writable: no write permission on {probe!r}.")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".writable-", dir=probe))
  except OSError as e:
    raise ValueError(f"{name}={path!r} is not writable: cannot create a folder in {probe!r} "
                     f"({e.strerror}).") from None


__all__ = ["is_concrete", "check_int", "check_key", "check_floating", "check_time",
           "check_output", "checked_denoiser", "check_writable_dir"]
