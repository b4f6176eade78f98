"""Test set-up: 8 simulated CPU devices (set before JAX starts) and a local float64 switch.

Every test runs on CPU in float32 unless it asks for `x64`, which enables float64 only for
its own duration (never globally).
"""

import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Enables float64 inside one test."""
  with jax.enable_x64(True):
    yield


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
  """Frees JAX's compiled programs and arrays while an xdist worker still counts as running.

  Why: once a worker reports that it has finished, the controller gives it 5 s to return and then
  sends it SIGINT (execnet's `_terminate_execution`). The worker's last act is pytest's final
  `gc.collect()`, which runs JAX's garbage-collector callback (`_xla_gc_callback`, which frees
  XLA buffers and executables); with a whole run's compilation caches alive that takes seconds on
  a loaded 2-core machine, the SIGINT lands inside the callback, and Python prints "Exception
  ignored in: <function _xla_gc_callback> ... KeyboardInterrupt" after a passing run. Doing that
  work here, before xdist's own `pytest_sessionfinish` wrapper reports the worker finished, leaves
  nothing slow for the end. Harmless without xdist.
  """
  del session
  jax.clear_caches()
  gc.collect()
